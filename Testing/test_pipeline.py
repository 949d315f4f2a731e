"""The runner races presets in worker processes; failures, timeouts, kills and cancel stay contained."""

from __future__ import annotations

import json
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from worker_faults import HANGING, on_start

from AutoRegisterDev.data import point_error_mm
from AutoRegisterLib.errors import Cancelled
from AutoRegisterLib.pipeline import auto_register
from AutoRegisterLib.presets import TABLES_DIR
from AutoRegisterLib.scoring import head_mask

BROKEN = {"name": "broken", "backend": "sitk", "transform_type": "rigid", "params": {"iterations": "many"}}


def _table(tmp_path: Path, presets, name="t.json") -> Path:
    table = json.loads((TABLES_DIR / "T2_to_T1.json").read_text())
    table["presets"] = presets
    # Faults are exercised under racing, as with the built-in table's schedule before full_resolution.
    table["racing"] = {"coarse_shrink": 2, "keep": 2}
    path = tmp_path / name
    path.write_text(json.dumps(table))
    return path


def _our_temp_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("autoregister-*")}


def test_race_keeps_an_accurate_result_and_reports_every_measure(rigid_case4):
    case = rigid_case4
    events = []
    result = auto_register(case.fixed, case.moving, fixed_modality="T1", moving_modality="T2",
                           presets=["sitk-rigid", "ants-rigid", "ants-affine"], progress=events.append)
    assert result.best is not None
    head = head_mask(case.fixed, "T1")
    assert point_error_mm(case, result.best.transform, head) < 1.5  # 4 mm voxels, 8 mm / 8 degree start
    for c in result.candidates:
        assert c.status == "ok", c.error
        assert 0 < c.score <= 1 and 0 < c.coverage <= 1 and c.seconds > 0
        assert c.folding_fraction == 0.0
    assert {e["candidate"] for e in events if e["event"] == "finish"} == {"sitk-rigid", "ants-rigid", "ants-affine"}
    fractions = [e["fraction"] for e in events if e["event"] == "finish"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    json.dumps(result.to_dict())


def test_failing_and_timed_out_presets_do_not_stop_the_others(rigid_case4, tmp_path):
    case = rigid_case4
    before = _our_temp_dirs()
    table = _table(tmp_path, ["sitk-rigid", BROKEN, HANGING])
    t0 = time.perf_counter()
    result = auto_register(case.fixed, case.moving, table=table, timeout_s=8, jobs=2, progress=on_start("slow-syn"))
    by_name = {c.name: c for c in result.candidates}
    assert by_name["broken"].status == "failed" and "iterations" in by_name["broken"].error
    assert by_name["slow-syn"].status == "timeout" and "timed out after 8 s" in by_name["slow-syn"].error
    assert by_name["sitk-rigid"].status == "ok"
    assert result.best.name == "sitk-rigid"
    assert time.perf_counter() - t0 < 60
    assert not psutil.Process().children(recursive=True)
    assert _our_temp_dirs() == before


def test_a_killed_worker_is_reported_and_the_others_finish(rigid_case4, tmp_path):
    case = rigid_case4
    table = _table(tmp_path, ["sitk-rigid", HANGING])
    result = auto_register(case.fixed, case.moving, table=table, timeout_s=60, jobs=2,
                           progress=on_start("slow-syn", signum=signal.SIGKILL))
    by_name = {c.name: c for c in result.candidates}
    assert by_name["slow-syn"].status == "failed"
    assert "SIGKILL" in by_name["slow-syn"].error
    assert by_name["sitk-rigid"].status == "ok"


def test_cancel_kills_every_worker_and_leaves_no_temporary_files(rigid_case4, tmp_path):
    case = rigid_case4
    before = _our_temp_dirs()
    cancel = threading.Event()
    table = _table(tmp_path, [HANGING, dict(HANGING, name="slow-2")])
    threading.Timer(2.0, cancel.set).start()
    t0 = time.perf_counter()
    with pytest.raises(Cancelled):
        auto_register(case.fixed, case.moving, table=table, timeout_s=120, jobs=2, cancel=cancel,
                      progress=on_start("slow-syn", "slow-2"))
    assert time.perf_counter() - t0 < 10
    assert not psutil.Process().children(recursive=True)
    assert _our_temp_dirs() == before


def test_unavailable_backend_is_reported_and_does_not_run(rigid_case4, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("AUTOREGISTER_BRAINSFIT", raising=False)
    case = rigid_case4
    result = auto_register(case.fixed, case.moving, presets=["brainsfit-rigid", "sitk-rigid"])
    by_name = {c.name: c for c in result.candidates}
    assert by_name["brainsfit-rigid"].status == "unavailable"
    assert "BRAINSFit" in by_name["brainsfit-rigid"].error
    assert result.best.name == "sitk-rigid"


def test_inputs_are_never_modified(rigid_case4):
    case = rigid_case4
    fixed_before, moving_before = case.fixed.array.copy(), case.moving.array.copy()
    auto_register(case.fixed, case.moving, presets=["sitk-rigid"])
    assert np.array_equal(case.fixed.array, fixed_before) and np.array_equal(case.moving.array, moving_before)


def test_a_toolkit_is_loaded_by_one_worker_while_the_other_runs_the_rest(rigid_case4, monkeypatch):
    # Loading itk-elastix takes ~11 s: the second worker runs the other presets rather than load it too.
    # The runner does load it again once its holder has been busy for twice that; on a loaded machine the
    # holder's job alone can take that long, so the rule under test gets a load time no run here reaches.
    from AutoRegisterLib import runner

    monkeypatch.setitem(runner.TOOLKIT_LOAD_S, "elastix", 600.0)
    started = {}
    record = lambda e: started.__setitem__(e["candidate"], e["pid"]) if e["event"] == "start" else None  # noqa: E731
    result = auto_register(rigid_case4.fixed, rigid_case4.moving, jobs=2, progress=record,
                           presets=["elastix-rigid", "elastix-affine", "ants-rigid", "ants-affine", "sitk-rigid"])
    assert all(c.status == "ok" for c in result.candidates), [(c.name, c.error) for c in result.candidates]
    assert started["elastix-rigid"] == started["elastix-affine"]
    assert started["ants-rigid"] == started["ants-affine"] != started["elastix-rigid"]


def test_racing_continues_only_the_best_coarse_results_at_full_resolution(rigid_case4, tmp_path):
    case = rigid_case4
    names = ["sitk-rigid", "ants-rigid", "ants-affine", "ants-syn"]
    raw = json.loads((TABLES_DIR / "T2_to_T1.json").read_text())
    raw.update(presets=names, racing={"coarse_shrink": 2, "keep": 2})
    table = tmp_path / "racing.json"
    table.write_text(json.dumps(raw))
    events = []
    result = auto_register(case.fixed, case.moving, fixed_modality="T1", moving_modality="T2", table=table, jobs=2,
                           progress=events.append)
    (round_event,) = [e for e in events if e["event"] == "round"]
    kept = set(round_event["candidates"])
    assert len(kept) == 2
    by_name = {c.name: c for c in result.candidates}
    for name in names:
        if name in kept:
            assert by_name[name].status == "ok" and by_name[name].transform is not None
        else:
            assert by_name[name].status == "eliminated" and by_name[name].transform is None
            assert f"score {by_name[name].score:.4f}" in by_name[name].error
    # Every kept preset ran twice (coarse, then full); the winner is one of them, scored at full resolution.
    started = [e["candidate"] for e in events if e["event"] == "start"]
    assert all(started.count(n) == 2 for n in kept) and all(started.count(n) <= 2 for n in names)
    assert result.best.name in kept
    assert point_error_mm(case, result.best.transform, head_mask(case.fixed, "T1")) < 1.5
    assert result.to_dict()["inputs"]["racing"] == {"coarse_shrink": 2, "keep": 2, "full_resolution": [],
                                                   "coarse_mm": 0.0}


def test_a_full_resolution_preset_skips_the_coarse_round_and_is_always_kept(rigid_case4, tmp_path):
    case = rigid_case4
    names = ["sitk-rigid", "ants-rigid", "ants-affine", "ants-syn"]
    raw = json.loads((TABLES_DIR / "T2_to_T1.json").read_text())
    raw.update(presets=names, racing={"coarse_shrink": 2, "keep": 1, "full_resolution": ["sitk-rigid"]})
    table = tmp_path / "racing.json"
    table.write_text(json.dumps(raw))
    events = []
    result = auto_register(case.fixed, case.moving, fixed_modality="T1", moving_modality="T2", table=table, jobs=2,
                           progress=events.append)
    started = [e["candidate"] for e in events if e["event"] == "start"]
    assert started.count("sitk-rigid") == 1
    (round_event,) = [e for e in events if e["event"] == "round"]
    assert "sitk-rigid" in round_event["candidates"] and len(round_event["candidates"]) == 2
    by_name = {c.name: c for c in result.candidates}
    assert by_name["sitk-rigid"].status == "ok" and by_name["sitk-rigid"].transform is not None
    raced = [by_name[n] for n in names[1:]]
    assert sorted(c.status for c in raced) == ["eliminated", "eliminated", "ok"]
    assert all(started.count(c.name) == 2 for c in raced if c.status == "ok")


def test_a_table_without_head_mask_scores_over_the_whole_fixed_grid(rigid_case4, tmp_path):
    case = rigid_case4
    coverage = {}
    for mask in ("auto", "none"):
        raw = json.loads((TABLES_DIR / "T2_to_T1.json").read_text())
        raw.update(presets=["sitk-rigid"], racing=None)
        raw["scoring"]["head_mask"] = mask
        table = tmp_path / f"{mask}.json"
        table.write_text(json.dumps(raw))
        result = auto_register(case.fixed, case.moving, fixed_modality="T1", moving_modality="T2", table=table)
        (cand,) = result.candidates
        coverage[mask] = cand.coverage
        assert result.scorer_setup_seconds > 0
        assert result.to_dict()["inputs"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    # The moved head stays inside the moving domain, the grid's corners do not.
    assert coverage["auto"] > 0.99 and coverage["none"] < 0.95


def test_cancel_while_the_scorer_loads_ends_the_run_at_once(rigid_case4, monkeypatch):
    from AutoRegisterLib import race

    waiting = threading.Event()
    ready = race._ScorerSetup.ready

    def waiting_ready(self):
        waiting.set()
        return ready(self)

    # A scorer that takes 30 s to load: once a result waits for it, only Cancel can end the wait. Like the
    # real one, it stops at its next step once the run ends (the run waits for that, see _ScorerSetup.close).
    monkeypatch.setattr(race._ScorerSetup, "_load", lambda self: self._stop.wait(30))
    monkeypatch.setattr(race._ScorerSetup, "ready", waiting_ready)
    t0 = time.perf_counter()
    with pytest.raises(Cancelled):
        auto_register(rigid_case4.fixed, rigid_case4.moving, presets=["sitk-rigid"], cancel=waiting.is_set)
    assert waiting.is_set() and time.perf_counter() - t0 < 20


def test_a_preset_limited_to_finer_inputs_stays_out_of_the_race_on_coarse_ones(rigid_case4, tmp_path):
    case = rigid_case4  # 4 mm voxels
    fine_only = {"name": "fine-rigid", "backend": "sitk", "transform_type": "rigid", "max_input_mm": 1.5}
    result = auto_register(case.fixed, case.moving, fixed_modality="T1", moving_modality="T2",
                           table=_table(tmp_path, ["sitk-rigid", fine_only]), pose_search=False, judge=False)
    assert [c.name for c in result.candidates] == ["sitk-rigid"]
    assert [p.name for p in result.table.presets] == ["sitk-rigid"]
