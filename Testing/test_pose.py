"""The pose search (AutoRegisterLib/pose.py): moving the header is exact, poses compose with the presets'
transforms, far starts are found and said, near starts keep the header, and a mirror image is reported."""

from __future__ import annotations

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")
pytest.importorskip("torch")

from AutoRegisterDev.data import Case, point_error_mm, random_misalignment  # noqa: E402
from AutoRegisterLib.image import Image, resample_to_grid  # noqa: E402
from AutoRegisterLib.pose import (  # noqa: E402
    axis_name,
    cube_rotations,
    posed,
    rigid,
    rotation_angle_axis,
    search_pose,
    with_pose,
)
from AutoRegisterLib.scoring import head_mask  # noqa: E402
from AutoRegisterLib.transforms import linear_map  # noqa: E402


def _centre(image: Image) -> np.ndarray:
    head = head_mask(image, "T1")
    return image.physical_points(np.argwhere(head)[:, ::-1].mean(0)[None])[0]


def _rotated_case(source: Image, fixed: Image, axis: int, degrees: float, seed: int = 5) -> Case:
    """`source` turned `degrees` about an LPS axis through the head's centre (plus a small random pose), on a
    cube grid wide enough to hold the whole turned head."""
    c = _centre(fixed)
    side = float(np.linalg.norm(np.array(fixed.size) * np.array(fixed.spacing_mm))) * 0.8
    n = int(side / fixed.spacing_mm[0])
    grid = Image(np.zeros((n, n, n), np.uint8), fixed.spacing_mm, tuple(c - side / 2), np.eye(3))
    rot = sitk.Euler3DTransform()
    rot.SetCenter(tuple(c))
    angles = [0.0, 0.0, 0.0]
    angles[axis] = np.radians(degrees)
    rot.SetRotation(*angles)
    truth = sitk.CompositeTransform([random_misalignment(fixed, seed, rotation_deg=8.0, translation_mm=8.0), rot])
    return Case(fixed, resample_to_grid(source, grid, truth, "linear", 0.0), truth, None, f"{degrees} deg")


def test_cube_rotations_are_the_24_proper_ones():
    rots = cube_rotations()
    assert len(rots) == 24
    assert all(np.isclose(np.linalg.det(r), 1.0) and np.allclose(r @ r.T, np.eye(3)) for r in rots)
    assert len({tuple(r.ravel()) for r in rots}) == 24


def test_angle_axis_and_names():
    r = np.array(sitk.Euler3DTransform((0, 0, 0), 0.0, 0.0, np.pi).GetMatrix()).reshape(3, 3)
    angle, axis = rotation_angle_axis(r)
    assert angle == pytest.approx(180.0, abs=1e-6)
    assert axis_name(axis) == "vertical"
    assert axis_name(np.array([1.0, 0.0, 0.0])) == "left-right"
    assert axis_name(np.array([1.0, 1.0, 1.0]) / np.sqrt(3)).endswith("LPS")


def test_posed_header_is_the_pose_exactly(icbm4):
    """Resampling the posed image through the identity equals resampling the original through the pose."""
    t1 = icbm4["t1"]
    r = np.array(sitk.Euler3DTransform((0, 0, 0), 0.3, -1.2, 2.5).GetMatrix()).reshape(3, 3)
    pose = rigid(r, _centre(t1), _centre(t1) + np.array([7.0, -4.0, 11.0]))
    moved = posed(t1, pose)
    assert moved.array is t1.array  # voxels untouched: only the header moves
    via_header = resample_to_grid(moved, t1, None, "linear", 0.0).array
    via_transform = resample_to_grid(t1, t1, pose, "linear", 0.0).array
    assert np.abs(via_header - via_transform).max() < 1e-3 * float(t1.array.max())


def test_with_pose_composes_in_the_right_order(icbm4):
    t1 = icbm4["t1"]
    pose = rigid(np.array(sitk.Euler3DTransform((0, 0, 0), 0.0, 0.0, np.pi / 2).GetMatrix()).reshape(3, 3),
                 _centre(t1), _centre(t1) + 5.0)
    inner = sitk.AffineTransform(3)
    inner.SetMatrix((1.1, 0.0, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 1.0))
    inner.SetTranslation((2.0, -3.0, 1.0))
    total = with_pose(inner, pose)
    assert isinstance(total, sitk.AffineTransform)  # linear chains stay one affine (written as .tfm)
    p = (10.0, -20.0, 30.0)
    assert np.allclose(total.TransformPoint(p), pose.TransformPoint(inner.TransformPoint(p)))
    field = sitk.DisplacementFieldTransform(sitk.Image([8, 8, 8], sitk.sitkVectorFloat64, 3))
    deformable = with_pose(field, pose)
    assert np.allclose(deformable.TransformPoint(p), pose.TransformPoint(p))


