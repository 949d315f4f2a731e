"""Presets and per-modality-pair preset tables: JSON data, validated on load.

The catalog (``resources/presets/presets.json`` in this package) names every preset a backend can run.
A table (``resources/presets/tables/*.json``, a user folder, or ``--table FILE``) says, for one modality
pair, which presets to race and how to score them. Errors name the file and the field.

The built-in files are package data, read through `importlib.resources`, so a wheel and the Slicer
extension carry them inside the package; they are `Traversable`s (a `Path` when installed on disk).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path

from .backends.base import INPUT_LIMITS, TRANSFORM_TYPES, Preset
from .errors import InputError

# Re-exported: the Slicer module and tables.py import these three from here.
from .modality import MODALITIES, guess_modality  # noqa: F401
from .scoring import ScoringSettings

RESOURCES = resources.files(__package__) / "resources" / "presets"
CATALOG_PATH = RESOURCES / "presets.json"
TABLES_DIR = RESOURCES / "tables"
TABLE_SCHEMA = "autoregister-table/1"
#: The table name that means "the table of the modality pair" (the Slicer module's default choice).
AUTOMATIC = "Automatic"
CATALOG_SCHEMA = "autoregister-presets/1"


def user_tables_dir() -> Path:
    """Folder for the user's own tables: $AUTOREGISTER_TABLES, else ~/.config/AutoRegister/tables."""
    env = os.environ.get("AUTOREGISTER_TABLES")
    return Path(env) if env else Path.home() / ".config" / "AutoRegister" / "tables"


@dataclass(frozen=True)
class RacingSchedule:
    """A coarse-to-fine race: every preset but those in `full_resolution` runs first on images shrunk
    `coarse_shrink` times, and the best `keep` of them run again at full resolution (see `race.py`)."""

    coarse_shrink: int = 2
    keep: int = 2
    full_resolution: tuple[str, ...] = ()
    #: The coarse round's voxels are at least this many mm (after the shrink): its cost does not grow with
    #: the input's voxel count.
    coarse_mm: float = 0.0

    def __post_init__(self) -> None:
        """Hold `full_resolution` as a tuple, whatever sequence it came as (the schedule is frozen)."""
        object.__setattr__(self, "full_resolution", tuple(self.full_resolution))

    def to_dict(self) -> dict:
        """The JSON form of a table's ``racing`` field (and of ``inputs.racing`` in result.json)."""
        return {"coarse_shrink": self.coarse_shrink, "keep": self.keep, "full_resolution": list(self.full_resolution),
                "coarse_mm": self.coarse_mm}

    def raced(self, presets) -> list[Preset]:
        """The presets that race the coarse round: all but those run at full resolution only."""
        return [p for p in presets if p.name not in self.full_resolution]

    def without(self, names) -> RacingSchedule:
        """The schedule once the named presets are gone from the table."""
        return replace(self, full_resolution=tuple(n for n in self.full_resolution if n not in set(names)))


@dataclass(frozen=True)
class Table:
    """A preset table for one modality pair."""

    name: str
    fixed_modality: str
    moving_modality: str
    presets: tuple[Preset, ...]
    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    #: None (every preset at full resolution), or the coarse-to-fine schedule; a dict in the JSON form of
    #: the ``racing`` field is taken too.
    racing: RacingSchedule | None = None
    source: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        """Take a ``racing`` dict in the JSON form as a `RacingSchedule` (validated tables never pass one)."""
        if isinstance(self.racing, dict):
            object.__setattr__(self, "racing", RacingSchedule(**self.racing))

    def to_dict(self) -> dict:
        """Plain-data form that `load_table` reads back; presets are written in full, so a user table's
        inline presets survive (the Slicer module hands the engine its table this way)."""
        return {
            "schema": TABLE_SCHEMA, "name": self.name, "description": self.description,
            "fixed_modality": self.fixed_modality, "moving_modality": self.moving_modality,
            "presets": [p.to_dict() for p in self.presets], "scoring": self.scoring.to_dict(),
            "racing": self.racing.to_dict() if self.racing is not None else None,
        }

    def without(self, names) -> Table:
        """The same table without the named presets (switched off by the user), its racing kept consistent."""
        names = set(names)
        racing = self.racing.without(names) if self.racing is not None else None
        return replace(self, presets=tuple(p for p in self.presets if p.name not in names), racing=racing)

    def for_input(self, fixed_spacing_mm) -> Table:
        """The table as it races on a fixed image with these voxel sizes: presets limited to other inputs
        (`Preset.max_input_mm`, `min_input_mm`) are left out, unless that would leave none."""
        unsuited = [p.name for p in self.presets if not p.suits(fixed_spacing_mm)]
        return self.without(unsuited) if unsuited and len(unsuited) < len(self.presets) else self

    def with_overrides(self, disabled=(), window_voxels: int | None = None) -> Table:
        """The table with a user's switches applied: the `disabled` presets off, another scoring window."""
        table = self.without(disabled) if disabled else self
        if not table.presets:
            raise InputError(f"every preset of table {self.name!r} is switched off")
        if window_voxels:
            _require(_is_window(window_voxels), self.source or self.name, "scoring.window_voxels",
                     f"must be an odd integer >= 3, got {window_voxels!r}")
            table = replace(table, scoring=replace(table.scoring, window_voxels=int(window_voxels)))
        return table


