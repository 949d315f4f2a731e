"""Which signal tells a fine deformable that truly fits from one that fits contrast? Evidence for the scorer.

Cases with a known smooth warp (ICBM152 at `--spacing-mm`): T1 -> T1 (mono-modal), T2 -> T1 (real contrast),
T2 with thick slices -> T1, and a contrast-inverted T1 -> T1 (synthetic contrast: one exact intensity map).
Deformables of different flexibility run alone (elastix-bspline 40 mm grid, elastix's defaults 10 mm grid,
ants-syn, BRAINSFit's B-splines...) beside an affine. Per candidate, without ground truth:

- `score`: the scorer's number (LNCC x coverage x complexity penalty, the table's grid and window);
- `lncc_coarse`: LNCC at a coarser scale than any backend optimises (4 mm grid, window 5: 20 mm);
- `ngf`: gradient-orientation agreement (normalised gradient fields, squared so contrast-inverting maps
  agree), a similarity no backend optimises;
- `bending`: mean bending energy of the displacement over the head (mm^-2; the scorer's
  `transforms.bending_energy`, on the scoring grid);
- `consensus_mm`: mean distance over the head to the voxelwise median of the other candidates' displacements;

and the truth: mean point error over the head. Per rule, the chosen candidate's regret against the truly
best candidate is printed; the scorer keeps the bending veto (`ScoringSettings.max_bending`).

    python benchmarks/flexibility.py [--spacing-mm 1] [--seeds 1] [--out bench_out/flexibility]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selection import CLASSES, pair_table  # noqa: E402

from AutoRegisterDev.data import contrast_inverted, load_icbm, make_case, point_error_mm  # noqa: E402
from AutoRegisterLib.backends.base import warp_with  # noqa: E402
from AutoRegisterLib.image import coarsened  # noqa: E402
from AutoRegisterLib.pipeline import auto_register  # noqa: E402
from AutoRegisterLib.presets import table_from_presets  # noqa: E402
from AutoRegisterLib.scoring import ScoringSettings, combined_score, head_mask, score_candidate  # noqa: E402
from AutoRegisterLib.transforms import bending_energy, displacement_on_grid  # noqa: E402

CANDIDATES = ["ants-affine", "elastix-bspline", "elastix-defaults", "ants-syn", "brainsfit-bspline",
              "brainsfit-defaults", "ants-defaults"]
#: Grid (mm) of the signals that need no particular scale.
SIGNAL_GRID_MM = 2.0
COARSE_GRID_MM = 4.0


def ngf(fixed: np.ndarray, warped: np.ndarray, region: np.ndarray, spacing_zyx) -> float:
    """Mean squared cosine between the two images' gradients, each regularised by its mean gradient norm."""
    gf = np.stack(np.gradient(fixed.astype(np.float64), *spacing_zyx), -1)
    gm = np.stack(np.gradient(warped.astype(np.float64), *spacing_zyx), -1)
    nf, nm = (gf ** 2).sum(-1), (gm ** 2).sum(-1)
    ef, em = np.sqrt(nf[region]).mean() ** 2, np.sqrt(nm[region]).mean() ** 2
    cos2 = (gf * gm).sum(-1) ** 2 / ((nf + ef) * (nm + em))
    return float(cos2[region].mean())


def measure(case, cands: dict, table_scoring: ScoringSettings) -> dict:
    """The signals of every candidate (see the module docstring)."""
    grid = coarsened(case.fixed, SIGNAL_GRID_MM)
    head = head_mask(grid, "T1")
    spacing = tuple(reversed(grid.spacing_mm))
    coarse_f, coarse_m = coarsened(case.fixed, COARSE_GRID_MM), coarsened(case.moving, COARSE_GRID_MM)
    coarse_head = head_mask(coarse_f, "T1")
    moving2 = coarsened(case.moving, SIGNAL_GRID_MM)
    loose = replace(table_scoring, max_folding_fraction=1.0, min_jacobian=-1e30, min_coverage=0.0)
    disps = {n: displacement_on_grid(c.transform, grid) for n, c in cands.items()}
    out = {}
    for name, cand in cands.items():
        w = warp_with(cand.transform, grid, moving2)
        region = head & w.valid_mask
        wc = warp_with(cand.transform, coarse_f, coarse_m)
        mc = score_candidate(coarse_f, wc.warped, wc.valid_mask, coarse_head, replace(loose, window_voxels=5))
        others = [d for n, d in disps.items() if n != name]
        median = np.median(np.stack(others), axis=0)
        out[name] = {
            "transform_type": cand.transform_type, "score": cand.score, "lncc": cand.lncc,
            "coverage": cand.coverage,
            "lncc_coarse": mc["lncc"],
            "ngf": ngf(grid.array, w.warped.array, region, spacing),
            "bending": bending_energy(cand.transform, grid, head, disps[name]),
            "consensus_mm": float(np.linalg.norm(disps[name] - median, axis=-1)[head].mean()),
            "error_mm": point_error_mm(case, cand.transform, head_mask(case.fixed, "T1")),
        }
    return out