@pytest.mark.parametrize("axis,degrees", [(0, 90.0), (1, 135.0), (2, 180.0)])
def test_far_rotations_are_found_and_said(icbm4, axis, degrees):
    """T2 turned 90-180 degrees: the pose search starts within a few degrees and mm of the truth, and says so."""
    case = _rotated_case(icbm4["t2"], icbm4["t1"], axis, degrees)
    found = search_pose(case.fixed, case.moving, "T1", "T2")
    assert found.transform is not None
    head = head_mask(case.fixed, "T1")
    assert point_error_mm(case, found.transform, head) < 6.0  # from > 100 mm
    residual, _ = rotation_angle_axis(linear_map(sitk.CompositeTransform([case.truth, found.transform]))[0])
    assert residual < 6.0
    assert any("looks rotated" in w and axis_name(np.eye(3)[axis]) in w for w in found.warnings)
    assert found.best_score > found.header_score


def test_a_near_start_keeps_the_header(rigid_case4):
    """8 degrees / 8 mm apart: the presets handle that themselves, so the header stays the start."""
    found = search_pose(rigid_case4.fixed, rigid_case4.moving, "T1", "T2")
    assert found.transform is None and found.source == "header"
    assert found.warnings == []
    assert found.to_dict()["applied"] is False


def test_a_mirror_image_is_reported_never_applied(icbm4):
    """An asymmetric head and its left-right mirror image: the search says so and applies no reflection."""
    t1 = icbm4["t1"]
    arr = t1.array.astype(np.float32).copy()
    z, y, x = np.indices(arr.shape)
    zc, yc, xc = (np.array(arr.shape) * np.array([0.55, 0.5, 0.3])).astype(int)
    arr[(z - zc) ** 2 + (y - yc) ** 2 + (x - xc) ** 2 < 36] = 2.5 * arr.max()  # a bright mass on one side only
    fixed = t1.with_array(arr)
    mirrored = t1.with_array(np.ascontiguousarray(arr[:, :, ::-1]))
    found = search_pose(fixed, mirrored, "T1", "T1")
    assert any("mirrored" in w for w in found.warnings)
    assert found.mirror_score > found.best_score
    if found.transform is not None:
        assert np.linalg.det(linear_map(found.transform)[0]) > 0  # a proper rotation, never a reflection
    same = search_pose(fixed, fixed, "T1", "T1")
    assert not any("mirrored" in w for w in same.warnings)


def test_the_pose_score_is_the_scorers_lncc_squared():
    """The pose search's float64 SciPy LNCC² (no torch) equals `similarity.lncc` on the same masked inputs."""
    from scipy.ndimage import gaussian_filter

    from AutoRegisterLib.pose import FLAT_VARIANCE, lncc_squared
    from AutoRegisterLib.similarity import FLAT_VARIANCE as SCORER_FLAT_VARIANCE
    from AutoRegisterLib.similarity import lncc

    assert FLAT_VARIANCE == SCORER_FLAT_VARIANCE
    rng = np.random.default_rng(3)
    f = gaussian_filter(rng.normal(size=(18, 20, 22)), 1.5) * 300.0 + 1000.0
    m = 0.7 * f + gaussian_filter(rng.normal(size=f.shape), 1.0) * 40.0
    mask = np.zeros(f.shape, bool)
    mask[2:16, 3:18, 1:20] = True
    mask[5:8, 5:8, 5:8] = False
    for window in (3, 5):
        ours = lncc_squared(f, np.where(mask, m, 0.0), mask, window)
        theirs = float(lncc(f.astype(np.float32), np.where(mask, m, 0.0).astype(np.float32), window=window,
                            mask=mask.astype(np.float32), reduction="mean"))
        assert ours == pytest.approx(theirs, abs=2e-4)
        assert 0.2 < ours < 1.0