def _as_path(path):
    """A user's path (str or PathLike) as a Path; a package resource (Traversable) as it is."""
    return Path(path) if isinstance(path, (str, os.PathLike)) else path


def _load_json(path) -> dict:
    try:
        text = _as_path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: top level must be a JSON object")
    return data


def _require(cond: bool, path, fieldname: str, message: str) -> None:
    if not cond:
        raise InputError(f"{_as_path(path).name}: field '{fieldname}' {message}")


def parse_preset(entry, path, where: str) -> Preset:
    """Validate one preset definition (a catalog entry or an inline table entry)."""
    _require(isinstance(entry, dict), path, where, "must be an object")
    for key in ("name", "backend", "transform_type"):
        _require(isinstance(entry.get(key), str) and entry.get(key), path, f"{where}.{key}",
                 "is required and must be a non-empty string")
    _require(entry["transform_type"] in TRANSFORM_TYPES, path, f"{where}.transform_type",
             f"must be one of {', '.join(TRANSFORM_TYPES)}, got {entry['transform_type']!r}")
    from .backends import BACKEND_NAMES

    _require(entry["backend"] in BACKEND_NAMES, path, f"{where}.backend",
             f"must be one of {', '.join(BACKEND_NAMES)}, got {entry['backend']!r}")
    params = entry.get("params", {})
    _require(isinstance(params, dict), path, f"{where}.params", "must be an object")
    grid = entry.get("grid_mm", 0.0)
    _require(_is_number(grid) and 0 <= grid <= 20, path, f"{where}.grid_mm",
             f"must be a number of mm in [0, 20] (0: the input's grid), got {grid!r}")
    return Preset(entry["name"], entry["backend"], entry["transform_type"], dict(params), float(grid),
                  **_input_limits(entry, path, where))


def _input_limits(entry: dict, path, where: str) -> dict:
    out = {}
    for key in INPUT_LIMITS:
        limit = entry.get(key, 0.0)
        _require(_is_number(limit) and 0 <= limit <= 20, path, f"{where}.{key}",
                 f"must be a number of mm in [0, 20] (0: no limit), got {limit!r}")
        out[key] = float(limit)
    return out


def _catalog_entry(entry: dict, catalog: dict[str, Preset], path, where: str) -> Preset:
    """A table entry naming a catalog preset with conditions: {"name": ..., "max_input_mm": ...}."""
    extra = sorted(set(entry) - {"name", *INPUT_LIMITS})
    _require(not extra, path, where, f"names catalog preset {entry['name']!r} and may add only "
             f"{' or '.join(INPUT_LIMITS)}, not {', '.join(extra)}")
    return replace(catalog[entry["name"]], **_input_limits(entry, path, where))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def load_catalog(path=CATALOG_PATH) -> dict[str, Preset]:
    """Load the named presets of the catalog, keyed by name."""
    data = _load_json(path)
    _require(data.get("schema") == CATALOG_SCHEMA, path, "schema", f"must be {CATALOG_SCHEMA!r}")
    entries = data.get("presets")
    _require(isinstance(entries, list) and entries, path, "presets", "must be a non-empty list")
    catalog: dict[str, Preset] = {}
    for i, entry in enumerate(entries):
        preset = parse_preset(entry, path, f"presets[{i}]")
        _require(preset.name not in catalog, path, f"presets[{i}].name", f"duplicates {preset.name!r}")
        catalog[preset.name] = preset
    return catalog


