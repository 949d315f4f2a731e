"""Physical sizing: presets register on working grids of their `grid_mm`, scores are taken on a grid of
`scoring.grid_mm`, and the coarse round on `racing.coarse_mm`; the outputs stay on the fixed grid."""

from __future__ import annotations

import json

import numpy as np
import pytest

from AutoRegisterDev.data import point_error_mm
from AutoRegisterLib.errors import InputError
from AutoRegisterLib.image import Image, coarsened, from_numpy
from AutoRegisterLib.pipeline import auto_register
from AutoRegisterLib.presets import TABLES_DIR, load_table
from AutoRegisterLib.report import write_outputs
from AutoRegisterLib.scoring import head_mask


def _ramp(spacing, size_xyz=(40, 30, 20)) -> Image:
    """A linear ramp in physical x on an oblique grid: any smoothing or resampling keeps its values."""
    direction = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    img = from_numpy(np.zeros(tuple(reversed(size_xyz)), np.float32), spacing, (5.0, -3.0, 7.0), direction)
    k, j, i = np.indices(img.array.shape)
    pts = img.physical_points(np.stack([i.ravel(), j.ravel(), k.ravel()], 1))
    return img.with_array(pts[:, 0].reshape(img.array.shape).astype(np.float32))


def _extent(img: Image) -> tuple[np.ndarray, np.ndarray]:
    """The physical corners of the outer voxel faces."""
    lo = img.physical_points(np.array([[-0.5] * 3]))[0]
    hi = img.physical_points(np.array([[n - 0.5 for n in img.size]]))[0]
    return lo, hi


def test_coarsened_keeps_the_extent_and_the_values_and_leaves_coarse_axes_alone():
    img = _ramp((1.0, 1.0, 5.0))
    out = coarsened(img, 2.0)
    assert out.spacing_mm == (2.0, 2.0, 5.0) and out.size == (20, 15, 20)
    for a, b in zip(_extent(img), _extent(out)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_array_equal(out.direction, img.direction)
    # Inside (away from the edges the smoothing sees), the ramp's value is its physical x.
    k, j, i = np.indices(out.array.shape)
    pts = out.physical_points(np.stack([i.ravel(), j.ravel(), k.ravel()], 1))[:, 0].reshape(out.array.shape)
    np.testing.assert_allclose(out.array[:, 3:-3, 3:-3], pts[:, 3:-3, 3:-3], atol=1e-3)
    assert coarsened(img, 0.5) is img  # never finer than the input
    thick = coarsened(img, (0.0, 0.0, 10.0))
    assert thick.spacing_mm == (1.0, 1.0, 10.0)


def _table(tmp_path, presets, scoring=None, racing=None, name="t.json"):
    raw = json.loads((TABLES_DIR / "T2_to_T1.json").read_text())
    raw.update(presets=presets, racing=racing)
    raw["scoring"].update(scoring or {})
    path = tmp_path / name
    path.write_text(json.dumps(raw))
    return path


def test_a_preset_registers_on_its_working_grid_and_its_transform_applies_at_full_resolution(rigid_case4, tmp_path):
    case = rigid_case4  # 4 mm
    syn = {"name": "syn-8mm", "backend": "ants", "transform_type": "deformable", "grid_mm": 8.0,
           "params": {"type_of_transform": "SyN"}}
    rigid = {"name": "rigid-8mm", "backend": "sitk", "transform_type": "rigid", "grid_mm": 8.0}
    # Sizing is under test, not the scorer: an 8 mm field read on the 4 mm scoring grid is piecewise linear
    # there, and its kinks can reach the bending limit (5.2e-4 in one run).
    result = auto_register(case.fixed, case.moving, fixed_modality="T1", moving_modality="T2",
                           table=_table(tmp_path, [syn, rigid], scoring={"max_bending": 0.0}))
    by_name = {c.name: c for c in result.candidates}
    assert all(c.status == "ok" for c in result.candidates), [c.error for c in result.candidates]
    # ANTs' field lies on the grid it registered: 8 mm voxels over the fixed image's extent.
    field = by_name["syn-8mm"].transform.GetNthTransform(0) if hasattr(by_name["syn-8mm"].transform,
                                                                          "GetNthTransform") else None
    disp = (field or by_name["syn-8mm"].transform).GetDisplacementField()
    assert disp.GetSpacing() == pytest.approx((8.0, 8.0, 8.0))
    head = head_mask(case.fixed, "T1")
    assert point_error_mm(case, by_name["rigid-8mm"].transform, head) < 3.0  # from about 15 mm, on 8 mm voxels
    assert result.best.warped.spacing_mm == case.fixed.spacing_mm


def test_scores_are_taken_on_the_scoring_grid_and_the_winners_image_on_the_fixed_grid(rigid_case4, tmp_path):
    case = rigid_case4
    table = _table(tmp_path, ["sitk-rigid", "ants-rigid"], scoring={"grid_mm": 8.0})
    result = auto_register(case.fixed, case.moving, fixed_modality="T1", moving_modality="T2", table=table)
    loser = next(c for c in result.candidates if c is not result.best)
    assert loser.warped.spacing_mm == (8.0, 8.0, 8.0)
    assert result.best.warped.array.shape == case.fixed.array.shape
    native = auto_register(case.fixed, case.moving, fixed_modality="T1", moving_modality="T2",
                           table=_table(tmp_path, ["sitk-rigid", "ants-rigid"], name="native.json"))
    # Another grid, another score: the setting is honoured, not ignored.
    assert {c.name: round(c.score, 6) for c in result.candidates} != {c.name: round(c.score, 6)
                                                                        for c in native.candidates}
    out = write_outputs(result, tmp_path / "out", keep_all=True)
    assert (out / "report.png").exists() and (out / "warped.nii.gz").exists()


@pytest.mark.parametrize("change, field", [
    ({"scoring": {"grid_mm": -1}}, "scoring.grid_mm"),
    ({"scoring": {"grid_mm": "2"}}, "scoring.grid_mm"),
    ({"racing": {"keep": 1, "coarse_mm": 50}}, "racing.coarse_mm"),
    ({"presets": [{"name": "x", "backend": "sitk", "transform_type": "rigid", "grid_mm": True}]}, "presets[0].grid_mm"),
])
def test_bad_physical_sizes_name_the_field(tmp_path, change, field):
    raw = json.loads((TABLES_DIR / "T2_to_T1.json").read_text())
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key].update(value)
        else:
            raw[key] = value
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(InputError, match=field.replace("[", r"\[").replace("]", r"\]")):
        load_table(path)


def test_elastix_default_maps_are_elastixs_own():
    from AutoRegisterLib.backends.elastix import default_parameter_map

    bspline = default_parameter_map("bspline")
    assert bspline["Transform"] == ["BSplineTransform"] and bspline["FinalGridSpacingInPhysicalUnits"] == ["10.000000"]
    assert "TransformBendingEnergyPenalty" in bspline["Metric"] and bspline["WriteResultImage"] == ["false"]
