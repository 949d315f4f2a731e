"""The trust verdict (AutoRegisterLib/trust.py): second opinions measured right, failed and disqualified
candidates kept out, the calibration's interval and lights, words for where, and a red verdict's exit 4."""

from __future__ import annotations

import json

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")

from AutoRegisterLib.events import Status  # noqa: E402
from AutoRegisterLib.image import Image  # noqa: E402
from AutoRegisterLib.presets import Table  # noqa: E402
from AutoRegisterLib.results import Candidate, RegistrationResult  # noqa: E402
from AutoRegisterLib.trust import Calibration, Signals, Verdict, _where, fit, headline, signals, verdict  # noqa: E402


def _shift(dx):
    return sitk.TranslationTransform(3, (float(dx), 0.0, 0.0))


def _result(icbm4, others):
    """A result whose winner is the identity and whose other candidates are (status, backend, dx) shifts."""
    best = Candidate("win", "ants", "rigid", Status.OK, score=0.8, coverage=1.0, transform=_shift(0.0))
    cands = [best]
    for i, (status, backend, dx) in enumerate(others):
        c = Candidate(f"c{i}", backend, "rigid", status, score=0.7, coverage=1.0)
        if status == Status.ELIMINATED:
            c.coarse_transform = _shift(dx)
        elif dx is not None:
            c.transform = _shift(dx)
        cands.append(c)
    table = Table("t", "T1", "T2", ())
    return RegistrationResult(cands, best, icbm4["t1"], None, "T1", "T2", table)


def test_signals_measure_the_second_opinions_and_ignore_failed_ones(icbm4):
    result = _result(icbm4, [(Status.OK, "elastix", 1.0), (Status.ELIMINATED, "ants", 4.0),
                             (Status.OK, "simpleitk", 9.0), (Status.FAILED, "brainsfit", None),
                             (Status.DISQUALIFIED, "elastix", 50.0)])
    sig, disagreement = signals(result)
    assert sig.opinions == 3 and sig.backends == 2
    assert sig.nearest_mm == pytest.approx(1.0, abs=1e-6)
    assert sig.nearest_other_mm == pytest.approx(1.0, abs=1e-6)  # elastix, another toolkit
    assert sig.median_mm == pytest.approx(4.0, abs=1e-6)
    assert np.nanmax(disagreement.array) == pytest.approx(4.0, abs=1e-5)  # per voxel: median of 1, 4, 9
    assert (disagreement.array == -1.0).any()  # outside the head: a value no disagreement takes
    assert sig.margin == pytest.approx((0.8 - 0.7) / 0.8)


def test_a_single_survivor_still_gets_a_verdict_with_a_wide_interval_and_says_why(icbm4):
    result = _result(icbm4, [(Status.FAILED, "elastix", None)])
    sig, disagreement = signals(result)
    assert sig.opinions == 0 and disagreement is None
    cal = Calibration([0.0, 0.0, 0.0, 0.0], -0.5, 0.5, [0.0, 0.0], -1.5, 1.5)
    v = verdict(result, cal)
    assert v.light == "amber"  # never green without a second opinion
    assert "only one candidate" in v.reason
    assert v.high_mm / v.low_mm == pytest.approx(np.exp(3.0))


def test_lights_follow_the_calibrated_bounds(icbm4):
    agree = _result(icbm4, [(Status.OK, "elastix", 0.2), (Status.OK, "simpleitk", 0.3)])
    disagree = _result(icbm4, [(Status.OK, "elastix", 12.0), (Status.OK, "simpleitk", 30.0)])
    # error = nearest credible disagreement (in mm), interval x/÷ 1.5
    cal = Calibration([0.0, 1.0, 0.0, 0.0], -np.log(1.5), np.log(1.5), [0.0, 0.0], -2.0, 2.0,
                      green_max_mm=1.0, red_min_mm=3.0)
    good, bad = verdict(agree, cal), verdict(disagree, cal)
    assert good.light == "green" and good.estimate_mm == pytest.approx(0.2, rel=1e-3)
    assert bad.light == "red" and bad.estimate_mm == pytest.approx(12.0, rel=1e-3)
    assert "disagree" in bad.reason
    assert bad.to_dict()["light"] == "red" and json.dumps(bad.to_dict())


def _signals(nearest: float, score: float = 0.5) -> Signals:
    return Signals(2, 1, nearest, nearest, 2 * nearest, 4 * nearest, score, 1.0, 0.1, credible=2,
                   credible_nearest_mm=nearest, credible_median_mm=2 * nearest, agree=float(nearest <= 2.0))


