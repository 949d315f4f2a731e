"""Calibrate and test the trust verdict (AutoRegisterLib/trust.py) on cases with ground truth.

Cases from the bundled ICBM152 T1/T2 (AutoRegisterDev.data), each clicked once with the pair's table:
good ones (rigid, affine, smooth warps, T1 and T2 moving), strong warps, noisy and low-contrast inputs,
slabs, heads turned 60-180° with the pose search off (the presets cannot recover those: true failures) and
a wrong modality pair. Per case the verdict's signals and the winner's true mean error over the head.

Cases alternate between a training half (the fit) and a held-out half (the report): on the held-out half,
how often the true error lies in the 90 % interval, the AUC of the estimate (the score behind red) for a
true error above 3 mm, red's hits and false alarms, and how many green results were above 2 mm.

``--fit`` writes the calibration fitted on the training half to AutoRegisterLib/resources/trust/
calibration.json (the command that refits it); ``--rescore`` refits from --out/trust.json without
registering again. A calibration plot (estimate against truth) goes to --out/trust.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from AutoRegisterDev.data import (  # noqa: E402
    covered_by_moving,
    load_icbm,
    make_case,
    point_error_mm,
    rotated_case,
    slab_case,
)
from AutoRegisterLib.pipeline import auto_register  # noqa: E402
from AutoRegisterLib.scoring import head_mask  # noqa: E402
from AutoRegisterLib.trust import (  # noqa: E402
    CALIBRATION_PATH,
    GRID_MM,
    Calibration,
    Signals,
    fit,
    has_second_opinion,
    signals,
)

FAILURE_MM, GREEN_MAX_TRUE_MM = 3.0, 2.0


def noisy(image, seed: int, noise: float, contrast: float):
    """`image` with its contrast scaled by `contrast` about the mean and Gaussian noise of `noise` x its std."""
    rng = np.random.default_rng(seed)
    arr = image.array.astype(np.float32)
    mean, std = float(arr.mean()), float(arr.std())
    out = mean + contrast * (arr - mean) + rng.normal(0.0, noise * std, arr.shape).astype(np.float32)
    return image.with_array(out)


def cases(sp: float):
    """(name, case, fixed modality, moving modality, click options) for every calibration case."""
    t1, t2 = load_icbm("t1", sp), load_icbm("t2", sp)
    src = {"T1": t1, "T2": t2}
    seed = 100
    for mod in ("T2", "T1"):
        for kind, opts in (("rigid", dict(rotation_deg=10.0, translation_mm=10.0)),
                           ("affine", dict(rotation_deg=8.0, translation_mm=8.0, scale=0.08)),
                           ("warp 3 mm", dict(rotation_deg=5.0, translation_mm=5.0, warp_mm=3.0))):
            for _ in range(2):
                seed += 1
                yield f"{mod} {kind} #{seed}", make_case(src[mod], t1, seed, **opts), "T1", mod, {}
    for mod in ("T2", "T1"):
        for warp in (6.0, 8.0):
            seed += 1
            yield (f"{mod} warp {warp:g} mm #{seed}",
                   make_case(src[mod], t1, seed, rotation_deg=5.0, translation_mm=5.0, warp_mm=warp), "T1", mod, {})
    for mod in ("T2", "T1"):
        for noise, contrast in ((0.3, 1.0), (0.6, 0.5), (1.0, 0.3), (1.5, 0.2)):
            seed += 1
            case = make_case(noisy(src[mod], seed, noise, contrast), t1, seed, rotation_deg=10.0, translation_mm=10.0)
            yield f"{mod} noise {noise:g} contrast {contrast:g} #{seed}", case, "T1", mod, {}
    for mod in ("T2", "T1"):
        for thick in (30.0, 50.0):
            seed += 1
            case = slab_case(src[mod], t1, thick, seed)
            case.region = covered_by_moving(case, head_mask(t1, "T1"))
            yield f"{mod} {thick:g} mm slab #{seed}", case, "T1", mod, {}
    for mod in ("T2", "T1"):
        for axis, angle in ((0, 60.0), (1, 90.0), (2, 120.0), (0, 150.0), (1, 180.0), (2, 75.0), (0, 105.0),
                            (2, 135.0)):
            seed += 1
            case, _ = rotated_case(src[mod], t1, axis, angle, seed)
            yield (f"{mod} turned {angle:g}° axis {axis}, no pose search #{seed}", case, "T1", mod,
                   {"pose_search": False})
    for axis, angle in ((2, 180.0), (0, 90.0)):
        seed += 1
        case, _ = rotated_case(t2, t1, axis, angle, seed)
        yield f"T2 turned {angle:g}° axis {axis} #{seed}", case, "T1", "T2", {}
    for mod, said in (("T2", "T1"), ("T1", "T2")):
        seed += 1
        case = make_case(src[mod], t1, seed, rotation_deg=10.0, translation_mm=10.0)
        yield f"{mod} said to be {said} #{seed}", case, "T1", said, {}


def run(args) -> list[dict]:
    """Click every case; record its signals, the verdict's cost and the winner's true error."""
    out = Path(args.out)
    records = []
    t1 = load_icbm("t1", args.spacing_mm)
    head = head_mask(t1, "T1")
    for name, case, fm, mm, opts in cases(args.spacing_mm):
        region = getattr(case, "region", head)
        t0 = time.perf_counter()
        result = auto_register(case.fixed, case.moving, fixed_modality=fm, moving_modality=mm,
                               timeout_s=args.timeout, judge=False, **opts)
        click_s = time.perf_counter() - t0
        rec = {"case": name, "click_seconds": click_s, "winner": result.best.name if result.best else None}
        if result.best is not None:
            t0 = time.perf_counter()
            sig, _ = signals(result)
            rec["signals_seconds"] = time.perf_counter() - t0
            rec["signals"] = sig.to_dict()
            rec["error_mm"] = point_error_mm(case, result.best.transform, region)
            rec["opinions"] = {}
            for c in result.candidates:
                tx = c.transform if c.transform is not None else c.coarse_transform
                rec["opinions"][c.name] = None if tx is None else point_error_mm(case, tx, region)
        records.append(rec)
        print(f"{name:<44} {rec['winner'] or 'none':<17} true {rec.get('error_mm', float('nan')):7.2f} mm  "
              f"nearest {rec.get('signals', {}).get('nearest_mm')}  median {rec.get('signals', {}).get('median_mm')}"
              f"  click {click_s:.1f} s", flush=True)
        (out / "trust.json").write_text(json.dumps({"args": vars(args), "cases": records}, indent=1))
    return records


def auc(scores, positives) -> float:
    """Area under the ROC curve of `scores` for `positives` (ties count half)."""
    scores, positives = np.asarray(scores, float), np.asarray(positives, bool)
    pos, neg = scores[positives], scores[~positives]
    if not len(pos) or not len(neg):
        return float("nan")
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum())
                 / (len(pos) * len(neg)))


def evaluate(records: list[dict], calibration: Calibration) -> dict:
    """The held-out numbers of issue #12 for `records` under `calibration`."""
    rows = []
    for rec in records:
        sig = Signals(**rec["signals"])
        light, est, low, high = calibration.judge(sig)
        rows.append({"case": rec["case"], "true": rec["error_mm"], "est": est, "low": low, "high": high,
                     "light": light})
    true = np.array([r["true"] for r in rows])
    inside = np.array([r["low"] <= r["true"] <= r["high"] for r in rows])
    fail = true > FAILURE_MM
    red = np.array([r["light"] == "red" for r in rows])
    green = np.array([r["light"] == "green" for r in rows])
    return {"rows": rows, "n": len(rows), "failures": int(fail.sum()), "inside": float(inside.mean()),
            "auc": auc([r["est"] for r in rows], fail), "red_hits": int((red & fail).sum()),
            "red_false": int((red & ~fail).sum()), "green": int(green.sum()),
            "green_above_2mm": int((green & (true > GREEN_MAX_TRUE_MM)).sum())}


