"""User masks reach every backend: a fixed or moving mask decides which of two structures that moved apart a
rigid registration follows, with every installed backend, and masks travel through the worker's spec files.

The pair: two bright blobs 48 mm apart; in the moving image the left blob (physical x < 0) moved by +D mm
along x and the right one by -D mm, so no rigid transform fits both. A mask over one half makes the metric see
one blob only, and the transform (fixed points -> moving points) must then move that blob's centre by its
own shift. The grid's direction flips x and y, so a mask that lost its geometry would sit over the other blob.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AutoRegisterLib.backends import brainsfit as bf
from AutoRegisterLib.backends import get_backend
from AutoRegisterLib.backends.base import binary_mask
from AutoRegisterLib.errors import InputError
from AutoRegisterLib.events import Status
from AutoRegisterLib.image import Image, read_image, write_image
from AutoRegisterLib.presets import load_catalog
from AutoRegisterLib.runner import Job, Runner
from AutoRegisterLib.worker import run_spec

ROOT = Path(__file__).resolve().parents[1]
CATALOG = load_catalog()
SPACING_MM = 2.0
SHAPE_ZYX = (30, 30, 50)
DIRECTION = np.diag([-1.0, -1.0, 1.0])  # LPS axes flipped in x and y, as in a RAS-stored volume
BLOB_X_MM = 24.0  # blob centres at x = -24 (left) and +24 (right)
SHIFT_MM = 5.0
TOLERANCE_MM = 1.0
#: The rigid preset each backend races with.
RIGID = {"sitk": "sitk-rigid", "ants": "ants-rigid", "elastix": "elastix-rigid", "brainsfit": "brainsfit-rigid",
         "greedy": "greedy-rigid"}
SIDE_SIGN = {"left": -1.0, "right": 1.0}


def brainsfit_executable() -> str | None:
    """A BRAINSFit that runs here ($AUTOREGISTER_BRAINSFIT, else ../shared/bin/BRAINSFit), or None."""
    exe = os.environ.get(bf.ENV_EXECUTABLE) or str(ROOT.parent / "shared" / "bin" / "BRAINSFit")
    return None if bf.probe(exe) else exe


@pytest.fixture
def backend(request, monkeypatch):
    """The backend named by the test's parameter; skips, with the reason, when it cannot run here."""
    name = request.param
    if name == "brainsfit" and (exe := brainsfit_executable()):
        monkeypatch.setenv(bf.ENV_EXECUTABLE, exe)
    ok, reason = get_backend(name).availability()
    if not ok:
        pytest.skip(f"{name} unavailable: {reason}")
    return get_backend(name)


def grid_image(array: np.ndarray) -> Image:
    """`array` on the test grid: 2 mm voxels, x and y flipped, centred on the physical origin."""
    centre_offset = np.array([(n - 1) / 2 * SPACING_MM for n in reversed(SHAPE_ZYX)])
    return Image(array, (SPACING_MM,) * 3, tuple(-DIRECTION @ centre_offset), DIRECTION)


