"""The table builder learns a ranked table from a labelled cohort, in-process or on Dask, and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from AutoRegisterDev.data import make_case
from AutoRegisterLib import cohort as cohorts
from AutoRegisterLib import tables
from AutoRegisterLib.cli import main
from AutoRegisterLib.errors import Cancelled
from AutoRegisterLib.image import resample_to_grid, write_image
from AutoRegisterLib.presets import load_table

# An affine misalignment (8% scaling/shear) that a rigid preset cannot undo: ants-affine must rank first.
PRESETS = ["sitk-rigid", "ants-affine"]
MISALIGNMENT = {"rotation_deg": 6.0, "translation_mm": 6.0, "scale": 0.08}


def _write_cohort(folder: Path, icbm4, rows) -> Path:
    """Write fixed/moving images and labels for (moving source, modality, seed) rows, and their CSV."""
    folder.mkdir(parents=True, exist_ok=True)
    write_image(icbm4["t1"], folder / "fixed.nii.gz")
    write_image(icbm4["labels"], folder / "fixed_labels.nii.gz")
    lines = ["fixed,moving,fixed_modality,moving_modality,fixed_labels,moving_labels"]
    for source, modality, seed in rows:
        case = make_case(icbm4[source], icbm4["t1"], seed=seed, **MISALIGNMENT)
        write_image(case.moving, folder / f"moving{seed}.nii.gz")
        # The moving labels follow the same known misalignment as the moving image.
        write_image(resample_to_grid(icbm4["labels"], icbm4["t1"], case.truth, "nearest", 0),
                    folder / f"moving{seed}_labels.nii.gz")
        lines.append(f"fixed.nii.gz,moving{seed}.nii.gz,T1,{modality},fixed_labels.nii.gz,moving{seed}_labels.nii.gz")
    csv_path = folder / "cohort.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    return csv_path


@pytest.fixture(scope="module")
def two_pair_cohort(icbm4, tmp_path_factory):
    """Two modality pairs: one T2 -> T1 and one T1 -> T1, each with a known affine misalignment."""
    return _write_cohort(tmp_path_factory.mktemp("cohort2"), icbm4, [("t2", "T2", 11), ("t1", "T1", 12)])


@pytest.mark.slow
def test_interrupted_build_resumes_without_rerunning_finished_tasks(two_pair_cohort, tmp_path, monkeypatch):
    calls = []
    real_run_task = cohorts.run_task

    def counting_run_task(pair, preset, *args):
        calls.append((pair.key, preset))
        return real_run_task(pair, preset, *args)

    monkeypatch.setattr(cohorts, "run_task", counting_run_task)
    pairs = cohorts.read_cohort(two_pair_cohort)
    out = tmp_path / "learned"
    with pytest.raises(Cancelled):
        tables.build_tables(pairs, PRESETS, out, cancel=lambda: len(calls) >= 2)
    state = tables.default_state_path(out)
    first = list(calls)
    assert len(first) == 2 and len(state.read_text().splitlines()) == 2
    assert not out.exists()

    result = tables.build_tables(pairs, PRESETS, out)
    second = calls[2:]
    assert result["ran"] == 2 and result["skipped"] == 2
    assert len(second) == 2 and not set(first) & set(second)
    assert len(state.read_text().splitlines()) == 4

    # Several modality pairs: --out is a folder with one table per pair, each loadable and evidence-ranked.
    assert sorted(p.name for p in out.glob("*.json")) == ["T1_to_T1.json", "T2_to_T1.json"]
    for path in out.glob("*.json"):
        table = load_table(path)
        assert [p.name for p in table.presets] == ["ants-affine", "sitk-rigid"], path.name
        evidence = json.loads(path.read_text())["evidence"]
        assert evidence["ranked_by"] == "mean_dice" and evidence["pairs"] == 1
        dice = {row["preset"]: row["mean_dice"] for row in evidence["presets"]}
        assert dice["ants-affine"] > 0.9 > dice["sitk-rigid"]
        assert table.racing is None  # two presets: nothing to race away

    # A third run has nothing left to do.
    assert tables.build_tables(pairs, PRESETS, out)["ran"] == 0 and len(calls) == 4


@pytest.mark.slow
def test_cli_builds_a_table_on_a_local_dask_cluster(icbm4, tmp_path, capsys):
    cohort = _write_cohort(tmp_path / "cohort", icbm4, [("t2", "T2", 21)])
    pytest.importorskip("distributed")
    from distributed import Client, LocalCluster

    pairs = cohorts.read_cohort(cohort)
    out = tmp_path / "T2_to_T1.json"
    events = []
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        result = tables.build_tables(pairs, PRESETS, out, client=client, progress=events.append)
    assert result["ran"] == 2
    assert [e["fraction"] for e in events if e["event"] == "finish"][-1] == 1.0
    table = load_table(out)
    assert (table.fixed_modality, table.moving_modality) == ("T1", "T2")
    assert table.presets[0].name == "ants-affine"

    # The command resumes from the same state file: nothing runs again.
    code = main(["tables", "build", str(cohort), "--out", str(out), "--presets", ",".join(PRESETS), "--quiet"])
    assert code == 0
    assert "0 run(s) now, 2 resumed" in capsys.readouterr().out


def test_cohort_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    bad = tmp_path / "cohort.csv"
    bad.write_text("fixed,moving,fixed_modality\na.nii,b.nii,T1\n")
    assert main(["tables", "build", str(bad), "--out", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing column(s) moving_modality" in err

    (tmp_path / "a.nii").write_bytes(b"")
    bad.write_text("fixed,moving,fixed_modality,moving_modality\na.nii,missing.nii,T1,T2\n")
    assert main(["tables", "build", str(bad), "--out", str(tmp_path / "t.json")]) == 2
    assert "line 2: column 'moving'" in capsys.readouterr().err

    (tmp_path / "b.nii").write_bytes(b"")
    bad.write_text("fixed,moving,fixed_modality,moving_modality\na.nii,b.nii,T1,XR\n")
    assert main(["tables", "build", str(bad), "--out", str(tmp_path / "t.json")]) == 2
    assert "must be one of" in capsys.readouterr().err

    bad.write_text("fixed,moving,fixed_modality,moving_modality\na.nii,b.nii,T1,T2\n")
    assert main(["tables", "build", str(bad), "--out", str(tmp_path / "t.json"), "--presets", "nope"]) == 2
    assert "unknown preset(s) nope" in capsys.readouterr().err


def test_ranking_counts_failed_runs_against_a_preset():
    records = [
        {"pair": "a", "preset": "steady", "status": "ok", "score": 0.4, "dice": 0.80, "seconds": 1.0},
        {"pair": "b", "preset": "steady", "status": "ok", "score": 0.4, "dice": 0.80, "seconds": 1.0},
        {"pair": "a", "preset": "brittle", "status": "ok", "score": 0.5, "dice": 0.95, "seconds": 1.0},
        {"pair": "b", "preset": "brittle", "status": "failed", "score": None, "dice": None, "seconds": None},
    ]
    rows, ranked_by = tables.rank_presets(records, ["brittle", "steady"])
    assert ranked_by == "mean_dice"
    assert [r["preset"] for r in rows] == ["steady", "brittle"]
    assert rows[1]["failed"] == 1 and rows[1]["mean_dice"] == pytest.approx(0.475)
    assert tables.selection_agreement(records) == 1.0
