"""Rescue and reach, end to end through `auto_register` on real 4 mm heads with ground truth: a head turned
180° registers and is said; a slab inside the head registers (no preset refused or failed for its small
field of view); the race's masks are where the backends need them."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("ants")

from AutoRegisterDev.data import covered_by_moving, point_error_mm, rotated_case, slab_case  # noqa: E402
from AutoRegisterLib.events import Status  # noqa: E402
from AutoRegisterLib.image import reach_mask  # noqa: E402
from AutoRegisterLib.pipeline import auto_register  # noqa: E402
from AutoRegisterLib.race import race_masks  # noqa: E402
from AutoRegisterLib.report import write_outputs  # noqa: E402
from AutoRegisterLib.scoring import head_mask  # noqa: E402


def test_a_head_turned_180_degrees_registers_and_is_said(icbm4, tmp_path):
    case, _ = rotated_case(icbm4["t2"], icbm4["t1"], axis=2, angle_deg=180.0, seed=4)
    head = head_mask(case.fixed, "T1")
    result = auto_register(case.fixed, case.moving, fixed_modality="T1", moving_modality="T2",
                           presets=["ants-rigid", "sitk-rigid"])
    assert result.best is not None
    assert point_error_mm(case, result.best.transform, head) < 2.5  # > 100 mm from the header
    assert result.pose["applied"] and result.pose["axis"] == "vertical"
    assert any("rotated" in w and "vertical" in w for w in result.warnings)
    write_outputs(result, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "result.json").read_text())
    assert written["pose"]["applied"] and written["warnings"] == result.warnings
    without = auto_register(case.fixed, case.moving, fixed_modality="T1", moving_modality="T2",
                            presets=["ants-rigid"], pose_search=False)
    assert without.pose == {} and without.warnings == []
    assert point_error_mm(case, without.best.transform, head) > 20.0  # what the button did before


def test_a_slab_inside_the_head_registers(icbm4):
    case = slab_case(icbm4["t1"], icbm4["t1"], 40.0, seed=2)
    region = covered_by_moving(case, head_mask(case.fixed, "T1"))
    result = auto_register(case.fixed, case.moving, fixed_modality="T1", moving_modality="T1",
                           presets=["ants-rigid", "sitk-rigid"], output_grid="union")
    statuses = {c.name: c.status for c in result.candidates}
    assert statuses == {"ants-rigid": Status.OK, "sitk-rigid": Status.OK}, statuses
    assert point_error_mm(case, result.best.transform, region) < 1.5
    assert result.best.coverage > 0.8  # judged against what a 40 mm slab can cover
    # The union grid holds the fixed grid and the slab's turned corners that reach beyond it.
    out, fixed = result.output, result.fixed
    assert out is not None and out.spacing_mm == fixed.spacing_mm
    assert all(o >= f for o, f in zip(out.array.shape, fixed.array.shape)) and out.array.size > fixed.array.size


def test_the_backends_fixed_mask_is_where_the_moving_image_reaches(icbm4):
    t1 = icbm4["t1"]
    case = slab_case(t1, t1, 40.0, seed=2)
    masks = race_masks(case.fixed, case.moving)
    reach = reach_mask(case.moving, case.fixed, 10.0)
    assert set(masks) == {"fixed"} and np.array_equal(masks["fixed"].array > 0, reach)
    assert 0.2 < reach.mean() < 0.6
    assert race_masks(t1, t1) == {}  # a whole head: no mask, the backends run as before
    user = np.zeros(t1.array.shape, bool)
    user[10:30, 10:40, 10:40] = True
    both = race_masks(case.fixed, case.moving, fixed_mask=user, focus=user)
    assert np.array_equal(both["fixed"].array > 0, user & reach)
    assert np.array_equal(both["user fixed"].array > 0, user) and np.array_equal(both["focus"].array > 0, user)
    grown = both["focus registration"].array > 0  # the focus preset's mask: the focus and 20 mm around it
    assert (grown & user).sum() == user.sum() and grown.sum() > 2 * user.sum()
    assert not grown[10:30, 10:40, 0].any() and grown[10:30, 10:40, 6].all()  # 4 mm voxels: 5 of them, not 6