def physical_xyz() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Physical x, y, z (LPS, mm) of every voxel centre, each an array in (z, y, x) order."""
    grid = grid_image(np.zeros(SHAPE_ZYX, np.uint8))
    k, j, i = np.indices(SHAPE_ZYX)
    points = grid.physical_points(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1))
    return tuple(points[:, axis].reshape(SHAPE_ZYX) for axis in range(3))


def blob(centre_x_mm: float) -> np.ndarray:
    """An ellipsoidal Gaussian blob centred at (centre_x_mm, 0, 0)."""
    x, y, z = physical_xyz()
    return np.exp(-0.5 * (((x - centre_x_mm) / 4.0) ** 2 + (y / 6.0) ** 2 + (z / 5.0) ** 2))


@pytest.fixture(scope="module")
def pair() -> dict:
    """Fixed and moving images (the blobs moved apart as the module docstring says) and half-space masks, the
    left one uint8 and the right one float32, as mask files may hold either."""
    x = physical_xyz()[0]
    fixed = blob(-BLOB_X_MM) + 0.6 * blob(BLOB_X_MM)
    moving = blob(-BLOB_X_MM + SHIFT_MM) + 0.6 * blob(BLOB_X_MM - SHIFT_MM)
    return {"fixed": grid_image(fixed.astype(np.float32)), "moving": grid_image(moving.astype(np.float32)),
            "left": grid_image((x < 0).astype(np.uint8)), "right": grid_image((x > 0).astype(np.float32))}


def shift_at_blob(transform, side: str) -> np.ndarray:
    """Where the transform moves the fixed blob centre on `side`, minus that centre (mm, LPS)."""
    centre = np.array([SIDE_SIGN[side] * BLOB_X_MM, 0.0, 0.0])
    return np.asarray(transform.TransformPoint(tuple(centre))) - centre


def own_shift(side: str) -> np.ndarray:
    """The shift the moving image gave the blob on `side`: +D along x for the left one, -D for the right."""
    return np.array([-SIDE_SIGN[side] * SHIFT_MM, 0.0, 0.0])


# --- each backend follows the masked blob -----------------------------------------------------

@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("backend", list(RIGID), indirect=True)
def test_a_fixed_mask_over_one_blob_makes_the_rigid_registration_follow_that_blob(backend, side, pair, tmp_path):
    transform = backend.estimate(CATALOG[RIGID[backend.name]], pair["fixed"], pair["moving"], tmp_path, 2,
                                 fixed_mask=pair[side])
    error = np.linalg.norm(shift_at_blob(transform, side) - own_shift(side))
    assert error < TOLERANCE_MM, f"{backend.name}: blob on the {side} moved by {shift_at_blob(transform, side)}"


@pytest.mark.parametrize("backend", list(RIGID), indirect=True)
def test_a_moving_mask_that_hides_the_left_blob_makes_the_registration_follow_the_right_one(backend, pair, tmp_path):
    # The moving image's right half: its left blob is invisible to the metric, wherever the fixed samples fall.
    transform = backend.estimate(CATALOG[RIGID[backend.name]], pair["fixed"], pair["moving"], tmp_path, 2,
                                 moving_mask=pair["right"])
    error = np.linalg.norm(shift_at_blob(transform, "right") - own_shift("right"))
    assert error < TOLERANCE_MM, f"{backend.name}: right blob moved by {shift_at_blob(transform, 'right')}"


def test_run_passes_both_masks_on_and_warps_the_followed_blob_into_place(pair):
    out = get_backend("sitk").run(CATALOG["sitk-rigid"], pair["fixed"], pair["moving"], threads=2,
                      fixed_mask=pair["left"], moving_mask=pair["left"])
    assert np.linalg.norm(shift_at_blob(out.transform, "left") - own_shift("left")) < TOLERANCE_MM
    left = pair["left"].array.astype(bool)
    fixed, warped = pair["fixed"].array, out.warped.array
    assert np.abs(warped - fixed)[left].max() < 0.1 < np.abs(warped - fixed)[~left].max()


# --- what the backends are given -------------------------------------------------------------

def test_a_mask_becomes_zero_or_one_and_nonzero_finite_voxels_are_inside(pair):
    values = np.zeros(SHAPE_ZYX, np.float32)
    values[0, 0, :4] = [0.5, -2.0, 300.0, np.nan]
    mask = binary_mask(grid_image(values), pair["fixed"], "fixed mask")
    assert mask.array.dtype == np.uint8 and mask.same_grid(pair["fixed"])
    assert mask.array[0, 0, :5].tolist() == [1, 1, 1, 0, 0] and mask.array.sum() == 3
    assert binary_mask(None, pair["fixed"], "fixed mask") is None


def test_a_mask_off_its_image_grid_or_without_a_voxel_inside_is_a_user_error_naming_it(pair):
    shifted = Image(pair["left"].array, (SPACING_MM,) * 3, (0.0, 0.0, 0.0), DIRECTION)
    with pytest.raises(InputError, match="moving mask is not on its image's grid"):
        binary_mask(shifted, pair["moving"], "moving mask")
    with pytest.raises(InputError, match="fixed mask has no voxel inside"):
        binary_mask(grid_image(np.zeros(SHAPE_ZYX, np.uint8)), pair["fixed"], "fixed mask")


def test_brainsfit_gets_mask_files_in_roi_mode_which_replaces_the_presets_roiauto(tmp_path):
    preset = CATALOG["brainsfit-rigid"]
    assert preset.params["mask_processing_mode"] == "ROIAUTO"
    paths = [tmp_path / name for name in ("f.mha", "m.mha", "t.h5", "fm.mha", "mm.mha")]
    backend = get_backend("brainsfit")

    def options(cmd: list) -> dict:
        return {cmd[i]: cmd[i + 1] for i in range(1, len(cmd) - 1) if cmd[i].startswith("--")}

    both = options(backend.command(preset, "BRAINSFit", *paths[:3], 1, fixed_mask_path=paths[3],
                                   moving_mask_path=paths[4]))
    assert both["--maskProcessingMode"] == "ROI"
    assert (both["--fixedBinaryVolume"], both["--movingBinaryVolume"]) == (str(paths[3]), str(paths[4]))
    fixed_only = options(backend.command(preset, "BRAINSFit", *paths[:3], 1, fixed_mask_path=paths[3]))
    assert fixed_only["--maskProcessingMode"] == "ROI" and "--movingBinaryVolume" not in fixed_only
    unmasked = options(backend.command(preset, "BRAINSFit", *paths[:3], 1))
    assert unmasked["--maskProcessingMode"] == "ROIAUTO" and "--fixedBinaryVolume" not in unmasked


def test_an_elastix_executable_gets_unchanged_mask_files_and_no_mask_erosion(pair, tmp_path, monkeypatch):
    from test_backends import FAKE_ELASTIX, FAKE_TRANSFORMIX

    for name, script in (("elastix", FAKE_ELASTIX), ("transformix", FAKE_TRANSFORMIX)):
        exe = tmp_path / name
        exe.write_text(textwrap.dedent(script).format(python=sys.executable, log=str(tmp_path / f"{name}.json")))
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("AUTOREGISTER_ELASTIX", str(tmp_path / "elastix"))
    get_backend("elastix").estimate(CATALOG["elastix-affine"], pair["fixed"], pair["moving"], tmp_path / "work", 1,
                                    fixed_mask=pair["left"], moving_mask=pair["right"])
    args = json.loads((tmp_path / "elastix.json").read_text())
    for option, side in (("-fMask", "left"), ("-mMask", "right")):
        written = read_image(args[args.index(option) + 1])
        assert written.array.dtype == np.uint8 and written.same_grid(pair[side])
        assert np.array_equal(written.array, pair[side].array != 0)
    parameter_files = [Path(args[i + 1]).read_text() for i, arg in enumerate(args) if arg == "-p"]
    assert len(parameter_files) == 2 and all('(ErodeMask "false")' in text for text in parameter_files)


# --- masks through the worker protocol --------------------------------------------------------

@pytest.fixture
def files(pair, tmp_path) -> dict:
    """The pair and its masks written as NRRD files."""
    paths = {name: tmp_path / f"{name}.nrrd" for name in pair}
    for name, path in paths.items():
        write_image(pair[name], path)
    return paths


def test_a_job_with_masks_reaches_the_worker_through_its_spec_file(files, tmp_path):
    done = {}
    jobs = [Job(CATALOG["sitk-rigid"], tmp_path / "fixed-right", files["fixed"], files["moving"],
                lambda p, status, folder: done.update(fixed_right=(status, folder)), fixed_mask_path=files["right"]),
            Job(CATALOG["sitk-rigid"], tmp_path / "moving-left", files["fixed"], files["moving"],
                lambda p, status, folder: done.update(moving_left=(status, folder)), moving_mask_path=files["left"])]
    with Runner(jobs=1, timeout_s=120, run_dir=tmp_path / "run", threads_per_job=2) as runner:
        runner.run(jobs)
    for key, side, spec_keys in (("fixed_right", "right", {"fixed_mask": str(files["right"]), "moving_mask": None}),
                                 ("moving_left", "left", {"fixed_mask": None, "moving_mask": str(files["left"])})):
        status, folder = done[key]
        assert status["status"] == Status.OK, status.get("error")
        spec = json.loads((folder / "spec.json").read_text())
        assert {k: spec[k] for k in spec_keys} == spec_keys
        transform = sitk.ReadTransform(str(folder / status["transform"]))
        assert np.linalg.norm(shift_at_blob(transform, side) - own_shift(side)) < TOLERANCE_MM


def test_a_spec_with_null_or_absent_mask_keys_runs_unmasked(files, tmp_path):
    spec = Job(CATALOG["sitk-rigid"], tmp_path / "a", files["fixed"], files["moving"], None).spec(threads=1)
    assert spec["fixed_mask"] is None and spec["moving_mask"] is None
    spec["out"] = str(tmp_path / "a")
    (tmp_path / "a").mkdir()
    null_keys = run_spec(json.loads(json.dumps(spec)))
    old = {k: v for k, v in spec.items() if k not in ("fixed_mask", "moving_mask")}
    old["out"] = str(tmp_path / "b")
    (tmp_path / "b").mkdir()
    absent_keys = run_spec(old)
    assert null_keys["status"] == absent_keys["status"] == Status.OK
    first, second = (sitk.ReadTransform(str(tmp_path / d / s["transform"])) for d, s in
                     (("a", null_keys), ("b", absent_keys)))
    assert np.allclose(first.GetParameters(), second.GetParameters())


def test_a_mask_file_on_another_grid_fails_its_preset_with_the_reason(files, pair, tmp_path):
    other = tmp_path / "other.nrrd"
    write_image(Image(pair["left"].array, (3.0,) * 3, (0.0,) * 3), other)
    (tmp_path / "out").mkdir()
    spec = Job(CATALOG["sitk-rigid"], tmp_path / "out", files["fixed"], files["moving"], None,
               fixed_mask_path=other).spec(threads=1)
    status = run_spec(spec)
    assert status["status"] == Status.FAILED and "fixed mask is not on its image's grid" in status["error"]
