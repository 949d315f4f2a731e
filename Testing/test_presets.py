"""Preset tables are data: every built-in one loads, and bad ones fail naming the file and the field."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from AutoRegisterLib.errors import InputError
from AutoRegisterLib.image import from_numpy
from AutoRegisterLib.modality import MODALITIES, guess_modality, modality_or_guess
from AutoRegisterLib.presets import (
    AUTOMATIC,
    TABLES_DIR,
    RacingSchedule,
    Table,
    find_table,
    list_tables,
    load_catalog,
    load_table,
    require_catalog_names,
    resolve_table,
    table_from_presets,
)


def test_every_builtin_table_loads_and_names_catalog_presets():
    catalog = load_catalog()
    tables = list_tables()
    pairs = {(t.fixed_modality, t.moving_modality) for t in tables}
    for moving in ("T1", "T2", "FLAIR", "PD", "CT"):
        assert ("T1", moving) in pairs
    for t in tables:
        assert all(p.name in catalog for p in t.presets)
        assert t.scoring.window_voxels % 2 == 1


def test_modality_pair_lookup_falls_back_to_generic_tables():
    assert find_table("T1", "T2").name == "T2_to_T1"
    assert find_table("T1", "CT").moving_modality == "CT"
    assert find_table("MR", "MR").name == "MR_to_MR"
    assert find_table("T2", "T2").name == "MR_to_MR"


def _write(tmp_path, **overrides):
    base = json.loads((TABLES_DIR / "T2_to_T1.json").read_text())
    base.update(overrides)
    path = tmp_path / "my table.json"
    path.write_text(json.dumps(base))
    return path


@pytest.mark.parametrize("overrides, field", [
    ({"presets": ["ants-rigid", "no-such-preset"]}, "presets[1]"),
    ({"presets": []}, "presets"),
    ({"fixed_modality": "XR"}, "fixed_modality"),
    ({"scoring": {"window_voxels": 4}}, "scoring.window_voxels"),
    ({"scoring": {"min_coverage": 1.5}}, "scoring.min_coverage"),
    ({"scoring": {"windw": 5}}, "scoring.windw"),
    ({"scoring": {"complexity_penalty": 0.6}}, "scoring.complexity_penalty"),
    ({"scoring": {"max_bending": -1e-4}}, "scoring.max_bending"),
    ({"presets": [{"name": "x", "backend": "fsl", "transform_type": "rigid"}]}, "presets[0].backend"),
    ({"presets": [{"name": "x", "backend": "ants", "transform_type": "warp"}]}, "presets[0].transform_type"),
    ({"presets": ["ants-rigid", "ants-rigid"]}, "presets"),
    ({"racing": {"keep": 0}}, "racing.keep"),
    ({"racing": {"keep": 1, "full_resolution": ["elastix-rigid"]}}, "racing.full_resolution"),
    ({"racing": {"keep": 1, "full_resolution": "elastix-bspline"}}, "racing.full_resolution"),
    ({"racing": {"kep": 1}}, "racing.kep"),
    ({"presets": [{"name": "elastix-defaults", "max_input_mm": -1}]}, "presets[0].max_input_mm"),
    ({"presets": [{"name": "elastix-defaults", "max_input_mm": 1.5, "grid_mm": 2}]}, "presets[0]"),
    ({"presets": [{"name": "x", "backend": "sitk", "transform_type": "rigid", "max_input_mm": "1"}]},
     "presets[0].max_input_mm"),
])
def test_invalid_table_error_names_file_and_field(tmp_path, overrides, field):
    path = _write(tmp_path, **overrides)
    with pytest.raises(InputError) as err:
        load_table(path)
    message = str(err.value)
    assert "my table.json" in message and f"'{field}'" in message
    assert "\n" not in message


def test_table_that_is_not_json_is_a_one_line_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{ not json")
    with pytest.raises(InputError, match=r"broken.json: not valid JSON \(line 1"):
        load_table(path)


def test_user_table_folder_overrides_builtin_pair(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOREGISTER_TABLES", str(tmp_path))
    table = json.loads((TABLES_DIR / "T2_to_T1.json").read_text())
    table.update(name="my_T2", presets=["ants-rigid"], racing=None)
    (tmp_path / "mine.json").write_text(json.dumps(table))
    chosen = find_table("T1", "T2")
    assert chosen.name == "my_T2" and [p.name for p in chosen.presets] == ["ants-rigid"]


def test_one_bad_user_table_is_skipped_and_reported_without_hiding_the_others(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("AUTOREGISTER_TABLES", str(tmp_path))
    good = json.loads((TABLES_DIR / "T2_to_T1.json").read_text())
    good.update(name="my_T2", presets=["ants-rigid"], racing=None)
    (tmp_path / "b_good.json").write_text(json.dumps(good))
    (tmp_path / "a_not_json.json").write_text("{ this is not JSON")
    (tmp_path / "c_binary.json").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "d_bad_field.json").write_text(json.dumps(dict(good, fixed_modality="XR")))
    errors: list[str] = []
    with caplog.at_level("WARNING"):
        tables = list_tables(errors=errors)
    builtin = len(list(TABLES_DIR.iterdir()))
    assert [t.name for t in tables[builtin:]] == ["my_T2"]
    assert len(tables) == builtin + 1
    assert [e.split(":")[0].rsplit("/", 1)[-1] for e in errors] == ["a_not_json.json", "c_binary.json",
                                                                      "d_bad_field.json"]
    assert "fixed_modality" in errors[2]
    assert sum("skipping preset table" in r.getMessage() for r in caplog.records) == 3
    # "Automatic" still works: the good user table for its pair, the built-in ones for the others.
    assert find_table("T1", "T2").name == "my_T2"
    assert find_table("T1", "CT").name == "CT_to_T1"
    assert resolve_table(AUTOMATIC, "T1", "FLAIR").name == "FLAIR_to_T1"

def test_presets_option_keeps_the_table_scoring():
    base = find_table("T1", "CT")
    custom = table_from_presets(["sitk-rigid", "ants-rigid"], base)
    assert [p.name for p in custom.presets] == ["sitk-rigid", "ants-rigid"]
    assert custom.scoring == base.scoring
    with pytest.raises(InputError, match="unknown preset"):
        table_from_presets(["nope"])


def test_ct_is_recognised_by_its_hounsfield_range():
    rng = np.random.default_rng(0)
    ct = np.full((20, 20, 20), -1000, np.int16)
    ct[5:15, 5:15, 5:15] = 40
    ct[5:15, 5, 5:15] = 1200
    assert guess_modality(from_numpy(ct)) == "CT"
    mr = rng.uniform(0, 800, size=(20, 20, 20)).astype(np.float32)
    assert guess_modality(from_numpy(mr)) == "MR"
    assert set(MODALITIES) >= {"CT", "MR"}
    assert modality_or_guess("t2", from_numpy(ct), "fixed modality") == "T2"
    assert modality_or_guess(None, from_numpy(ct), "fixed modality") == "CT"
    with pytest.raises(InputError, match="fixed modality must be one of"):
        modality_or_guess("XR", from_numpy(ct), "fixed modality")


def test_a_table_is_chosen_by_object_automatic_path_or_name(tmp_path):
    t2 = find_table("T1", "T2")
    assert resolve_table(t2, "T1", "CT") is t2
    for automatic in (None, "", AUTOMATIC):
        assert resolve_table(automatic, "T1", "CT").name == "CT_to_T1"
    assert resolve_table("MR_to_MR", "T1", "T2").name == "MR_to_MR"
    path = _write(tmp_path, name="from_a_file")
    assert resolve_table(path, "T1", "T2").name == "from_a_file"
    assert resolve_table(str(path), "T1", "T2").name == "from_a_file"
    with pytest.raises(InputError, match="file not found"):
        resolve_table(str(tmp_path / "missing.json"), "T1", "T2")
    with pytest.raises(InputError, match="no preset table named 'nope'"):
        resolve_table("nope", "T1", "T2")


def test_overrides_switch_presets_off_and_change_the_window():
    table = find_table("T1", "T2")
    changed = table.with_overrides(disabled={"sitk-rigid"}, window_voxels=7)
    assert "sitk-rigid" not in [p.name for p in changed.presets]
    assert changed.scoring.window_voxels == 7 and table.scoring.window_voxels == 5
    assert table.with_overrides() == table
    with pytest.raises(InputError, match="switched off"):
        table.with_overrides(disabled=[p.name for p in table.presets])
    with pytest.raises(InputError, match="window_voxels"):
        table.with_overrides(window_voxels=4)
    assert isinstance(changed, Table)


def test_catalog_names_are_checked_in_one_place():
    assert [p.name for p in require_catalog_names(["sitk-rigid", "ants-rigid"])] == ["sitk-rigid", "ants-rigid"]
    with pytest.raises(InputError, match=r"unknown preset\(s\) nope"):
        require_catalog_names(["sitk-rigid", "nope"])
    with pytest.raises(InputError, match="at least one"):
        require_catalog_names([])


def test_switching_presets_off_keeps_the_table_valid(tmp_path):
    table = find_table("T1", "T2")
    assert "elastix-bspline" in table.racing.full_resolution
    smaller = table.without(["elastix-bspline", "sitk-rigid"])
    assert [p.name for p in smaller.presets] == [p.name for p in table.presets
                                                  if p.name not in ("elastix-bspline", "sitk-rigid")]
    assert smaller.racing.full_resolution == () and smaller.racing.keep == table.racing.keep
    path = tmp_path / "switched.json"
    path.write_text(json.dumps(smaller.to_dict()))
    assert [p.name for p in load_table(path).presets] == [p.name for p in smaller.presets]
    assert load_table(path).racing == smaller.racing


def test_the_racing_schedule_is_a_frozen_value_with_the_tables_json_form():
    schedule = RacingSchedule(coarse_shrink=2, keep=1, full_resolution=["elastix-bspline"], coarse_mm=3.0)
    assert schedule.to_dict() == {"coarse_shrink": 2, "keep": 1, "full_resolution": ["elastix-bspline"],
                                  "coarse_mm": 3.0}
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.keep = 3
    # Code that builds a table with the JSON form (e.g. a benchmark's own schedule) gets the schedule.
    table = dataclasses.replace(find_table("T1", "T2"), racing=schedule.to_dict())
    assert table.racing == schedule and table.to_dict()["racing"] == schedule.to_dict()


def test_a_table_with_inline_presets_survives_its_plain_data_form(tmp_path):
    inline = {"name": "my-rigid", "backend": "sitk", "transform_type": "rigid", "params": {"iterations": 50}}
    path = _write(tmp_path, presets=["ants-rigid", inline], racing=None)
    table = load_table(path)
    again = tmp_path / "again.json"
    again.write_text(json.dumps(table.to_dict()))
    assert load_table(again).presets == table.presets


def test_the_readme_example_table_loads_and_its_params_are_valid(tmp_path):
    from AutoRegisterLib.backends import get_backend

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    example = readme.split("## Preset tables", 1)[1].split("```json", 1)[1].split("```", 1)[0]
    path = tmp_path / "example.json"
    path.write_text(example)
    table = load_table(path)
    assert table.racing.full_resolution == ("elastix-bspline",)
    for preset in table.presets:
        get_backend(preset.backend).validate(preset)


def test_presets_limited_to_fine_or_coarse_inputs_race_only_on_them(tmp_path):
    limited = {"name": "elastix-defaults", "max_input_mm": 1.5}
    coarse_only = {"name": "elastix-bspline", "min_input_mm": 1.5}
    path = _write(tmp_path, presets=["ants-rigid", limited, coarse_only],
                  racing={"keep": 1, "full_resolution": ["elastix-defaults", "elastix-bspline"]})
    table = load_table(path)
    assert table.presets[1].max_input_mm == 1.5
    assert table.presets[1].params == load_catalog()["elastix-defaults"].params
    fine = table.for_input((1.0, 1.0, 1.0))
    assert [p.name for p in fine.presets] == ["ants-rigid", "elastix-defaults"]
    assert fine.racing.full_resolution == ("elastix-defaults",)
    # A thick-slice fixed series is coarse along one axis: the limit holds on its largest spacing.
    coarse = table.for_input((1.0, 1.0, 3.0))
    assert [p.name for p in coarse.presets] == ["ants-rigid", "elastix-bspline"]
    assert coarse.racing.full_resolution == ("elastix-bspline",)
    # The limit survives the plain-data form the Slicer module hands the engine.
    again = tmp_path / "again.json"
    again.write_text(json.dumps(table.to_dict()))
    assert load_table(again).presets == table.presets


def test_a_table_of_limited_presets_alone_still_races_them():
    table = table_from_presets(["elastix-defaults"])
    only = dataclasses.replace(table, presets=(dataclasses.replace(table.presets[0], max_input_mm=1.0),))
    assert only.for_input((3.0, 3.0, 3.0)).presets == only.presets

