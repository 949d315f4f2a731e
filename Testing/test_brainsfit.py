"""BRAINSFit for real: the backend runs the executable on small real images (ICBM152 at 4 mm) and its
transforms are checked against known misalignments; hung, crashing and missing executables are faked.

The real executable is $AUTOREGISTER_BRAINSFIT, else ``../shared/bin/BRAINSFit`` beside the repository
(it needs Debian's ``libinsighttoolkit5.2``). When it cannot run, the tests that need it skip with the reason.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AutoRegisterDev.data import (
    Case,
    initial_error_mm,
    load_icbm,
    make_case,
    point_error_mm,
    random_misalignment,
)
from AutoRegisterLib.backends import Preset, get_backend
from AutoRegisterLib.backends import brainsfit as bf
from AutoRegisterLib.errors import BackendUnavailable
from AutoRegisterLib.image import Image, resample_to_grid, to_sitk
from AutoRegisterLib.pipeline import auto_register
from AutoRegisterLib.presets import load_catalog
from AutoRegisterLib.worker import write_transform

ROOT = Path(__file__).resolve().parents[1]
CATALOG = load_catalog()
VOXEL_MM = 4.0


def real_executable() -> tuple[str | None, str]:
    """(path, "") of a BRAINSFit that runs here, else (None, why not)."""
    exe = os.environ.get(bf.ENV_EXECUTABLE) or str(ROOT.parent / "shared" / "bin" / "BRAINSFit")
    reason = bf.probe(exe)
    return (None, reason) if reason else (exe, "")


EXE, WHY_NOT = real_executable()
needs_brainsfit = pytest.mark.skipif(EXE is None, reason=f"no runnable BRAINSFit: {WHY_NOT}")


@pytest.fixture
def real_brainsfit(monkeypatch):
    """The real BRAINSFit as $AUTOREGISTER_BRAINSFIT (worker processes inherit it)."""
    monkeypatch.setenv(bf.ENV_EXECUTABLE, EXE)
    return EXE


def head(image: Image) -> np.ndarray:
    """The head on the fixed grid, where the point error is judged."""
    from AutoRegisterLib.scoring import head_mask

    return head_mask(image, "T1")


def grid_points(image: Image, n: int = 200, seed: int = 0) -> np.ndarray:
    """Physical points of `n` random voxel centres of the image's grid."""
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.integers(0, s, n) for s in image.size], axis=1)
    return image.physical_points(idx)


def assert_same_map(a, b, points, atol):
    """Two transforms agree at `points` within `atol` mm."""
    worst = max(np.abs(np.subtract(a.TransformPoint(tuple(p)), b.TransformPoint(tuple(p)))).max() for p in points)
    assert worst <= atol, f"transforms differ by {worst} mm"


def run_in(preset: Preset, case: Case, workdir: Path):
    """Run a preset with 2 threads in `workdir`; return the backend's output and BRAINSFit's own file read back."""
    out = get_backend("brainsfit").run(preset, case.fixed, case.moving, workdir, threads=2)
    return out, sitk.ReadTransform(str(workdir / "brainsfit_transform.h5"))


# --- real runs ---------------------------------------------------------------------------------

