"""Learn preset tables from a cohort: ``autoregister tables build COHORT.csv --out table.json``.

Every preset runs on every image pair, one task per (pair, preset), each an ordinary
``auto_register(..., presets=[name])`` call. Runs are scored like the Register button scores them and,
when the cohort has label images, judged by the Dice of the warped moving labels against the fixed
labels. One table per modality pair is written in the schema of ``Resources/Presets/tables/*.json``:
presets ranked by mean Dice (else mean score; a failed run counts as 0), the racing schedule, the
scoring settings, and the evidence behind the ranking.

Tasks run in this process by default, on a Dask cluster with ``--scheduler ADDRESS``, or on a local
Dask cluster with ``--local-cluster``. Each finished task is appended to a JSONL state file at once,
so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .cli_common import Parser, ProgressBar
from .errors import Cancelled, InputError
from .events import ExitCode
from .events import is_cancelled as _is_cancelled
from .presets import RacingSchedule

REQUIRED_COLUMNS = ("fixed", "moving", "fixed_modality", "moving_modality")
OPTIONAL_COLUMNS = ("fixed_labels", "moving_labels")
#: Racing schedule written into learned tables that race more presets than they keep.
DEFAULT_RACING = RacingSchedule(coarse_shrink=2, keep=2)


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
            if _is_cancelled(cancel):
                raise Cancelled(f"cohort build stopped; {finished} of {total} tasks saved in {state_path}")
            progress({"event": "start", "candidate": label(pair, name), "fraction": finished / total})
            # Looked up at call time so tests can count the real runs.
            finish(pair, name, sys.modules[__name__].run_task(pair, name, timeout_s, threads_per_job))
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
                if _is_cancelled(cancel):
                    raise Cancelled(f"cohort build stopped; {finished} of {total} tasks saved in {state_path}")
        finally:
            client.cancel([f for f in futures if not f.done()])
    records = [done[(pair.key, name)] for pair, name in tasks]
    return {"records": records, "ran": ran, "skipped": len(tasks) - len(todo)}


def rank_presets(records: list[dict], presets: list[str]) -> tuple[list[dict], str]:
    """Per-preset evidence, best first, and what it was ranked by ('mean_dice' or 'mean_score').

    A run that did not end 'ok' counts as Dice 0 and score 0, so an unreliable preset ranks low.
    """
    use_dice = bool(records) and all(r.get("dice") is not None or r.get("status") != "ok" for r in records) \
        and any(r.get("dice") is not None for r in records)
    rows = []
    for name in presets:
        mine = [r for r in records if r["preset"] == name]
        ok = [r for r in mine if r.get("status") == "ok"]
        score = [r["score"] if r.get("status") == "ok" and r.get("score") is not None else 0.0 for r in mine]
        dice = [r["dice"] if r.get("status") == "ok" and r.get("dice") is not None else 0.0 for r in mine]
        seconds = [r["seconds"] for r in ok if r.get("seconds") is not None]
        rows.append({
            "preset": name, "runs": len(mine), "ok": len(ok), "failed": len(mine) - len(ok),
            "mean_score": float(np.mean(score)) if mine else 0.0,
            "mean_dice": float(np.mean(dice)) if use_dice and mine else None,
            "mean_seconds": float(np.mean(seconds)) if seconds else None,
        })
    key = "mean_dice" if use_dice else "mean_score"
    rows.sort(key=lambda r: (-(r[key] or 0.0), -r["ok"], r["mean_seconds"] or float("inf")))
    return rows, key


def selection_agreement(records: list[dict]) -> float | None:
    """Fraction of labelled pairs where the highest-scoring run also had the best Dice (within 0.005)."""
    by_pair: dict[str, list[dict]] = {}
    for r in records:
        if r.get("status") == "ok" and r.get("dice") is not None and r.get("score") is not None:
            by_pair.setdefault(r["pair"], []).append(r)
    hits = [max(rs, key=lambda r: r["score"])["dice"] >= max(r["dice"] for r in rs) - 0.005
            for rs in by_pair.values()]
    return float(np.mean(hits)) if hits else None


def build_table(fixed_modality: str, moving_modality: str, records: list[dict], presets: list[str],
                top: int | None = None) -> dict:
    """The learned table (plain data, schema of the built-in tables) for one modality pair."""
    from .presets import TABLE_SCHEMA

    rows, ranked_by = rank_presets(records, presets)
    kept = [r["preset"] for r in rows if r["ok"] > 0] or [rows[0]["preset"]]
    if top:
        kept = kept[:top]
    base = base_table(fixed_modality, moving_modality)
    racing = DEFAULT_RACING if len(kept) > DEFAULT_RACING.keep else None
    pairs = len({r["pair"] for r in records})
    agreement = selection_agreement(records)
    best = rows[0]
    summary = (f"Learned from {pairs} {moving_modality}->{fixed_modality} pair(s) x {len(presets)} preset(s); "
               f"ranked by {ranked_by.replace('_', ' ')}; best {best['preset']} "
               f"({ranked_by.replace('_', ' ')} {best[ranked_by]:.3f}).")
    if agreement is not None:
        summary += f" The top score had the best Dice in {100 * agreement:.0f}% of pairs."
    table = replace(base, name=f"{moving_modality}_to_{fixed_modality}", presets=(), racing=racing,
                    description=summary).to_dict()
    table.update(schema=TABLE_SCHEMA, presets=kept)
    table["evidence"] = {
        "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pairs": pairs, "ranked_by": ranked_by, "selection_agreement": agreement,
        "scoring_from": base.source or "defaults", "presets": rows,
    }
    return table


def build_tables(pairs: list[Pair], presets: list[str], out, state_path=None, client=None, top: int | None = None,
                 timeout_s: float | None = 600.0, threads_per_job: int | None = None, progress=None,
                 cancel=None) -> dict:
    """Run the cohort, then write one table per modality pair; return {"tables": {path: table}, "ran", "skipped"}.

    With a single modality pair `out` is the table file; with several it is a folder of
    ``MOVING_to_FIXED.json`` files.
    """
    from .presets import require_catalog_names

    require_catalog_names(presets)
    out = Path(out)
    modality_pairs = sorted({p.modality_pair for p in pairs})
    if len(modality_pairs) > 1 and out.suffix.lower() == ".json":
        raise InputError(f"the cohort has {len(modality_pairs)} modality pairs, so --out must be a folder, "
                         f"not {out.name}")
    state_path = Path(state_path) if state_path else default_state_path(out)
    run = run_cohort(pairs, presets, state_path, client=client, timeout_s=timeout_s,
                     threads_per_job=threads_per_job, progress=progress, cancel=cancel)
    written = {}
    for fixed_modality, moving_modality in modality_pairs:
        records = [r for r in run["records"]
                   if (r["fixed_modality"], r["moving_modality"]) == (fixed_modality, moving_modality)]
        table = build_table(fixed_modality, moving_modality, records, presets, top)
        path = out / f"{table['name']}.json" if len(modality_pairs) > 1 else out
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        written[str(path)] = table
    return {"tables": written, "ran": run["ran"], "skipped": run["skipped"], "state": str(state_path)}


def default_state_path(out) -> Path:
    """The state file next to --out: ``table.json`` -> ``table.state.jsonl``, ``folder`` -> ``folder.state.jsonl``."""
    out = Path(out)
    stem = out.name[: -len(out.suffix)] if out.suffix.lower() == ".json" else out.name
    return out.with_name(stem + ".state.jsonl")


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="autoregister tables", description="Learn preset tables from a cohort of image pairs.")
    sub = p.add_subparsers(dest="command", parser_class=Parser)
    b = sub.add_parser("build", help="run every preset on every pair and write ranked tables")
    b.add_argument("cohort", help="CSV with columns fixed, moving, fixed_modality, moving_modality "
                                  "[, fixed_labels, moving_labels]; relative paths are from the CSV's folder")
    b.add_argument("--out", required=True, help="table file (one modality pair) or folder (several)")
    b.add_argument("--presets", help="comma-separated preset names (default: every catalog preset)")
    where = b.add_mutually_exclusive_group()
    where.add_argument("--scheduler", help="address of a running Dask scheduler, e.g. tcp://host:8786")
    where.add_argument("--local-cluster", action="store_true", help="run on a Dask LocalCluster on this machine")
    b.add_argument("--workers", type=int, help="LocalCluster workers (default: one per two cores)")
    b.add_argument("--state", help="JSONL file of finished tasks, for resuming (default: next to --out)")
    b.add_argument("--top", type=int, help="keep only the N best presets in each table")
    b.add_argument("--timeout", type=float, default=600.0, help="seconds per run (default 600)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def tables_main(argv) -> int:
    """Run ``autoregister tables ...``; return the exit code (2 for user errors, 130 when interrupted)."""
    from .presets import load_catalog

    parser = _parser()
    args = parser.parse_args(argv)
    if args.command != "build":
        parser.error("a command is required: build")
    bar = None
    client = cluster = None
    try:
        if args.top is not None and args.top < 1:
            raise InputError(f"--top must be at least 1, got {args.top}")
        if args.timeout <= 0:
            raise InputError(f"--timeout must be positive, got {args.timeout}")
        pairs = read_cohort(args.cohort)
        presets = ([n.strip() for n in args.presets.split(",") if n.strip()] if args.presets
                   else list(load_catalog()))
        if args.scheduler or args.local_cluster:
            try:
                from distributed import Client, LocalCluster
            except ImportError:
                raise InputError("--scheduler and --local-cluster need `pip install dask[distributed]`") from None
            if args.scheduler:
                try:
                    client = Client(args.scheduler, timeout="10s")
                except (OSError, TimeoutError) as exc:
                    raise InputError(f"cannot reach the Dask scheduler at {args.scheduler}: {exc}") from None
            else:
                n = args.workers or max(1, (os.cpu_count() or 1) // 2)
                cluster = LocalCluster(n_workers=n, threads_per_worker=1, dashboard_address=None)
                client = Client(cluster)
        if not args.quiet:
            bar = ProgressBar()
        result = build_tables(pairs, presets, args.out, state_path=args.state, client=client, top=args.top,
                              timeout_s=args.timeout, progress=bar)
    except InputError as exc:
        print(f"autoregister tables: error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except (Cancelled, KeyboardInterrupt):
        state = args.state or default_state_path(args.out)
        print(f"autoregister tables: interrupted; finished runs are saved in {state}; "
              "run the same command again to resume", file=sys.stderr)
        return ExitCode.CANCELLED
    finally:
        if bar is not None:
            bar.close()
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    for path, table in result["tables"].items():
        print(f"{path}: {', '.join(table['presets'])}  ({table['description']})")
    print(f"{result['ran']} run(s) now, {result['skipped']} resumed from {result['state']}")
    return ExitCode.OK
