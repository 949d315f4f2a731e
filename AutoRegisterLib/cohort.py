"""A cohort of image pairs, run for learning preset tables (``autoregister tables build``, `tables.py`).

Every preset runs on every image pair, one task per (pair, preset), each an ordinary
``auto_register(..., presets=[name])`` call. Runs are scored like the Register button scores them and,
when the cohort has label images, judged by the Dice of the warped moving labels against the fixed
labels. Tasks run in this process by default, or on a Dask cluster (`run_cohort`'s `client`). Each
finished task is appended to a JSONL state file at once, so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import Cancelled, InputError
from .events import is_cancelled

REQUIRED_COLUMNS = ("fixed", "moving", "fixed_modality", "moving_modality")
OPTIONAL_COLUMNS = ("fixed_labels", "moving_labels")


@dataclass(frozen=True)
class Pair:
    """One cohort row: image paths (absolute), modalities, optional label images."""

    fixed: str
    moving: str
    fixed_modality: str
    moving_modality: str
    fixed_labels: str | None = None
    moving_labels: str | None = None

    @property
    def key(self) -> str:
        """Identity of the pair in the state file (paths, not row numbers, so reordering the CSV is safe)."""
        return f"{self.fixed}|{self.moving}|{self.fixed_modality}|{self.moving_modality}"

    @property
    def modality_pair(self) -> tuple[str, str]:
        """(fixed modality, moving modality)."""
        return self.fixed_modality, self.moving_modality

    @property
    def has_labels(self) -> bool:
        """True when both label images are given."""
        return bool(self.fixed_labels and self.moving_labels)


def read_cohort(csv_path) -> list[Pair]:
    """Read and validate COHORT.csv; relative paths are taken from the CSV's folder."""
    from .presets import MODALITIES

    csv_path = Path(csv_path)
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{csv_path}: file not found") from None
    except OSError as exc:
        raise InputError(f"{csv_path}: cannot read ({exc.strerror})") from None
    reader = csv.DictReader(text.splitlines())
    columns = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise InputError(f"{csv_path.name}: missing column(s) {', '.join(missing)} "
                         f"(need {', '.join(REQUIRED_COLUMNS)}; optional {', '.join(OPTIONAL_COLUMNS)})")
    base = csv_path.resolve().parent
    pairs: list[Pair] = []
    for line, raw in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
        if not any(row.values()):
            continue
        where = f"{csv_path.name} line {line}"
        paths = {}
        for col in REQUIRED_COLUMNS[:2] + OPTIONAL_COLUMNS:
            value = row.get(col, "")
            if not value:
                if col in REQUIRED_COLUMNS:
                    raise InputError(f"{where}: column '{col}' is empty")
                paths[col] = None
                continue
            path = Path(value).expanduser()
            path = path if path.is_absolute() else base / path
            if not path.exists():
                raise InputError(f"{where}: column '{col}': {path} not found")
            paths[col] = str(path)
        modalities = {}
        for col in ("fixed_modality", "moving_modality"):
            value = row.get(col, "").upper()
            if value not in MODALITIES:
                raise InputError(f"{where}: column '{col}' must be one of {', '.join(MODALITIES)}, "
                                 f"got {row.get(col, '')!r}")
            modalities[col] = value
        if bool(paths["fixed_labels"]) != bool(paths["moving_labels"]):
            raise InputError(f"{where}: give both fixed_labels and moving_labels, or neither")
        pairs.append(Pair(paths["fixed"], paths["moving"], modalities["fixed_modality"],
                          modalities["moving_modality"], paths["fixed_labels"], paths["moving_labels"]))
    if not pairs:
        raise InputError(f"{csv_path.name}: no image pairs")
    keys = [p.key for p in pairs]
    if len(set(keys)) != len(keys):
        raise InputError(f"{csv_path.name}: the same image pair is listed twice")
    return pairs


def base_table(fixed_modality: str, moving_modality: str):
    """The table whose scoring settings a learned table starts from (built-in for the pair, else defaults)."""
    from .presets import ScoringSettings, Table, find_table

    try:
        return find_table(fixed_modality, moving_modality)
    except InputError:
        # No usable built-in table (e.g. one names a preset this install lacks): score with the defaults.
        return Table(name="defaults", fixed_modality=fixed_modality, moving_modality=moving_modality,
                     presets=(), scoring=ScoringSettings())


def mean_label_dice(fixed_labels, warped_labels) -> float:
    """Mean Dice over the nonzero labels of `fixed_labels` (arrays on the same grid)."""
    ref = np.asarray(fixed_labels)
    test = np.asarray(warped_labels)
    dices = []
    for label in np.unique(ref):
        if label == 0:
            continue
        a, b = ref == label, test == label
        dices.append(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))
    return float(np.mean(dices)) if dices else float("nan")


