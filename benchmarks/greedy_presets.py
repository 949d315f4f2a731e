"""How do the greedy presets compare? Each preset alone through `auto_register`, by time, head error and Dice.

Cases: ICBM152 T2 -> T1 and T1 -> T1 at `--spacing-mm` with a known rigid + smooth B-spline misalignment
(8 degrees, 8 mm, 4 mm warp: the selection benchmark's "nonlinear" class), one per seed. Every preset runs
alone (``presets=[name]``, one job of one thread): "time" is the whole call (worker start, scoring),
"registration" the preset's own run in its worker; the head error is the mean point error over the head
against the known transform, Dice the mean CerebrA label Dice.

    python benchmarks/greedy_presets.py [--spacing-mm 3] [--seeds 0,1] [--pairs T2->T1,T1->T1]
        [--presets greedy-rigid,greedy-affine,greedy-deformable,elastix-bspline,ants-syn]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from AutoRegisterDev.data import label_dice, load_icbm, make_case, point_error_mm  # noqa: E402
from AutoRegisterLib.pipeline import auto_register  # noqa: E402
from AutoRegisterLib.scoring import head_mask  # noqa: E402

PAIRS = {"T1->T1": ("t1", "T1"), "T2->T1": ("t2", "T2")}
PRESETS = "greedy-rigid,greedy-affine,greedy-deformable,elastix-bspline,ants-syn"
MISALIGNMENT = {"rotation_deg": 8.0, "translation_mm": 8.0, "warp_mm": 4.0}


def main(argv=None) -> None:
    """Run every preset on every case and print one markdown row per (case, preset)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spacing-mm", type=float, default=3.0)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--pairs", default="T2->T1,T1->T1")
    p.add_argument("--presets", default=PRESETS)
    args = p.parse_args(argv)

    t1 = load_icbm("t1", args.spacing_mm)
    labels = load_icbm("labels", args.spacing_mm)
    sources = {"t1": t1}
    print(f"ICBM152 at {args.spacing_mm:g} mm, misalignment {MISALIGNMENT}, one job of one thread per run")
    print("| case | preset | time (s) | registration (s) | head error (mm) | Dice | status |")
    print("|---|---|---|---|---|---|---|")
    for pair in args.pairs.split(","):
        source, modality = PAIRS[pair]
        if source not in sources:
            sources[source] = load_icbm(source, args.spacing_mm)
        for seed in (int(s) for s in args.seeds.split(",")):
            case = make_case(sources[source], t1, seed, fixed_labels=labels, **MISALIGNMENT)
            mask = head_mask(case.fixed, "T1")
            name = f"{pair} seed {seed}"
            print(f"| {name} | (none) | | | {point_error_mm(case, _identity(), mask):.2f} | "
                  f"{label_dice(case, _identity()):.4f} | |", flush=True)
            for preset in args.presets.split(","):
                start = time.perf_counter()
                result = auto_register(case.fixed, case.moving, fixed_modality="T1", moving_modality=modality,
                                       presets=[preset], jobs=1, threads_per_job=1)
                seconds = time.perf_counter() - start
                cand = result.candidates[0]
                if cand.transform is None:
                    print(f"| {name} | {preset} | {seconds:.1f} | | | | {cand.status}: {cand.error} |", flush=True)
                    continue
                print(f"| {name} | {preset} | {seconds:.1f} | {cand.seconds:.1f} | {point_error_mm(case, cand.transform, mask):.2f} | "
                      f"{label_dice(case, cand.transform):.4f} | {cand.status} |", flush=True)


def _identity():
    import SimpleITK as sitk

    return sitk.Transform(3, sitk.sitkIdentity)


if __name__ == "__main__":
    main()
