"""Which BRAINSFit settings to ship? Every variant alone on the selection benchmark's cases, by Dice and head error.

The cases are those of `benchmarks/selection.py` (same classes, pairs and seeds): ICBM152 T1 -> T1 and
T2 -> T1 at `--spacing-mm`, `--per-class` known misalignments per class. Each variant changes one choice
of the base preset (sampling percentage, initialisation, B-spline grid, histogram bins, ROIAUTO masking),
and BRAINSFit's own defaults run as a variant too. Variants run the backend directly (no race, no scoring),
so the numbers are the truth of each setting alone.

    python benchmarks/brainsfit_presets.py [--spacing-mm 3] [--per-class 2] [--only rigid,affine,deformable]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from selection import CLASSES, PAIRS  # noqa: E402

from AutoRegisterDev.data import label_dice, load_icbm, make_case, point_error_mm  # noqa: E402
from AutoRegisterLib.backends import Preset, get_backend  # noqa: E402
from AutoRegisterLib.scoring import head_mask  # noqa: E402

#: BRAINSFit's own defaults (its --help; Slicer's "General Registration (BRAINS)" starts from them).
BRAINSFIT_DEFAULTS = {"initialize_transform_mode": "Off", "sampling_percentage": 0.002,
                      "spline_grid_size": [14, 10, 12], "histogram_bins": 50}
LINEAR_VARIANTS = [
    ("base (moments, 5 %, 50 bins)", {}),
    ("init Off", {"initialize_transform_mode": "Off"}),
    ("init useGeometryAlign", {"initialize_transform_mode": "useGeometryAlign"}),
    ("init useCenterOfHeadAlign", {"initialize_transform_mode": "useCenterOfHeadAlign"}),
    ("sampling 0.2 %", {"sampling_percentage": 0.002}),
    ("sampling 1 %", {"sampling_percentage": 0.01}),
    ("sampling 20 %", {"sampling_percentage": 0.2}),
    ("32 bins", {"histogram_bins": 32}),
    ("ROIAUTO masks", {"mask_processing_mode": "ROIAUTO"}),
    ("BRAINSFit defaults", {k: v for k, v in BRAINSFIT_DEFAULTS.items() if k != "spline_grid_size"}),
]
BSPLINE_VARIANTS = [
    ("base (moments, 5 %, 50 bins, grid 8)", {}),
    ("grid 4", {"spline_grid_size": [4, 4, 4]}),
    ("grid 5", {"spline_grid_size": [5, 5, 5]}),
    ("grid 6", {"spline_grid_size": [6, 6, 6]}),
    ("sampling 1 %", {"sampling_percentage": 0.01}),
    ("64 bins", {"histogram_bins": 64}),
    ("ROIAUTO masks", {"mask_processing_mode": "ROIAUTO"}),
    ("BRAINSFit defaults", dict(BRAINSFIT_DEFAULTS)),
]


def variants(kinds) -> list:
    """(transform_type, label, Preset) for every variant of the chosen kinds."""
    out = []
    for kind in kinds:
        table = BSPLINE_VARIANTS if kind == "deformable" else LINEAR_VARIANTS
        for label, params in table:
            out.append((kind, label, Preset(f"brainsfit-{kind}:{label}", "brainsfit", kind, dict(params))))
    return out


def summarize(rows: list, kinds) -> str:
    """Per variant: mean Dice, mean head error and mean time over the cases, per pair and overall."""
    lines = []
    pairs = sorted({r["pair"] for r in rows})
    for kind in kinds:
        lines += ["", f"BRAINSFit {kind}: mean over {len({r['case'] for r in rows})} cases",
                  "| variant | " + " | ".join(f"{p} Dice" for p in pairs) + " | mean Dice | mean head error (mm) "
                  "| worst head error (mm) | mean time (s) | failed |", "|---|" + "---|" * (len(pairs) + 5)]
        for label in dict.fromkeys(r["variant"] for r in rows if r["kind"] == kind):
            sel = [r for r in rows if r["kind"] == kind and r["variant"] == label]
            ok = [r for r in sel if r["dice"] is not None]
            per_pair = [np.mean([r["dice"] for r in ok if r["pair"] == p]) if ok else np.nan for p in pairs]
            lines.append(f"| {label} | " + " | ".join(f"{d:.4f}" for d in per_pair)
                         + f" | {np.mean([r['dice'] for r in ok]):.4f} | {np.mean([r['error_mm'] for r in ok]):.2f}"
                         f" | {np.max([r['error_mm'] for r in ok]):.2f} | {np.mean([r['seconds'] for r in sel]):.1f}"
                         f" | {len(sel) - len(ok)} |")
    # Where a transform type is the right model (rigid on rigid cases, ...), the setting's own accuracy shows.
    for kind, cls in (("rigid", "rigid"), ("affine", "affine"), ("deformable", "nonlinear")):
        sel = [r for r in rows if r["kind"] == kind and f" {cls} " in r["case"] and r["dice"] is not None]
        if kind not in kinds or not sel:
            continue
        lines += ["", f"BRAINSFit {kind} on the {cls} cases alone ({len({r['case'] for r in sel})} cases)",
                  "| variant | mean Dice | mean head error (mm) | worst head error (mm) | mean time (s) |",
                  "|---|---|---|---|---|"]
        for label in dict.fromkeys(r["variant"] for r in sel):
            v = [r for r in sel if r["variant"] == label]
            lines.append(f"| {label} | {np.mean([r['dice'] for r in v]):.4f} | {np.mean([r['error_mm'] for r in v]):.2f}"
                         f" | {np.max([r['error_mm'] for r in v]):.2f} | {np.mean([r['seconds'] for r in v]):.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run every variant on every case; print the tables; write brainsfit_presets.json/.txt into --out."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spacing-mm", type=float, default=3.0)
    ap.add_argument("--per-class", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="rigid,affine,deformable", help="transform types to study")
    ap.add_argument("--out", default="bench_out/brainsfit_presets")
    ap.add_argument("--report-only", nargs="+", metavar="JSON",
                    help="print the tables of earlier runs' brainsfit_presets.json files (merged), run nothing")
    args = ap.parse_args(argv)
    kinds = [k.strip() for k in args.only.split(",") if k.strip()]
    if args.report_only:
        rows = [r for path in args.report_only for r in json.loads(Path(path).read_text())["rows"]]
        print(summarize(rows, [k for k in ("rigid", "affine", "deformable") if any(r["kind"] == k for r in rows)]))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    backend = get_backend("brainsfit")
    ok, reason = backend.availability()
    if not ok:
        print(f"BRAINSFit cannot run: {reason}")
        return 1
    t1 = load_icbm("t1", args.spacing_mm)
    labels = load_icbm("labels", args.spacing_mm)
    sources = {"t1": t1, "t2": load_icbm("t2", args.spacing_mm)}
    rows = []
    for k in range(args.per_class):
        for ci, (cls, misalignment) in enumerate(CLASSES.items()):
            for pi, (pair, (source, _, _)) in enumerate(PAIRS.items()):
                seed = args.seed * 10000 + k * 100 + ci * 10 + pi  # the seeds of selection.py
                case = make_case(sources[source], t1, seed, fixed_labels=labels, **misalignment)
                name = f"{pair} {cls} #{k}"
                head = head_mask(case.fixed, "T1")
                for kind, label, preset in variants(kinds):
                    t0 = time.perf_counter()
                    row = {"case": name, "pair": pair, "kind": kind, "variant": label}
                    try:
                        with tempfile.TemporaryDirectory(prefix="bf-") as tmp:
                            transform = backend.estimate(preset, case.fixed, case.moving, Path(tmp), args.threads)
                        row.update(seconds=time.perf_counter() - t0, dice=label_dice(case, transform),
                                   error_mm=point_error_mm(case, transform, head))
                    except Exception as exc:  # a failing variant is a result too
                        row.update(seconds=time.perf_counter() - t0, dice=None, error_mm=None, error=str(exc)[:300])
                    rows.append(row)
                    print(f"{name:22s} {kind:10s} {label:40s} "
                          + (f"Dice {row['dice']:.4f} err {row['error_mm']:.2f} mm" if row["dice"] is not None
                             else f"FAILED {row['error']}") + f"  {row['seconds']:.1f} s", flush=True)
                (out / "brainsfit_presets.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    report = summarize(rows, kinds)
    print(report)
    (out / "brainsfit_presets.txt").write_text(report + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