@needs_brainsfit
def test_linear_result_maps_fixed_to_moving_points_and_reads_back_exactly_as_written(
        real_brainsfit, rigid_case4, tmp_path):
    mask = head(rigid_case4.fixed)
    out, written = run_in(CATALOG["brainsfit-rigid"], rigid_case4, tmp_path / "work")
    assert out.transform.GetName() == "AffineTransform" and written.IsLinear()
    error = point_error_mm(rigid_case4, out.transform, mask)
    assert error < VOXEL_MM / 2
    # The other direction would be as wrong as no registration at all: the convention is not a guess.
    assert point_error_mm(rigid_case4, out.transform.GetInverse(), mask) > 2 * initial_error_mm(rigid_case4, mask) / 3
    points = grid_points(rigid_case4.fixed)
    assert_same_map(out.transform, written, points, 1e-6)
    # The warped image is the moving image resampled through the transform, as the README promises.
    resampled = sitk.Resample(to_sitk(rigid_case4.moving, np.float32), to_sitk(rigid_case4.fixed), out.transform,
                              sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    np.testing.assert_allclose(out.warped.array, sitk.GetArrayFromImage(resampled), atol=1e-3)
    saved = sitk.ReadTransform(str(write_transform(out.transform, tmp_path)))
    assert_same_map(saved, written, points, 1e-6)


@needs_brainsfit
def test_bspline_run_writes_a_composite_whose_field_on_the_fixed_grid_is_returned_exactly(
        real_brainsfit, icbm4, tmp_path):
    case = make_case(icbm4["t1"], icbm4["t1"], seed=5, rotation_deg=6.0, translation_mm=6.0, warp_mm=3.0)
    mask = head(case.fixed)
    preset = Preset("bf-bspline", "brainsfit", "deformable", dict(CATALOG["brainsfit-bspline"].params,
                                                                  spline_grid_size=[5, 5, 5]))
    out, written = run_in(preset, case, tmp_path / "work")
    parts = sitk.CompositeTransform(written)
    kinds = [parts.GetNthTransform(i).GetName() for i in range(parts.GetNumberOfTransforms())]
    assert kinds == ["AffineTransform", "BSplineTransform"]  # the bulk affine, then the B-spline applied first
    assert out.transform.GetName() == "DisplacementFieldTransform"
    field = sitk.DisplacementFieldTransform(out.transform).GetDisplacementField()
    assert field.GetSize() == case.fixed.size
    points = grid_points(case.fixed)
    assert_same_map(out.transform, written, points, 1e-4)  # exact at the voxel centres it was sampled on
    saved = sitk.ReadTransform(str(write_transform(out.transform, tmp_path)))
    assert_same_map(saved, written, points, 1e-4)
    before = initial_error_mm(case, mask)
    assert before > 6.0 and point_error_mm(case, out.transform, mask) < VOXEL_MM / 2


@needs_brainsfit
def test_oblique_fixed_and_anisotropic_moving_register(real_brainsfit, icbm4, tmp_path):
    t1 = icbm4["t1"]
    angle = np.deg2rad(20.0)
    c, s = np.cos(angle), np.sin(angle)
    oblique = np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]]) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    centre = t1.physical_points(np.array([[(n - 1) / 2 for n in t1.size]]))[0]
    size = np.array(t1.size) + 8  # room for the rotated head

    def grid(spacing):
        extent = (size * 4.0 / np.array(spacing)).astype(int)
        origin = centre - oblique @ ((extent - 1) * np.array(spacing) / 2)
        return Image(np.zeros(tuple(reversed(extent)), np.uint8), tuple(spacing), tuple(origin), oblique)

    fixed = resample_to_grid(t1, grid((4.0, 4.0, 4.0)))
    truth = random_misalignment(fixed, seed=8, rotation_deg=8.0, translation_mm=8.0)
    # Thick slices (2.5 x 2.5 x 7 mm) on an axis-aligned grid: another grid, spacing and orientation than fixed.
    moving_grid = Image(np.zeros((int(t1.size[2] * 4 / 7), int(t1.size[1] * 4 / 2.5), int(t1.size[0] * 4 / 2.5)),
                                 np.uint8), (2.5, 2.5, 7.0), t1.origin_mm, t1.direction)
    moving = resample_to_grid(icbm4["t2"], moving_grid, truth)
    case = Case(fixed, moving, truth, None, "oblique fixed, anisotropic moving")
    mask = head(fixed)
    out = get_backend("brainsfit").run(CATALOG["brainsfit-rigid"], fixed, moving, tmp_path / "work", threads=2)
    assert initial_error_mm(case, mask) > 6.0
    assert point_error_mm(case, out.transform, mask) < VOXEL_MM / 2


@needs_brainsfit
def test_paths_with_spaces_and_non_ascii_letters_work(real_brainsfit, rigid_case4, tmp_path, monkeypatch):
    bindir = tmp_path / "Program Files" / "Slicer 5 (BRAINS)"
    bindir.mkdir(parents=True)
    (bindir / "BRAINSFit").symlink_to(EXE)
    monkeypatch.setenv(bf.ENV_EXECUTABLE, str(bindir / "BRAINSFit"))
    work = tmp_path / "my scans; $HOME" / "Zürich 'case' 1"
    out = get_backend("brainsfit").run(CATALOG["brainsfit-rigid"], rigid_case4.fixed, rigid_case4.moving, work,
                                       threads=2)
    assert point_error_mm(rigid_case4, out.transform, head(rigid_case4.fixed)) < VOXEL_MM / 2


@needs_brainsfit
def test_a_2d_pair_makes_brainsfit_unavailable_and_the_others_still_register(real_brainsfit):
    t1 = load_icbm("t1", 4.0)
    mid = t1.array.shape[0] // 2
    fixed = Image(t1.array[mid].astype(np.float32), t1.spacing_mm[:2], t1.origin_mm[:2], t1.direction[:2, :2])
    case = make_case(fixed, fixed, seed=2, rotation_deg=10.0, translation_mm=6.0)
    with pytest.raises(BackendUnavailable, match="3D images only"):
        get_backend("brainsfit").run(CATALOG["brainsfit-rigid"], case.fixed, case.moving)
    result = auto_register(case.fixed, case.moving, fixed_modality="T1", moving_modality="T1",
                           presets=["brainsfit-rigid", "sitk-rigid"], jobs=2, timeout_s=120)
    by_name = {c.name: c for c in result.candidates}
    assert by_name["brainsfit-rigid"].status == "unavailable"
    assert "3D images only" in by_name["brainsfit-rigid"].error
    assert result.best.name == "sitk-rigid"


