"""How fine must a preset register? Each preset run on the same case at several working grids.

The case is at `--spacing-mm` (ICBM152 T2 or T1 -> T1 with a known rigid + smooth warp, as in `make demo`);
each preset registers copies of both images coarsened to a working grid (`image.coarsened`), and its
transform, being physical, is judged at the case's own resolution: mean point error over the head and
CerebrA Dice. Times are the backend's alone (toolkits loaded beforehand, `--threads` threads).

    python benchmarks/working_grid.py [--spacing-mm 1] [--grids 1,1.5,2,3] [--presets ants-rigid,...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from AutoRegisterDev.data import label_dice, load_icbm, make_case, point_error_mm  # noqa: E402
from AutoRegisterLib.backends import get_backend  # noqa: E402
from AutoRegisterLib.image import coarsened  # noqa: E402
from AutoRegisterLib.presets import load_catalog  # noqa: E402
from AutoRegisterLib.scoring import head_mask  # noqa: E402


def main(argv=None) -> int:
    """Print time, head error and Dice per preset and working grid."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spacing-mm", type=float, default=1.0)
    ap.add_argument("--grids", default="1,1.5,2,3", help="working grid spacings in mm")
    ap.add_argument("--presets", default="ants-rigid,ants-affine,ants-syn,elastix-bspline,sitk-rigid")
    ap.add_argument("--moving", default="t2", choices=("t1", "t2"))
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    catalog = load_catalog()
    t1 = load_icbm("t1", args.spacing_mm)
    case = make_case(load_icbm(args.moving, args.spacing_mm), t1, args.seed,
                     fixed_labels=load_icbm("labels", args.spacing_mm), rotation_deg=10.0, translation_mm=8.0,
                     warp_mm=4.0)
    head = head_mask(case.fixed, "T1")
    grids = [float(g) for g in args.grids.split(",")]
    print(f"ICBM152 {args.moving.upper()} -> T1 at {args.spacing_mm:g} mm, seed {args.seed}, {args.threads} threads")
    print(f"{'preset':<20}{'grid mm':>8}{'seconds':>9}{'head err mm':>13}{'Dice':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        warm = coarsened(case.fixed, 6.0), coarsened(case.moving, 6.0)
        for name in args.presets.split(","):
            preset = catalog[name]
            backend = get_backend(preset.backend)
            (Path(tmp) / f"warm-{name}").mkdir()
            backend.estimate(preset, *warm, Path(tmp) / f"warm-{name}", args.threads)  # the toolkit loads here
            for g in grids:
                fixed, moving = coarsened(case.fixed, g), coarsened(case.moving, g)
                work = Path(tmp) / f"{name}-{g}"
                work.mkdir()
                t0 = time.perf_counter()
                transform = backend.estimate(preset, fixed, moving, work, args.threads)
                seconds = time.perf_counter() - t0
                err, dice = point_error_mm(case, transform, head), label_dice(case, transform)
                print(f"{name:<20}{g:>8g}{seconds:>9.1f}{err:>13.2f}{dice:>8.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