def rules(settings: ScoringSettings) -> dict:
    """Selection rules compared: name -> function(signals of one candidate) -> number to maximise."""

    def scored(key):
        return lambda s: combined_score(s[key], s["coverage"], s["transform_type"], settings)

    limit = ScoringSettings().max_bending

    def vetoed(s):
        return s["score"] if s["bending"] <= limit else -1.0

    return {
        "score (LNCC, no bending veto)": lambda s: s["score"],
        f"score, bending veto {limit:.0e} (kept)": vetoed,
        "score - 100 x bending (a penalty)": lambda s: s["score"] - 100.0 * s["bending"],
        "coarse LNCC": scored("lncc_coarse"),
        "NGF": scored("ngf"),
        "LNCC x NGF": lambda s: s["score"] * s["ngf"],
        "LNCC x coarse LNCC": lambda s: s["score"] * s["lncc_coarse"],
        "closest to consensus": lambda s: -s["consensus_mm"],
    }


def report(cases: list[dict], settings: ScoringSettings) -> str:
    """Per case, every candidate's signals and truth; per rule, its choices and regret."""
    lines = []
    for c in cases:
        lines.append(f"\n{c['name']} (truly best: {min(c['cands'].values(), key=lambda s: s['error_mm'])['name']})")
        lines.append("| candidate | error (mm) | score | LNCC | coarse LNCC | NGF | bending | consensus (mm) |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for n, s in sorted(c["cands"].items(), key=lambda kv: kv[1]["error_mm"]):
            lines.append(f"| {n} | {s['error_mm']:.2f} | {s['score']:.4f} | {s['lncc']:.4f} | {s['lncc_coarse']:.4f} "
                         f"| {s['ngf']:.4f} | {s['bending']:.2e} | {s['consensus_mm']:.2f} |")
    lines.append("\n| rule | " + " | ".join(c["name"] for c in cases) + " | mean regret (mm) |")
    lines.append("|---|" + "---|" * (len(cases) + 1))
    for label, key in rules(settings).items():
        row, regrets = [], []
        for c in cases:
            pick = max(c["cands"].values(), key=key)
            best = min(s["error_mm"] for s in c["cands"].values())
            regrets.append(pick["error_mm"] - best)
            row.append(f"{pick['name']} (+{regrets[-1]:.2f})")
        lines.append(f"| {label} | " + " | ".join(row) + f" | {np.mean(regrets):.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Run the cases, print the report, write flexibility.json into --out."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spacing-mm", type=float, default=1.0)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--pairs", default="T1->T1,T2->T1,T2 thick->T1,T1 inverted->T1")
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--thick-mm", type=float, default=5.0)
    ap.add_argument("--out", default="bench_out/flexibility")
    ap.add_argument("--report-only", action="store_true", help="re-print the report of --out/flexibility.json")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        data = json.loads((out / "flexibility.json").read_text())
        print(report(data["cases"], pair_table("T2_to_T1", None).scoring))
        return 0
    t1 = load_icbm("t1", args.spacing_mm)
    sources = {"T1->T1": (t1, "T1"), "T2->T1": (load_icbm("t2", args.spacing_mm), "T2"),
               "T1 inverted->T1": (contrast_inverted(t1), "T2")}
    sources["T2 thick->T1"] = sources["T2->T1"]
    table = pair_table("T2_to_T1", None)
    names = [n.strip() for n in args.candidates.split(",") if n.strip()]
    cases = []
    for seed in range(args.seeds):
        for pi, pair in enumerate(args.pairs.split(",")):
            source, modality = sources[pair]
            case = make_case(source, t1, 1000 + 10 * seed + pi, **CLASSES["nonlinear"])
            if "thick" in pair:
                case = replace(case, moving=coarsened(case.moving, (0.0, 0.0, args.thick_mm)))
            t0 = time.perf_counter()
            cands = {}
            for n in names:
                r = auto_register(case.fixed, case.moving, fixed_modality="T1", moving_modality=modality,
                                  table=table_from_presets([n], table), presets=[n], jobs=1, pose_search=False,
                                  judge=False)
                if r.candidates[0].transform is not None and r.candidates[0].score is not None:
                    cands[n] = r.candidates[0]
            signals = measure(case, cands, table.scoring)
            for n, s in signals.items():
                s["name"] = n
            cases.append({"name": f"{pair} #{seed}", "cands": signals})
            print(f"{pair} #{seed}: " + ", ".join(f"{n} {s['error_mm']:.2f} mm" for n, s in signals.items())
                  + f" [{time.perf_counter() - t0:.0f} s]", flush=True)
            (out / "flexibility.json").write_text(json.dumps({"args": vars(args), "cases": cases}, indent=1))
    text = report(cases, table.scoring)
    print(text)
    (out / "flexibility.json").write_text(json.dumps({"args": vars(args), "cases": cases, "report": text}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
