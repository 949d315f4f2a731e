"""Preset tables are data: every built-in one loads, and bad ones fail naming the file and the field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from AutoRegisterLib.errors import InputError
from AutoRegisterLib.image import from_numpy
from AutoRegisterLib.presets import (
    MODALITIES,
    TABLES_DIR,
    find_table,
    guess_modality,
    list_tables,
    load_catalog,
    load_table,
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
    ({"presets": [{"name": "x", "backend": "fsl", "transform_type": "rigid"}]}, "presets[0].backend"),
    ({"presets": [{"name": "x", "backend": "ants", "transform_type": "warp"}]}, "presets[0].transform_type"),
    ({"presets": ["ants-rigid", "ants-rigid"]}, "presets"),
    ({"racing": {"keep": 0}}, "racing.keep"),
    ({"racing": {"keep": 1, "full_resolution": ["elastix-rigid"]}}, "racing.full_resolution"),
    ({"racing": {"keep": 1, "full_resolution": "elastix-bspline"}}, "racing.full_resolution"),
    ({"racing": {"kep": 1}}, "racing.kep"),
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


def test_switching_presets_off_keeps_the_table_valid(tmp_path):
    table = find_table("T1", "T2")
    assert "elastix-bspline" in table.racing["full_resolution"]
    smaller = table.without(["elastix-bspline", "sitk-rigid"])
    assert [p.name for p in smaller.presets] == [p.name for p in table.presets
                                                  if p.name not in ("elastix-bspline", "sitk-rigid")]
    assert smaller.racing["full_resolution"] == [] and smaller.racing["keep"] == table.racing["keep"]
    path = tmp_path / "switched.json"
    path.write_text(json.dumps(smaller.to_dict()))
    assert [p.name for p in load_table(path).presets] == [p.name for p in smaller.presets]


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
    assert table.racing["full_resolution"] == ["elastix-bspline"]
    for preset in table.presets:
        get_backend(preset.backend).validate(preset)