def run_task(pair: Pair, preset_name: str, timeout_s: float | None = 600.0,
             threads_per_job: int | None = None) -> dict:
    """Run one preset on one pair; return a JSON-ready record (never raises for a failed registration)."""
    from .image import read_image, resample_to_grid
    from .pipeline import auto_register
    from .presets import table_from_presets

    record = {"pair": pair.key, "preset": preset_name, "fixed_modality": pair.fixed_modality,
              "moving_modality": pair.moving_modality, "status": "failed", "score": None, "lncc": None,
              "mi": None, "coverage": None, "folding_fraction": None, "seconds": None, "dice": None,
              "error": None}
    try:
        base = base_table(pair.fixed_modality, pair.moving_modality)
        table = table_from_presets([preset_name], base=base)
        result = auto_register(pair.fixed, pair.moving, fixed_modality=pair.fixed_modality,
                               moving_modality=pair.moving_modality, table=table, jobs=1,
                               timeout_s=timeout_s, threads_per_job=threads_per_job)
        cand = result.candidates[0]
        for key in ("status", "score", "lncc", "mi", "coverage", "folding_fraction", "seconds", "error"):
            record[key] = getattr(cand, key)
        if pair.has_labels and cand.transform is not None:
            fixed_labels = read_image(pair.fixed_labels)
            moving_labels = read_image(pair.moving_labels)
            warped = resample_to_grid(moving_labels, fixed_labels, cand.transform, "nearest", 0)
            record["dice"] = mean_label_dice(fixed_labels.array, warped.array)
    except Cancelled:
        raise
    except Exception as exc:  # one broken pair or preset must not end a cohort build
        record["error"] = f"{type(exc).__name__}: {exc}"[:500]
    return record


def _dask_task(pair: Pair, preset_name: str, timeout_s: float | None, threads_per_job: int | None) -> dict:
    """run_task on a Dask worker, splitting the worker machine's cores among the worker's task threads."""
    if threads_per_job is None:
        try:
            from distributed import get_worker

            nthreads = get_worker().state.nthreads
        except (ImportError, ValueError, AttributeError):
            nthreads = 1
        threads_per_job = max(1, (os.cpu_count() or 1) // max(1, nthreads))
    return run_task(pair, preset_name, timeout_s, threads_per_job)


def read_state(state_path) -> dict[tuple[str, str], dict]:
    """Finished tasks from a JSONL state file, keyed by (pair key, preset); a torn last line is ignored."""
    done: dict[tuple[str, str], dict] = {}
    path = Path(state_path)
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            done[(record["pair"], record["preset"])] = record
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a kill: that task simply runs again
    return done


def _append_state(state_path: Path, record: dict) -> None:
    state_path.parent.mkdir(parents=True, exist_ok=True)
    with open(state_path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def run_cohort(pairs: list[Pair], presets: list[str], state_path, client=None, timeout_s: float | None = 600.0,
               threads_per_job: int | None = None, progress=None, cancel=None) -> dict:
    """Run every (pair, preset) task not already in the state file; return {"records", "ran", "skipped"}.

    `client` is a dask.distributed Client (None: run here, one task after another). `progress` gets the
    same events as the Register progress bar. `cancel` (Event or callable) stops before the next task;
    finished tasks are already saved, so a later call resumes.
    """
    state_path = Path(state_path)
    done = read_state(state_path)
    tasks = [(pair, name) for pair in pairs for name in presets]
    todo = [(pair, name) for pair, name in tasks if (pair.key, name) not in done]
    total, finished = len(tasks), len(tasks) - len(todo)
    progress = progress or (lambda event: None)
    ran = 0

    def label(pair, name):
        return f"{name} on {Path(pair.moving).name}"

    def finish(pair, name, record):
        nonlocal finished, ran
        _append_state(state_path, record)
        done[(pair.key, name)] = record
        finished, ran = finished + 1, ran + 1
        progress({"event": "finish", "candidate": label(pair, name), "status": record["status"],
                  "fraction": finished / total})

    if client is None:
        for pair, name in todo:
            if is_cancelled(cancel):
                raise Cancelled(f"cohort build stopped; {finished} of {total} tasks saved in {state_path}")
            progress({"event": "start", "candidate": label(pair, name), "fraction": finished / total})
            finish(pair, name, run_task(pair, name, timeout_s, threads_per_job))
    elif todo:
        from distributed import as_completed

        futures = {}
        for i, (pair, name) in enumerate(todo):
            fut = client.submit(_dask_task, pair, name, timeout_s, threads_per_job, pure=False,
                                key=f"autoregister-{name}-{i}")
            futures[fut] = (pair, name)
        try:
            for fut in as_completed(list(futures)):
                pair, name = futures[fut]
                try:
                    record = fut.result()
                except Exception as exc:  # a lost worker is a failed run, recorded like any other
                    record = {"pair": pair.key, "preset": name, "fixed_modality": pair.fixed_modality,
                              "moving_modality": pair.moving_modality, "status": "failed",
                              "error": f"{type(exc).__name__}: {exc}"[:500]}
                finish(pair, name, record)
                if is_cancelled(cancel):
                    raise Cancelled(f"cohort build stopped; {finished} of {total} tasks saved in {state_path}")
        finally:
            client.cancel([f for f in futures if not f.done()])
    records = [done[(pair.key, name)] for pair, name in tasks]
    return {"records": records, "ran": ran, "skipped": len(tasks) - len(todo)}