def test_fit_recovers_a_log_linear_relation_and_its_spread():
    rng = np.random.default_rng(0)
    sigs, errors = [], []
    for _ in range(200):
        nearest = float(np.exp(rng.uniform(-2, 4)))
        sigs.append(_signals(nearest))
        errors.append(0.8 * nearest * float(np.exp(rng.normal(0, 0.2))))
    cal = fit(sigs, errors)
    est, low, high = cal.interval(_signals(5.0))
    assert est == pytest.approx(4.0, rel=0.1)
    assert low < est < high and np.log(high / low) == pytest.approx(2 * 1.645 * 0.2, rel=0.25)
    inside = np.mean([lo <= e <= hi for s, e in zip(sigs, errors) for _, lo, hi in [cal.interval(s)]])
    assert 0.85 <= inside <= 0.95


def test_opinions_that_scored_far_below_the_winner_are_not_credible(icbm4):
    """The winner alone found the answer and every other candidate failed with a far lower score: their
    disagreement does not make the winner red; the verdict rests on the score, and says so."""
    result = _result(icbm4, [(Status.OK, "elastix", 60.0), (Status.OK, "simpleitk", 80.0)])
    for cand in result.candidates[1:]:
        cand.score = 0.3  # against the winner's 0.8
    sig, _ = signals(result)
    assert sig.opinions == 2 and sig.credible == 0 and sig.agree == 0.0
    cal = Calibration([0.0, 1.0, 0.0, 0.0], -0.5, 0.5, [np.log(1.5), 0.0], -1.0, 1.0, 1.0, 3.0)
    v = verdict(result, cal)
    assert v.estimate_mm == pytest.approx(1.5) and v.light == "amber"
    assert "no credible second opinion" in v.reason and v.disagreement is not None


def test_where_names_the_side_of_the_head():
    arr = np.zeros((20, 20, 20), np.float32)
    arr[8:12, 8:12, 17:19] = 6.0  # high x: LPS left
    grid = Image(arr, (5.0, 5.0, 5.0), (-50.0, -50.0, -50.0), np.eye(3))
    assert "left" in _where(grid, np.array([-2.5, -2.5, -2.5]))
    arr2 = np.zeros_like(arr)
    arr2[8:12, 1:3, 8:12] = 6.0  # low y: LPS anterior
    assert "front" in _where(grid.with_array(arr2), np.array([-2.5, -2.5, -2.5]))


def test_a_verdict_read_back_from_result_json_says_its_light_and_interval_in_one_line():
    """The words the CLI and the Slicer panel show, from result.json's "trust" (none: nothing to say)."""
    sig = Signals(1, 1, 0.4, 0.4, 0.4, 0.9, 0.9, 1.0, 0.1)
    written = json.loads(json.dumps(Verdict("green", 0.62, 0.31, 1.08, "they agree", sig).to_dict()))
    assert headline(written) == "GREEN: estimated error 0.6 mm (90 %: 0.3-1.1 mm)"
    assert headline({}) == "" and headline(None) == ""


def test_a_red_verdict_is_written_said_and_exits_4(rigid_case4, tmp_path):
    """The CLI never returns a red result quietly: outputs written, the verdict said, exit code 4."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from AutoRegisterLib.image import write_image

    pytest.importorskip("torch")
    fixed, moving = tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz"
    write_image(rigid_case4.fixed, fixed)
    write_image(rigid_case4.moving, moving)
    strict = tmp_path / "strict.json"
    shipped = Calibration([0.0, 1.0, 0.0, 0.0], -0.5, 0.5, [0.0, 0.0], -2.0, 2.0, 1.0, red_min_mm=-1.0)
    shipped.save(strict)  # every estimate is above -1 mm: red
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root), AUTOREGISTER_TRUST_CALIBRATION=str(strict))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "AutoRegisterLib", str(fixed), str(moving), "--out", str(out),
                           "--presets", "sitk-rigid,ants-rigid", "--quiet"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 4, proc.stderr
    assert "trust RED" in proc.stderr and "exit 4" in proc.stderr
    written = json.loads((out / "result.json").read_text())
    assert written["trust"]["light"] == "red" and written["best"] in ("sitk-rigid", "ants-rigid")
    assert any("trust verdict is red" in w for w in written["warnings"])
    assert (out / "disagreement.nii.gz").is_file() and (out / "transform.tfm").is_file()


def test_a_calibration_of_other_features_is_refused_and_the_result_still_returned(rigid_case4, tmp_path,
                                                                                    monkeypatch):
    from AutoRegisterLib.pipeline import auto_register
    from AutoRegisterLib.trust import CALIBRATION_ENV

    pytest.importorskip("torch")
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"coef": [0.0] * 5, "q_low": -1.0, "q_high": 1.0, "single_coef": [0.0] * 3,
                               "single_q_low": -1.0, "single_q_high": 1.0, "version": 1}))
    with pytest.raises(ValueError, match="feature version 1"):
        Calibration.load(old)
    monkeypatch.setenv(CALIBRATION_ENV, str(old))
    result = auto_register(rigid_case4.fixed, rigid_case4.moving, fixed_modality="T1", moving_modality="T2",
                           presets=["sitk-rigid"], pose_search=False)
    assert result.best is not None and result.trust is None
    assert any(w.startswith("no trust verdict: ValueError") and "refit" in w for w in result.warnings)
