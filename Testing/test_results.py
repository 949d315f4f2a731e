"""A run's result survives its JSON form: result.json read back gives the same candidates, statuses and
settings, and `read_outputs` is the inverse of `write_outputs`."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import SimpleITK as sitk

from AutoRegisterLib.events import Status
from AutoRegisterLib.image import from_numpy
from AutoRegisterLib.presets import find_table, require_catalog_names
from AutoRegisterLib.report import write_outputs
from AutoRegisterLib.results import Candidate, RegistrationResult, read_outputs


def _result() -> RegistrationResult:
    image = from_numpy(np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6), (2.0, 2.0, 2.0))
    # A result's candidates are its table's presets, in the table's order.
    table = replace(find_table("T1", "T2"),
                    presets=tuple(require_catalog_names(["ants-syn", "sitk-rigid", "ants-affine"])))
    best = Candidate("sitk-rigid", "sitk", "rigid", Status.OK, score=0.81, lncc=0.83, zncc=0.9, zncc_local=0.7,
                     mi=0.5, coverage=0.97, folding_fraction=0.0, min_jacobian=1.0, seconds=2.5, score_seconds=0.1,
                     transform=sitk.Euler3DTransform(), warped=image)
    failed = Candidate("ants-syn", "ants", "deformable", Status.FAILED, seconds=1.0, error="RuntimeError: boom")
    eliminated = Candidate("ants-affine", "ants", "affine", Status.ELIMINATED, score=0.5, seconds=1.0,
                           error="eliminated in the coarse round (score 0.5000)")
    return RegistrationResult([failed, best, eliminated], best, image, image, "T1", "T2", table, wall_seconds=9.0,
                              inputs={"fixed": "f.nii.gz", "moving": "m.nii.gz", "device": "cpu", "jobs": 2,
                                      "racing": table.racing.to_dict()}, scorer_setup_seconds=1.5)


def test_a_result_read_back_from_its_json_form_writes_the_same_json():
    result = _result()
    written = json.loads(json.dumps(result.to_dict()))
    again = RegistrationResult.from_dict(written)
    assert again.to_dict() == written
    assert [c.status for c in again.candidates] == [Status.FAILED, Status.OK, Status.ELIMINATED]
    assert again.best.name == "sitk-rigid" and again.best.score == 0.81
    assert again.table.scoring == result.table.scoring and again.fixed is None


def test_read_outputs_is_the_inverse_of_write_outputs(tmp_path):
    result = _result()
    write_outputs(result, tmp_path / "out")
    outputs = read_outputs(tmp_path / "out", 0)
    assert outputs.ok and outputs.best.name == "sitk-rigid" and outputs.best.status == Status.OK
    assert [c.name for c in outputs.candidates] == [c.name for c in result.candidates]
    summary = dict(outputs.summary)
    summary.pop("report")  # added by write_outputs: report.png, or why it was skipped
    assert outputs.result.to_dict() == summary
    assert outputs.read_transform().GetParameters() == result.best.transform.GetParameters()
    assert outputs.warped_path is not None
    assert read_outputs(tmp_path / "nothing").candidates == []