@needs_brainsfit
def test_brainsfit_races_and_is_scored_like_every_other_backend(real_brainsfit, rigid_case4):
    result = auto_register(rigid_case4.fixed, rigid_case4.moving, fixed_modality="T1", moving_modality="T2",
                           presets=["brainsfit-rigid", "sitk-rigid"], jobs=2, timeout_s=120)
    by_name = {c.name: c for c in result.candidates}
    assert by_name["brainsfit-rigid"].status == "ok" and by_name["brainsfit-rigid"].score > 0
    assert point_error_mm(rigid_case4, by_name["brainsfit-rigid"].transform, head(rigid_case4.fixed)) < VOXEL_MM / 2


# --- faked executables -------------------------------------------------------------------------

FAKE = """\
#!{python}
# A stand-in for BRAINSFit: answers --version, logs its arguments and environment, then misbehaves.
import json, os, signal, sys, time
args = sys.argv[1:]
if args == ["--version"]:
    print("BRAINSFit version: 0.0-fake")
    sys.exit(0)
json.dump({{"args": args, "env": dict(os.environ), "pid": os.getpid()}},
          open(os.path.join({log!r}, "call-%d.json" % os.getpid()), "w"))
chain = args[args.index("--transformType") + 1]
if chain == "Rigid":
    print("about to crash", flush=True)
    os.kill(os.getpid(), signal.SIGSEGV)
time.sleep(600)  # hangs: only a kill ends it
"""


def fake(tmp_path: Path, script: str = FAKE) -> tuple[Path, Path]:
    """Write an executable script standing in for BRAINSFit; return it and the folder it logs calls into."""
    log = tmp_path / "calls"
    log.mkdir()
    exe = tmp_path / "fake bin" / "BRAINSFit"
    exe.parent.mkdir()
    exe.write_text(textwrap.dedent(script).format(python=sys.executable, log=str(log)))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe, log


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie awaiting its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to see that the fake was killed")
def test_a_crashing_and_a_hung_brainsfit_are_reported_and_killed_while_the_others_finish(
        monkeypatch, rigid_case4, tmp_path):
    exe, log = fake(tmp_path)
    monkeypatch.setenv(bf.ENV_EXECUTABLE, str(exe))
    monkeypatch.setenv("ITK_AUTOLOAD_PATH", str(tmp_path / "plugins of another ITK"))
    result = auto_register(rigid_case4.fixed, rigid_case4.moving, fixed_modality="T1", moving_modality="T2",
                           presets=["brainsfit-rigid", "brainsfit-affine", "sitk-rigid"], jobs=2, timeout_s=6)
    by_name = {c.name: c for c in result.candidates}
    crashed, hung = by_name["brainsfit-rigid"], by_name["brainsfit-affine"]
    assert crashed.status == "failed" and "killed by SIGSEGV" in crashed.error and "about to crash" in crashed.error
    assert hung.status == "timeout" and "timed out after 6 s" in hung.error
    assert by_name["sitk-rigid"].status == "ok" and result.best.name == "sitk-rigid"
    calls = [json.loads(p.read_text()) for p in log.glob("call-*.json")]
    assert len(calls) == 2
    for call in calls:
        assert "ITK_AUTOLOAD_PATH" not in call["env"]  # cleared, as Slicer does for its CLIs
        assert call["env"]["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] == call["args"][call["args"].index(
            "--numberOfThreads") + 1]
    deadline = time.monotonic() + 5
    while any(alive(c["pid"]) for c in calls) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(c["pid"]) for c in calls), "a BRAINSFit process outlived its preset"


def test_an_executable_that_cannot_start_makes_brainsfit_unavailable_with_its_message(monkeypatch, tmp_path):
    exe, _ = fake(tmp_path, """\
        #!/bin/sh
        echo "{python}: error while loading shared libraries: libITKCommon-5.2.so.1: cannot open shared object file" >&2
        exit 127
        """)
    monkeypatch.setenv(bf.ENV_EXECUTABLE, str(exe))
    ok, reason = get_backend("brainsfit").availability()
    assert not ok
    assert "cannot run (exit code 127)" in reason and "libITKCommon-5.2.so.1" in reason

