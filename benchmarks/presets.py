"""Time and true point error of every preset on the demo-like case (ICBM T2->T1 at 2 mm).

The case: rotation up to ±10°, ~8 mm translation and a ~4 mm (per control point) smooth B-spline warp; the error is
the mean |G(T(x)) - x| over the fixed head mask (see AutoRegisterDev/data.py).

    python benchmarks/presets.py [--spacing 2] [--seeds 0,1] [--presets a,b] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from AutoRegisterDev.data import initial_error_mm, load_icbm, make_case, point_error_mm  # noqa: E402
from AutoRegisterLib.backends import Preset, get_backend  # noqa: E402
from AutoRegisterLib.presets import CATALOG_PATH  # noqa: E402
from AutoRegisterLib.scoring import head_mask  # noqa: E402


def demo_case(spacing_mm: float, seed: int, rotation_deg: float = 10.0):
    """ICBM T2 -> T1 with a known rigid + smooth nonlinear misalignment, as in AutoRegisterDev/demo.py."""
    fixed = load_icbm("t1", spacing_mm)
    source = load_icbm("t2", spacing_mm)
    return make_case(source, fixed, seed, rotation_deg=rotation_deg, translation_mm=8.0, warp_mm=4.0)


def main(argv=None) -> int:
    """Run the chosen presets on the demo-like case(s) and print a table (and JSON with --json)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spacing", type=float, default=2.0)
    ap.add_argument("--seeds", default="7")
    ap.add_argument("--rotation", type=float, default=10.0)
    ap.add_argument("--presets", default="")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    catalog = [Preset.from_dict(d) for d in json.loads(CATALOG_PATH.read_text())["presets"]]
    wanted = [p for p in catalog if not args.presets or p.name in args.presets.split(",")]
    rows = []
    # Toolkit loading is paid once per worker process; time it apart so the per-preset times compare.
    for module, attr in (("ants", "registration"), ("itk", "ElastixRegistrationMethod")):
        t0 = time.perf_counter()
        getattr(__import__(module), attr)
        print(f"loading {module}: {time.perf_counter() - t0:.1f} s (once per process)", flush=True)
    for seed in [int(s) for s in args.seeds.split(",")]:
        case = demo_case(args.spacing, seed, args.rotation)
        mask = head_mask(case.fixed, "T1")
        print(f"seed {seed}: error before registration {initial_error_mm(case, mask):.2f} mm", flush=True)
        for preset in wanted:
            backend = get_backend(preset.backend)
            ok, reason = backend.availability()
            if not ok:
                print(f"  {preset.name:18s} unavailable: {reason}", flush=True)
                continue
            t0 = time.perf_counter()
            out = backend.run(preset, case.fixed, case.moving, threads=args.threads)
            seconds = time.perf_counter() - t0
            err = point_error_mm(case, out.transform, mask)
            rows.append({"preset": preset.name, "seed": seed, "seconds": seconds, "error_mm": err})
            print(f"  {preset.name:18s} {seconds:6.1f} s  {err:5.2f} mm", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