def _parse_scoring(raw, path) -> ScoringSettings:
    if raw is None:
        return ScoringSettings()
    _require(isinstance(raw, dict), path, "scoring", "must be an object")
    known = {f.name: f for f in fields(ScoringSettings)}
    for key in raw:
        _require(key in known, path, f"scoring.{key}", f"is unknown (known: {', '.join(known)})")
    s = replace(ScoringSettings(), **raw)
    _require(s.metric in ("lncc", "mi"), path, "scoring.metric", f"must be 'lncc' or 'mi', got {s.metric!r}")
    _require(_is_window(s.window_voxels), path, "scoring.window_voxels",
             f"must be an odd integer >= 3, got {s.window_voxels!r}")
    _require(s.head_mask in ("auto", "none"), path, "scoring.head_mask", "must be 'auto' or 'none'")
    _require(_is_number(s.grid_mm) and 0 <= s.grid_mm <= 20, path, "scoring.grid_mm",
             f"must be a number of mm in [0, 20] (0: the fixed image's grid), got {s.grid_mm!r}")
    for name in ("min_coverage", "max_folding_fraction"):
        v = getattr(s, name)
        _require(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1, path,
                 f"scoring.{name}", f"must be a number in [0, 1], got {v!r}")
    for name in ("min_jacobian", "tie_tolerance"):
        _require(isinstance(getattr(s, name), (int, float)), path, f"scoring.{name}", "must be a number")
    p = s.complexity_penalty
    _require(isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 0.25, path,
             "scoring.complexity_penalty", f"must be a number in [0, 0.25] (a fraction per level), got {p!r}")
    b = s.max_bending
    _require(_is_number(b) and b >= 0, path, "scoring.max_bending",
             f"must be a number >= 0 (mm^-2; 0: no limit), got {b!r}")
    for name in ("coverage_weight", "mi_vote"):
        _require(isinstance(getattr(s, name), bool), path, f"scoring.{name}", "must be true or false")
    return s


def _is_window(w) -> bool:
    return isinstance(w, int) and not isinstance(w, bool) and w >= 3 and w % 2 == 1


def _parse_racing(raw, path, names: list[str]) -> RacingSchedule | None:
    if raw is None:
        return None
    _require(isinstance(raw, dict), path, "racing", "must be an object or null")
    known = [f.name for f in fields(RacingSchedule)]
    for key in raw:
        _require(key in known, path, f"racing.{key}", f"is unknown (known: {', '.join(known)})")
    defaults = RacingSchedule()
    shrink = raw.get("coarse_shrink", defaults.coarse_shrink)
    keep = raw.get("keep", defaults.keep)
    full = raw.get("full_resolution", [])
    _require(isinstance(shrink, int) and shrink >= 1, path, "racing.coarse_shrink", "must be an integer >= 1")
    _require(isinstance(keep, int) and keep >= 1, path, "racing.keep", "must be an integer >= 1")
    _require(isinstance(full, list) and all(isinstance(n, str) for n in full), path, "racing.full_resolution",
             "must be a list of preset names")
    missing = [n for n in full if n not in names]
    _require(not missing, path, "racing.full_resolution", f"names presets the table does not list: {missing}")
    coarse_mm = raw.get("coarse_mm", defaults.coarse_mm)
    _require(_is_number(coarse_mm) and 0 <= coarse_mm <= 20, path, "racing.coarse_mm",
             f"must be a number of mm in [0, 20], got {coarse_mm!r}")
    return RacingSchedule(shrink, keep, tuple(full), float(coarse_mm))


def load_table(path, catalog: dict[str, Preset] | None = None) -> Table:
    """Load and validate a preset table from a JSON file."""
    path = _as_path(path)
    data = _load_json(path)
    catalog = load_catalog() if catalog is None else catalog
    _require(data.get("schema", TABLE_SCHEMA) == TABLE_SCHEMA, path, "schema", f"must be {TABLE_SCHEMA!r}")
    for key in ("fixed_modality", "moving_modality"):
        _require(data.get(key) in MODALITIES, path, key,
                 f"must be one of {', '.join(MODALITIES)}, got {data.get(key)!r}")
    entries = data.get("presets")
    _require(isinstance(entries, list) and entries, path, "presets", "must be a non-empty list")
    presets = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            _require(entry in catalog, path, f"presets[{i}]",
                     f"names unknown preset {entry!r} (known: {', '.join(sorted(catalog))})")
            presets.append(catalog[entry])
        elif isinstance(entry, dict) and "backend" not in entry and entry.get("name") in catalog:
            presets.append(_catalog_entry(entry, catalog, path, f"presets[{i}]"))
        else:
            presets.append(parse_preset(entry, path, f"presets[{i}]"))
    names = [p.name for p in presets]
    _require(len(set(names)) == len(names), path, "presets", "lists a preset twice")
    return Table(
        name=str(data.get("name") or Path(path.name).stem), fixed_modality=data["fixed_modality"],
        moving_modality=data["moving_modality"], presets=tuple(presets),
        scoring=_parse_scoring(data.get("scoring"), path), racing=_parse_racing(data.get("racing"), path, names),
        source=str(path), description=str(data.get("description", "")),
    )


