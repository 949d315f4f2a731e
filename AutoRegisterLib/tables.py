"""Learn preset tables from a cohort: ``autoregister tables build COHORT.csv --out table.json``.

The cohort's runs (`cohort.py`: every preset on every image pair, resumable, here or on Dask) are ranked
per modality pair, and one table per pair is written in the schema of the built-in tables
(``resources/presets/tables/*.json``): presets ranked by mean Dice (else mean score; a failed run counts
as 0), the racing schedule, the scoring settings, and the evidence behind the ranking. This module also
holds the ``autoregister tables`` command (``--scheduler ADDRESS`` or ``--local-cluster`` for Dask).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from .cli_common import Parser, ProgressBar
from .cohort import Pair, base_table, read_cohort, run_cohort
from .errors import Cancelled, InputError
from .events import ExitCode
from .presets import RacingSchedule

#: Racing schedule written into learned tables that race more presets than they keep.
DEFAULT_RACING = RacingSchedule(coarse_shrink=2, keep=2)

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