def thresholds(records: list[dict], calibration: Calibration) -> tuple[float, float]:
    """Green's bound on the interval's upper end: the largest that keeps every training case above 2 mm out
    of green (with 10 % to spare), at most 2 mm; red's bound on the estimate: 3 mm."""
    highs = []
    for rec in records:
        sig = Signals(**rec["signals"])
        _, _, high = calibration.interval(sig)
        if rec["error_mm"] > GREEN_MAX_TRUE_MM and has_second_opinion(sig):
            highs.append(high)
    green = min([GREEN_MAX_TRUE_MM] + [0.9 * h for h in highs])
    return float(green), FAILURE_MM


def plot(rows: list[dict], path: Path) -> None:
    """Estimated against true error (log axes), the 90 % intervals, coloured by the light."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for r in rows:
        colour = {"green": "tab:green", "amber": "tab:orange", "red": "tab:red"}[r["light"]]
        ax.plot([r["true"]] * 2, [r["low"], r["high"]], color=colour, alpha=0.4)
        ax.plot(r["true"], r["est"], "o", color=colour)
    lim = [0.02, 300]
    ax.plot(lim, lim, "k--", lw=0.8)
    ax.axvline(FAILURE_MM, color="grey", lw=0.5)
    ax.set(xscale="log", yscale="log", xlim=lim, ylim=lim, xlabel="true mean error over the head (mm)",
           ylabel="estimated error (mm), 90 % interval", title="Trust verdict on held-out cases")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    """Run (or re-read) the cases, fit on the training half, report the held-out half."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spacing-mm", type=float, default=3.0)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", default="bench_out/trust")
    ap.add_argument("--rescore", action="store_true", help="re-read --out/trust.json instead of registering")
    ap.add_argument("--fit", action="store_true", help=f"write the fitted calibration to {CALIBRATION_PATH}")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = (json.loads((out / "trust.json").read_text())["cases"] if args.rescore else run(args))
    usable = [r for r in records if "error_mm" in r]
    train, held = usable[0::2], usable[1::2]
    cal = fit([Signals(**r["signals"]) for r in train], [r["error_mm"] for r in train])
    cal.green_max_mm, cal.red_min_mm = thresholds(train, cal)
    cal.fitted = {"cases": len(train), "spacing_mm": args.spacing_mm, "grid_mm": GRID_MM,
                  "command": f"python benchmarks/trust.py --fit --spacing-mm {args.spacing_mm:g}"}
    result = evaluate(held, cal)
    print()
    print(f"{'held-out case':<44}{'true':>8}{'est':>8}{'low':>8}{'high':>8}  light")
    for r in result["rows"]:
        print(f"{r['case']:<44}{r['true']:8.2f}{r['est']:8.2f}{r['low']:8.2f}{r['high']:8.2f}  {r['light']}")
    print()
    print(f"held out: {result['n']} cases, {result['failures']} true failures above {FAILURE_MM:g} mm")
    print(f"  true error inside the 90 % interval: {100 * result['inside']:.0f}%  (need >= 85%)")
    print(f"  AUC of the estimate for a failure: {result['auc']:.3f}  (need >= 0.9); red: "
          f"{result['red_hits']}/{result['failures']} failures, {result['red_false']} false alarms")
    print(f"  green: {result['green']} cases, {result['green_above_2mm']} above {GREEN_MAX_TRUE_MM:g} mm  (need 0)")
    verdict_s = [r["signals_seconds"] / r["click_seconds"] for r in usable if "signals_seconds" in r]
    if verdict_s:
        print(f"  signals: {100 * np.mean(verdict_s):.1f}% of the click on average, at most {100 * max(verdict_s):.1f}%")
    print(f"calibration: green if the interval's upper end <= {cal.green_max_mm:.2f} mm, red if the estimate > "
          f"{cal.red_min_mm:.2f} mm")
    plot(result["rows"], out / "trust.png")
    (out / "trust_eval.json").write_text(json.dumps(result, indent=1))
    if args.fit:
        cal.save()
        print(f"wrote {CALIBRATION_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