def list_tables(errors: list[str] | None = None) -> list[Table]:
    """Every table: the built-in ones, then the user's (a user table overrides a built-in of the same pair).

    A file in the user's folder that is not a valid table is skipped with a logged warning, its reason
    appended to `errors` when a list is given: one bad file must not hide the other tables (nor break
    "Automatic"). A bad built-in table is a bug of the package and raises.
    """
    catalog = load_catalog()
    found = [load_table(path, catalog) for path in _json_files(TABLES_DIR)]
    for path in _json_files(user_tables_dir()):
        try:
            found.append(load_table(path, catalog))
        except InputError as exc:  # the message names the file and the field
            logging.getLogger(__name__).warning("AutoRegister: skipping preset table: %s", exc)
            if errors is not None:
                errors.append(str(exc))
    return found


def _json_files(folder) -> list:
    """The folder's *.json files by name; none when it does not exist."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.name.endswith(".json")), key=lambda p: p.name)


def find_table(fixed_modality: str, moving_modality: str) -> Table:
    """The table for a modality pair: exact match, else same-modality or the generic MR table."""
    tables = list_tables()
    by_pair = {(t.fixed_modality, t.moving_modality): t for t in tables}  # later (user) entries win
    for key in ((fixed_modality, moving_modality),
                ("MR", "MR") if fixed_modality == moving_modality else ("T1", moving_modality),
                ("T1", "CT") if moving_modality == "CT" else ("MR", "MR")):
        if key in by_pair:
            return by_pair[key]
    raise InputError(f"no preset table for {moving_modality} -> {fixed_modality} in {TABLES_DIR}")


def resolve_table(table, fixed_modality: str, moving_modality: str) -> Table:
    """The table a user chose: a Table as it is; None, "" or "Automatic" for the modality pair's table;
    a path (a PathLike, an existing file or a name ending in .json) loaded; else a table's name."""
    if isinstance(table, Table):
        return table
    if not table or table == AUTOMATIC:
        return find_table(fixed_modality, moving_modality)
    if isinstance(table, os.PathLike) or str(table).lower().endswith(".json") or os.path.isfile(table):
        return load_table(table)
    tables = list_tables()
    for candidate in reversed(tables):  # a user table shadows a built-in one of the same name
        if candidate.name == table:
            return candidate
    raise InputError(f"no preset table named {table!r} and no such file "
                     f"(tables: {', '.join(sorted({t.name for t in tables}))})")


def require_catalog_names(names, catalog: dict[str, Preset] | None = None) -> list[Preset]:
    """The catalog presets of `names`, in order; InputError naming the unknown ones, or when there are none."""
    catalog = load_catalog() if catalog is None else catalog
    unknown = [n for n in names if n not in catalog]
    if unknown:
        raise InputError(f"unknown preset(s) {', '.join(unknown)} (known: {', '.join(sorted(catalog))})")
    if not names:
        raise InputError("--presets needs at least one preset name")
    return [catalog[n] for n in names]


def table_from_presets(names: list[str], base: Table | None = None) -> Table:
    """A table racing the named catalog presets, with `base`'s scoring (for --presets A,B,...)."""
    presets = require_catalog_names(names)
    return Table(
        name="custom", fixed_modality=base.fixed_modality if base else "MR",
        moving_modality=base.moving_modality if base else "MR",
        presets=tuple(presets), scoring=base.scoring if base else ScoringSettings(),
        racing=None, source="--presets",
    )


#: The candidate that registers the focus region alone: a copy of the catalog preset `FOCUS_BASE` whose fixed
#: mask is the focus (`race.py`).
FOCUS_PRESET, FOCUS_BASE = "focus-rigid", "sitk-rigid"


def with_focus_preset(table: Table, catalog: dict[str, Preset] | None = None) -> Table:
    """`table` with the focus candidate added; it runs at full resolution from the start (a coarse round
    would judge it on the whole head, where it is not meant to be best)."""
    base = (catalog or load_catalog())[FOCUS_BASE]
    focus = Preset(FOCUS_PRESET, base.backend, base.transform_type, dict(base.params), base.grid_mm)
    presets = tuple(p for p in table.presets if p.name != FOCUS_PRESET) + (focus,)
    racing = table.racing
    if racing is not None:
        racing = replace(racing, full_resolution=tuple(racing.full_resolution) + (FOCUS_PRESET,))
    return replace(table, presets=presets, racing=racing)
