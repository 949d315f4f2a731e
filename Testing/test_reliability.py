"""Bad inputs, faults and cancellation never lose data and always say what went wrong.

Every run here checks the same guarantees: inputs byte-identical afterwards, the output folder
complete or absent, no orphan worker and no temporary file left behind, user errors as exactly one
line on stderr with exit code 2, and exit code 3 when no preset succeeded. Each test runs with its own
temporary folder (TMPDIR for the command line, `tempfile.tempdir` for the API), so leftovers and
orphans are attributed to this run and not to anything else on the machine.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import SimpleITK as sitk
from worker_faults import HANGING, freeze_from_progress_json, on_start

from AutoRegisterLib.errors import Cancelled, InputError
from AutoRegisterLib.image import from_numpy, read_image, resample_to_grid, write_image
from AutoRegisterLib.pipeline import auto_register
from AutoRegisterLib.presets import TABLES_DIR
from AutoRegisterLib.report import write_outputs

ROOT = Path(__file__).resolve().parent.parent
SPACING = (3.0, 3.0, 3.0)
SHIFT_VOX = (1, 2, 0)  # (z, y, x) voxels the moving blob is shifted by: fixed->moving is +SHIFT_VOX
OUTPUT_FILES = {"transform.tfm", "warped.nii.gz", "report.png", "result.json"}


# --- helpers ---------------------------------------------------------------------------------

def blob(shape=(24, 24, 24), shift=(0, 0, 0)) -> np.ndarray:
    """Two smooth anisotropic Gaussians (no symmetry a rigid fit could confuse), shifted by `shift` voxels."""
    grids = np.indices(shape).astype(np.float64)
    c = [s / 2 - 0.5 + d for s, d in zip(shape, shift)]
    widths, bump = (5.0, 7.0, 4.0)[-len(shape):], (3.0, -4.0, 0.0)[-len(shape):]
    big = np.exp(-sum(((g - ci) / w) ** 2 for g, ci, w in zip(grids, c, widths)))
    small = np.exp(-sum(((g - ci - b) / 2.5) ** 2 for g, ci, b in zip(grids, c, bump)))
    return big + 0.6 * small


def pair(dtype=np.float32, lo=0.0, hi=1.0, shape=(24, 24, 24)):
    """A fixed and a moving image whose true fixed->moving map is a shift of SHIFT_VOX voxels."""
    spacing = SPACING[-len(shape):]
    shift = SHIFT_VOX[-len(shape):]
    f, m = blob(shape), blob(shape, shift)
    scale = lambda a: (lo + (hi - lo) * a / a.max()).astype(dtype)  # noqa: E731
    return from_numpy(scale(f), spacing), from_numpy(scale(m), spacing)


def true_shift_mm(dim=3) -> np.ndarray:
    """SHIFT_VOX in physical (x, y, z) order and mm."""
    return np.array(list(reversed(SHIFT_VOX[-dim:]))) * SPACING[0]


def shift_error_mm(transform, image, expected_mm) -> float:
    """How far the transform moves the image centre from where the true shift puts it."""
    centre = image.physical_points(np.array([[(n - 1) / 2 for n in image.size]]))[0]
    return float(np.linalg.norm(np.array(transform.TransformPoint(tuple(centre))) - centre - expected_mm))


def table_file(folder: Path, presets, name="table.json") -> Path:
    """A preset table racing `presets` (catalog names or inline dicts) with the T2->T1 scoring settings."""
    table = json.loads((TABLES_DIR / "T2_to_T1.json").read_text())
    table.pop("racing", None)
    table["presets"] = list(presets)
    path = folder / name
    path.write_text(json.dumps(table))
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def workers_mentioning(text: str) -> list[psutil.Process]:
    """Live processes whose command line mentions `text` (our per-test temporary folder)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(text in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def assert_no_leftovers(tmpdir: Path, out: Path | None = None) -> None:
    """No temporary folder, no staging folder, no worker still running."""
    assert not list(tmpdir.glob("autoregister-*")), list(tmpdir.iterdir())
    if out is not None:
        assert not list(out.parent.glob(f".{out.name}.*")), list(out.parent.iterdir())
    assert not workers_mentioning(str(tmpdir))


def assert_complete(out: Path) -> dict:
    """The output folder holds every output, and result.json parses."""
    assert OUTPUT_FILES <= {p.name for p in out.iterdir()}, list(out.iterdir())
    assert (out / "report.png").stat().st_size > 1000
    return json.loads((out / "result.json").read_text())


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """A temporary folder of our own for the API's scratch files (tempfile.gettempdir() returns it)."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _cli_env(tmpdir: Path, env_extra=None) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmpdir), **(env_extra or {})}


def run_cli(*args, tmpdir: Path, env_extra=None, timeout=240):
    """`python -m AutoRegisterLib ARGS` with an argument list (never a shell) and its own TMPDIR."""
    return subprocess.run([sys.executable, "-m", "AutoRegisterLib", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=_cli_env(tmpdir, env_extra))


def start_cli(*args, tmpdir: Path) -> subprocess.Popen:
    """`run_cli` in the background, with stdout and stderr as text pipes."""
    return subprocess.Popen([sys.executable, "-m", "AutoRegisterLib", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_cli_env(tmpdir))


def assert_user_error(proc, fragment: str) -> None:
    """Exit 2, exactly one line on stderr naming the problem, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
    assert lines[0].startswith("autoregister: error: ") and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A good fixed/moving pair on disk, a sitk-rigid table, and bad files of every kind."""
    folder = tmp_path_factory.mktemp("inputs")
    fixed, moving = pair()
    write_image(fixed, folder / "fixed.nii.gz")
    write_image(moving, folder / "moving.nii.gz")
    whole = (folder / "moving.nii.gz").read_bytes()
    (folder / "half.nii.gz").write_bytes(whole[: len(whole) // 2])
    write_image(moving, folder / "moving.nii", compress=False)
    raw = (folder / "moving.nii").read_bytes()
    (folder / "half.nii").write_bytes(raw[: len(raw) // 2])
    write_image(moving, folder / "moving.nrrd", compress=False)
    raw = (folder / "moving.nrrd").read_bytes()
    (folder / "half.nrrd").write_bytes(raw[: len(raw) // 2])
    (folder / "empty.nii.gz").write_bytes(b"")
    (folder / "garbage.nii.gz").write_bytes(bytes(range(256)) * 40)
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "no dicom here").mkdir()
    volumes = [sitk.GetImageFromArray(blob((8, 8, 8), (0, 0, t)).astype(np.float32)) for t in range(3)]
    sitk.WriteImage(sitk.JoinSeries(volumes), str(folder / "fmri 4d.nii.gz"))
    write_image(from_numpy(blob((24, 24))), folder / "slice2d.nii.gz")
    write_image(fixed.with_array(np.full(fixed.array.shape, 7, np.float32)), folder / "constant.nii.gz")
    write_image(fixed.with_array(np.zeros(fixed.array.shape, np.int16)), folder / "zeros.nii.gz")
    table_file(folder, ["sitk-rigid"], "sitk.json")
    return folder


# --- voxel types and values ------------------------------------------------------------------

VOXEL_CASES = {
    "int16 extremes": dict(dtype=np.int16, lo=-32768, hi=32767),
    "CT-like int16 with -1024 air": dict(dtype=np.int16, lo=-1024, hi=3071),
    "uint8": dict(dtype=np.uint8, lo=0, hi=255),
    "float64 with a large offset": dict(dtype=np.float64, lo=1e6, hi=1e6 + 50),
}


@pytest.mark.parametrize("case", list(VOXEL_CASES))
def test_every_voxel_type_registers_and_leaves_input_files_byte_identical(case, tmp_path, private_tmp):
    fixed, moving = pair(**VOXEL_CASES[case])
    write_image(fixed, tmp_path / "f.nrrd")
    write_image(moving, tmp_path / "m.nrrd")
    assert read_image(tmp_path / "m.nrrd").array.dtype == np.dtype(VOXEL_CASES[case]["dtype"])
    before = digest(tmp_path / "f.nrrd"), digest(tmp_path / "m.nrrd")
    out = tmp_path / "out"
    result = auto_register(tmp_path / "f.nrrd", tmp_path / "m.nrrd", fixed_modality="T1", moving_modality="T1",
                           table=table_file(tmp_path, ["sitk-rigid"]))
    write_outputs(result, out)
    assert result.best is not None and result.best.score > 0.8, result.candidates
    assert shift_error_mm(result.best.transform, fixed, true_shift_mm()) < 1.5
    assert_complete(out)
    assert (digest(tmp_path / "f.nrrd"), digest(tmp_path / "m.nrrd")) == before
    assert_no_leftovers(private_tmp, out)


def test_nan_and_inf_voxels_are_ignored_and_the_callers_arrays_keep_them(private_tmp, tmp_path):
    fixed, moving = pair()
    arr = moving.array.copy()
    arr[0, 0, :6] = np.nan
    arr[3, 3, 3], arr[4, 4, 4] = np.inf, -np.inf
    moving = moving.with_array(arr)
    kept = arr.copy()
    result = auto_register(fixed, moving, table=table_file(tmp_path, ["sitk-rigid"]))
    assert result.best is not None
    assert shift_error_mm(result.best.transform, fixed, true_shift_mm()) < 1.5
    assert np.isfinite(result.best.score) and np.isfinite(result.best.warped.array).all()
    assert np.array_equal(moving.array, kept, equal_nan=True)  # the caller's image still has its NaNs
    assert_no_leftovers(private_tmp)


def test_an_image_of_only_nan_is_a_user_error(tmp_path):
    fixed, moving = pair()
    with pytest.raises(InputError, match="moving: every voxel is NaN or infinite"):
        auto_register(fixed, moving.with_array(np.full(moving.array.shape, np.nan, np.float32)),
                      table=table_file(tmp_path, ["sitk-rigid"]))


# --- user errors on the command line: one line, exit 2, nothing written ----------------------

BAD_INPUTS = {
    # name: (fixed, moving, extra args, fragment of the one stderr line)
    "nonexistent path": ("fixed.nii.gz", "missing.nii.gz", [], "missing.nii.gz: file not found"),
    "gzip NIfTI copied halfway": ("fixed.nii.gz", "half.nii.gz", [], "half.nii.gz: file is truncated"),
    "NIfTI copied halfway": ("fixed.nii.gz", "half.nii", [], "half.nii: file is truncated"),
    "NRRD copied halfway": ("fixed.nii.gz", "half.nrrd", [], "half.nrrd: not a readable image"),
    "empty file": ("fixed.nii.gz", "empty.nii.gz", [], "empty.nii.gz: not a readable image"),
    "corrupt gzip": ("fixed.nii.gz", "garbage.nii.gz", [], "garbage.nii.gz: file is truncated or corrupt"),
    "text file": ("notes.txt", "moving.nii.gz", [], "notes.txt: not a readable image"),
    "folder without DICOM": ("no dicom here", "moving.nii.gz", [], "no dicom here: folder holds no DICOM"),
    "4D volume": ("fixed.nii.gz", "fmri 4d.nii.gz", [], "4D or multi-component images are not supported"),
    "2D against 3D": ("fixed.nii.gz", "slice2d.nii.gz", [], "fixed is 3D but moving is 2D"),
    "constant image": ("fixed.nii.gz", "constant.nii.gz", [], "moving: every voxel is 7; a constant image"),
    "all-zero moving image": ("fixed.nii.gz", "zeros.nii.gz", [], "moving: every voxel is 0"),
    "memory limit of zero": ("fixed.nii.gz", "moving.nii.gz", ["--memory-limit-mb", "0"],
                             "--memory-limit-mb must be positive"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_exit_2_and_writes_nothing(case, files, tmp_path):
    fixed, moving, extra, fragment = BAD_INPUTS[case]
    inputs = [files / fixed, files / moving]
    before = {p: digest(p) for p in inputs if p.is_file()}
    out = tmp_path / "out"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    proc = run_cli(*inputs, "--out", out, "--table", files / "sitk.json", "--quiet", *extra, tmpdir=scratch)
    assert_user_error(proc, fragment)
    assert not out.exists()
    assert {p: digest(p) for p in before} == before
    assert_no_leftovers(scratch, out)


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(files, tmp_path):
    if os.geteuid() == 0:  # root writes through any permission bits; a sysfs folder refuses even root
        parent = Path("/sys/fs")
        if not parent.is_dir():
            pytest.skip("no read-only folder for root on this machine")
    else:
        parent = tmp_path / "read-only"
        parent.mkdir()
        parent.chmod(0o555)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    t0 = time.perf_counter()
    proc = run_cli(files / "fixed.nii.gz", files / "moving.nii.gz", "--out", parent / "out", "--table",
                   files / "sitk.json", tmpdir=scratch)
    assert_user_error(proc, "output folder is not writable")
    assert not (parent / "out").exists() and time.perf_counter() - t0 < 30
    assert_no_leftovers(scratch)


def test_paths_with_spaces_quotes_and_non_ascii_work_end_to_end(files, tmp_path):
    folder = tmp_path / "Patiënt 'Ünïcode' \"quoted\" $HOME ; rm -rf"
    folder.mkdir()
    fixed, moving = folder / "fixed T1 (1) 'ä'.nii.gz", folder / "móving \"T2\" ×.nrrd"
    write_image(read_image(files / "fixed.nii.gz"), fixed)
    write_image(read_image(files / "moving.nii.gz"), moving)
    before = digest(fixed), digest(moving)
    out = folder / "résultat 'out' \"1\""
    scratch = tmp_path / "scratch dir ü"
    scratch.mkdir()
    proc = run_cli(fixed, moving, "--out", out, "--table", files / "sitk.json", "--quiet", tmpdir=scratch)
    assert proc.returncode == 0, proc.stderr
    result = assert_complete(out)
    assert result["inputs"]["fixed"] == str(fixed) and result["inputs"]["moving"] == str(moving)
    assert (digest(fixed), digest(moving)) == before
    assert sorted(p.name for p in folder.iterdir()) == sorted([fixed.name, moving.name, out.name])
    assert_no_leftovers(scratch, out)


def test_table_values_are_data_never_code(files, tmp_path):
    marker = tmp_path / "pwned"
    evil = {"name": "evil", "backend": "sitk", "transform_type": "rigid",
            "params": {"iterations": f"__import__('os').system('touch {marker}')"}}
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    proc = run_cli(files / "fixed.nii.gz", files / "moving.nii.gz", "--out", tmp_path / "out", "--table",
                   table_file(tmp_path, [evil]), "--quiet", tmpdir=scratch)
    assert proc.returncode in (2, 3), proc.stderr  # refused on load, or the preset fails: never run
    saved = tmp_path / "out" / "result.json"
    assert "iterations" in proc.stderr + (saved.read_text() if saved.exists() else "")
    assert not marker.exists()
    assert_no_leftovers(scratch)


# --- geometry ------------------------------------------------------------------------------------

def test_images_that_do_not_overlap_at_all_are_brought_together(private_tmp, tmp_path):
    fixed, moving = pair()
    far = from_numpy(moving.array, SPACING, origin_mm=(400.0, -250.0, 90.0))
    result = auto_register(fixed, far, table=table_file(tmp_path, ["sitk-rigid", "ants-rigid"]))
    assert result.best is not None, [(c.name, c.status, c.error) for c in result.candidates]
    expected = true_shift_mm() + np.array([400.0, -250.0, 90.0])
    assert shift_error_mm(result.best.transform, fixed, expected) < 1.5
    assert result.best.coverage > 0.9
    assert_no_leftovers(private_tmp)


def test_a_moving_slab_inside_the_head_registers_and_is_judged_against_what_it_covers(files, tmp_path):
    """Issue #13: a slab of 8 of the moving image's 24 slices covers a third of the fixed head at best; it is
    no longer disqualified for that, and the shift is recovered (before, every preset was refused: exit 3)."""
    fixed, moving = pair()
    z0, nz = 8, 8
    origin = moving.physical_points(np.array([[0.0, 0.0, float(z0)]]))[0]
    slab = from_numpy(np.ascontiguousarray(moving.array[z0:z0 + nz]), SPACING, origin_mm=tuple(origin))
    write_image(slab, tmp_path / "slab.nii.gz")
    write_image(fixed, tmp_path / "fixed.nii.gz")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "out"
    proc = run_cli(tmp_path / "fixed.nii.gz", tmp_path / "slab.nii.gz", "--out", out, "--table",
                   table_file(tmp_path, ["sitk-rigid", "ants-rigid"]), "--quiet", tmpdir=scratch)
    assert proc.returncode in (0, 4), proc.stderr  # 4: written, with a red trust verdict
    result = json.loads((out / "result.json").read_text())
    best = next(c for c in result["candidates"] if c["name"] == result["best"])
    assert best["coverage"] > 0.8  # of what an 8-slice slab can cover
    tx = sitk.ReadTransform(str(out / best["transform"] if best["transform"] else out / "transform.tfm"))
    centre = fixed.physical_points(np.array([[11.5, 11.5, 11.5]]))[0]
    moved = np.array(tx.TransformPoint(tuple(centre))) - centre
    assert np.linalg.norm(moved - true_shift_mm()) < 1.5, moved
    assert_no_leftovers(scratch, out)


def test_different_grids_spacings_and_an_oblique_orientation_register(private_tmp, tmp_path):
    fixed, _ = pair()
    angle = np.deg2rad(25.0)
    oblique = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0, 0, 1]])
    grid = from_numpy(np.zeros((22, 30, 26), np.uint8), (2.5, 2.0, 3.5), origin_mm=(5.0, -8.0, 3.0),
                      direction=oblique)
    true_mm = np.array([4.0, -3.0, 5.0])
    inverse = sitk.TranslationTransform(3, tuple(-true_mm))  # moving(q) = fixed(q - t): fixed->moving is +t
    moving = resample_to_grid(fixed, grid, inverse)
    assert not moving.same_grid(fixed)
    result = auto_register(fixed, moving, table=table_file(tmp_path, ["sitk-rigid", "ants-rigid"]))
    assert result.best is not None
    assert shift_error_mm(result.best.transform, fixed, true_mm) < 1.5
    assert result.best.warped.same_grid(fixed)
    assert_no_leftovers(private_tmp)


def test_extreme_anisotropy_thick_slices_against_isotropic_still_registers(private_tmp, tmp_path):
    fixed, _ = pair()
    thick = from_numpy(np.zeros((6, 48, 48), np.uint8), (1.5, 1.5, 12.0), origin_mm=(0.0, 0.0, 6.0))
    true_mm = np.array([3.0, -4.5, 0.0])
    moving = resample_to_grid(fixed, thick, sitk.TranslationTransform(3, tuple(-true_mm)))
    result = auto_register(fixed, moving, table=table_file(tmp_path, ["sitk-rigid", "ants-rigid"]))
    assert result.best is not None, [(c.name, c.status, c.error) for c in result.candidates]
    assert shift_error_mm(result.best.transform, fixed, true_mm) < 3.0
    assert_no_leftovers(private_tmp)


def test_two_2d_slices_register_with_both_backends_and_write_2d_outputs(private_tmp, tmp_path):
    from AutoRegisterDev.data import load_icbm

    t1 = load_icbm("t1", 4.0)
    fixed = from_numpy(t1.array[t1.array.shape[0] // 2], t1.spacing_mm[:2], t1.origin_mm[:2])
    true_mm = np.array([6.0, -8.0])
    moving = resample_to_grid(fixed, fixed, sitk.TranslationTransform(2, tuple(-true_mm)))
    out = tmp_path / "out"
    result = auto_register(fixed, moving, table=table_file(tmp_path, ["sitk-rigid", "ants-rigid"]))
    write_outputs(result, out)
    for cand in result.candidates:
        assert cand.status == "ok", cand.error
        assert cand.transform.GetDimension() == 2
        assert shift_error_mm(cand.transform, fixed, true_mm) < 1.0
    assert_complete(out)
    assert sitk.ReadImage(str(out / "warped.nii.gz")).GetDimension() == 2
    assert_no_leftovers(private_tmp, out)


def test_single_slice_volumes_give_a_result_or_a_clear_reason_per_preset(private_tmp, tmp_path):
    fixed, moving = pair(shape=(1, 40, 36))
    result = auto_register(fixed, moving, table=table_file(tmp_path, ["sitk-rigid", "ants-rigid"]))
    assert result.best is not None
    for cand in result.candidates:
        assert cand.status in ("ok", "failed", "disqualified"), cand
        if cand.status != "ok":
            assert cand.error and "Exception thrown in SimpleITK" not in cand.error
            assert "Traceback" not in cand.error and len(cand.error.splitlines()) == 1
    assert_no_leftovers(private_tmp)


def test_images_smaller_than_the_scoring_window_finish_with_a_reason_for_every_preset(private_tmp, tmp_path):
    fixed, moving = pair(shape=(3, 3, 3))
    table = table_file(tmp_path, ["sitk-rigid", "ants-rigid"])
    assert json.loads(table.read_text())["scoring"]["window_voxels"] > 3
    result = auto_register(fixed, moving, table=table)
    for cand in result.candidates:
        assert cand.status in ("ok", "failed", "disqualified"), cand
        if cand.status == "ok":
            assert 0.0 <= cand.score <= 1.0
        else:
            assert cand.error and "Exception thrown in SimpleITK" not in cand.error
    sitk_cand = next(c for c in result.candidates if c.name == "sitk-rigid")
    assert sitk_cand.status == "failed" and "pixels" in sitk_cand.error  # ITK's own reason, in one line
    assert_no_leftovers(private_tmp)


# --- faults ----------------------------------------------------------------------------------------

def test_an_aborted_worker_is_reported_and_the_run_still_writes_a_complete_result(private_tmp, tmp_path):
    fixed, moving = pair()
    out = tmp_path / "out"
    result = auto_register(fixed, moving, table=table_file(tmp_path, [HANGING, "sitk-rigid"]), jobs=2, timeout_s=60,
                           progress=on_start("slow-syn", signum=signal.SIGABRT))
    write_outputs(result, out)
    by_name = {c.name: c for c in result.candidates}
    assert by_name["slow-syn"].status == "failed" and "SIGABRT" in by_name["slow-syn"].error
    assert result.best.name == "sitk-rigid"
    saved = assert_complete(out)
    assert {c["name"]: c["status"] for c in saved["candidates"]} == {"slow-syn": "failed", "sitk-rigid": "ok"}
    assert_no_leftovers(private_tmp, out)


def test_a_hanging_preset_times_out_on_the_command_line_without_orphans(files, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "out"
    t0 = time.perf_counter()
    cli = start_cli(files / "fixed.nii.gz", files / "moving.nii.gz", "--out", out, "--table",
                    table_file(tmp_path, [HANGING, "sitk-rigid"]), "--timeout", "4", "--jobs", "2", "--progress-json",
                    tmpdir=scratch)
    try:
        freeze_from_progress_json(cli, ["slow-syn"])
        _, stderr = cli.communicate(timeout=60)
    finally:
        cli.kill()
    assert cli.returncode == 0, stderr
    assert time.perf_counter() - t0 < 60
    statuses = {c["name"]: (c["status"], c["error"]) for c in assert_complete(out)["candidates"]}
    assert statuses["slow-syn"] == ("timeout", "timed out after 4 s")
    assert statuses["sitk-rigid"][0] == "ok"
    assert_no_leftovers(scratch, out)


def test_a_backend_that_is_not_installed_is_skipped_with_its_reason(files, tmp_path):
    # A Python without antspyx: no site-packages (-S), and a copy of it, as links, minus ants.
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    without_ants = tmp_path / "site without ants"
    without_ants.mkdir()
    for entry in site.iterdir():
        if not entry.name.lower().startswith("ants"):
            (without_ants / entry.name).symlink_to(entry)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(without_ants)]), "TMPDIR": str(scratch)}
    proc = subprocess.run(
        [sys.executable, "-S", "-m", "AutoRegisterLib", str(files / "fixed.nii.gz"), str(files / "moving.nii.gz"),
         "--out", str(out), "--table", str(table_file(tmp_path, ["ants-rigid", "sitk-rigid"])), "--quiet"],
        capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr
    result = assert_complete(out)
    by_name = {c["name"]: c for c in result["candidates"]}
    assert by_name["ants-rigid"]["status"] == "unavailable"
    assert "antspyx is not installed" in by_name["ants-rigid"]["error"]
    assert by_name["ants-rigid"]["seconds"] is None  # it never ran
    assert result["best"] == "sitk-rigid"
    assert_no_leftovers(scratch, out)


def test_a_worker_out_of_memory_fails_its_preset_with_a_clear_reason_and_exit_3(files, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "out"
    proc = run_cli(files / "fixed.nii.gz", files / "moving.nii.gz", "--out", out, "--table", files / "sitk.json",
                   "--memory-limit-mb", "150", "--quiet", tmpdir=scratch)
    assert proc.returncode == 3, proc.stderr
    (cand,) = json.loads((out / "result.json").read_text())["candidates"]
    assert cand["status"] == "failed"
    assert cand["error"].startswith("out of memory (limit 150 MB per worker)"), cand["error"]
    assert_no_leftovers(scratch, out)


def test_a_generous_memory_limit_does_not_change_the_result(private_tmp, tmp_path):
    fixed, moving = pair()
    table = table_file(tmp_path, ["sitk-rigid"])
    capped = auto_register(fixed, moving, table=table, memory_limit_mb=4000)
    assert capped.best is not None
    assert shift_error_mm(capped.best.transform, fixed, true_shift_mm()) < 1.5
    with pytest.raises(InputError, match="memory limit must be a positive number"):
        auto_register(fixed, moving, table=table, memory_limit_mb=-5)


def test_cancel_mid_run_writes_nothing_and_leaves_nothing_behind(private_tmp, tmp_path):
    fixed, moving = pair()
    out = tmp_path / "out"
    started = time.perf_counter()
    with pytest.raises(Cancelled):
        auto_register(fixed, moving, table=table_file(tmp_path, [HANGING, "sitk-rigid"]), jobs=2,
                      cancel=lambda: time.perf_counter() - started > 2.0, progress=on_start("slow-syn"))
    assert time.perf_counter() - started < 15
    assert not out.exists()
    assert_no_leftovers(private_tmp, out)


def test_ctrl_c_on_the_command_line_exits_130_writes_nothing_and_kills_every_worker(files, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "out"
    before = digest(files / "fixed.nii.gz"), digest(files / "moving.nii.gz")
    cli = start_cli(files / "fixed.nii.gz", files / "moving.nii.gz", "--out", out, "--table",
                    table_file(tmp_path, [HANGING, dict(HANGING, name="slow-2")]), "--progress-json", "--jobs", "2",
                    tmpdir=scratch)
    try:
        freeze_from_progress_json(cli, ["slow-syn", "slow-2"])  # both workers hang, mid-run
        assert len(workers_mentioning(str(scratch))) >= 2
        cli.send_signal(signal.SIGINT)
        rest, stderr = cli.communicate(timeout=30)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "autoregister: cancelled; nothing was written"
    assert "Traceback" not in stderr
    assert json.loads(rest.strip().splitlines()[-1])["exit_code"] == 130
    assert not out.exists()
    assert (digest(files / "fixed.nii.gz"), digest(files / "moving.nii.gz")) == before
    assert_no_leftovers(scratch, out)


# --- no shell, no code from data ----------------------------------------------------------------------

FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_ATTRIBUTES = {("os", "system"), ("os", "popen"), ("os", "execl"), ("os", "execlp"), ("os", "spawnl"),
                        ("subprocess", "getoutput"), ("subprocess", "getstatusoutput"), ("pickle", "load"),
                        ("pickle", "loads"), ("yaml", "load"), ("marshal", "loads")}
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "shelve", "marshal", "yaml"}


def _python_sources():
    for folder in ("AutoRegisterLib", "AutoRegister"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_no_shell_no_eval_and_no_pickle_anywhere_in_the_code():
    sources = list(_python_sources())
    assert len(sources) > 10
    problems = []
    for path in sources:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
                    problems.append(f"{where} calls {func.id}")
                if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and \
                        (func.value.id, func.attr) in FORBIDDEN_ATTRIBUTES:
                    problems.append(f"{where} calls {func.value.id}.{func.attr}")
                if isinstance(func, ast.Attribute) and func.attr == "load" and \
                        isinstance(func.value, ast.Name) and func.value.id == "torch":
                    weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                    if not weights_only or getattr(weights_only[0].value, "value", None) is not True:
                        problems.append(f"{where} calls torch.load without weights_only=True (pickle)")
                for kw in node.keywords:
                    if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                        problems.append(f"{where} passes shell=")
            if isinstance(node, ast.Import):
                problems += [f"{where} imports {a.name}" for a in node.names if a.name in FORBIDDEN_MODULES]
            if isinstance(node, ast.ImportFrom) and node.module in FORBIDDEN_MODULES:
                problems.append(f"{where} imports from {node.module}")
    assert not problems, "\n".join(problems)


def test_every_subprocess_gets_an_argument_list():
    calls = []
    for path in _python_sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    isinstance(node.func.value, ast.Name) and node.func.value.id == "subprocess" and node.args:
                calls.append((path.name, node.lineno, node.args[0]))
    assert calls, "the runner starts workers with subprocess"
    for name, line, first in calls:
        assert not isinstance(first, (ast.Constant, ast.JoinedStr, ast.BinOp)), f"{name}:{line} passes a string"
