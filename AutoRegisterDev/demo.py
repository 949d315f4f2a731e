"""`make demo`: one-click registration of the real ICBM152 T2 onto T1 with a known misalignment.

The T2 is moved by a known rigid + smooth nonlinear transform; the demo registers it back with the
same `auto_register` the button uses, then prints every candidate's true error (mean point error over
the whole head, and CerebrA label Dice), the winner, and how the run's wall time compares with what a
user already has: elastix's own default maps (rigid, affine, B-spline) run by hand, timed in the same
run, and each preset run alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    """Run the demo and print its checks; return 0 when a result was kept, 3 when no preset succeeded."""
    from AutoRegisterLib.cli_common import ProgressBar
    from AutoRegisterLib.image import write_image
    from AutoRegisterLib.pipeline import auto_register
    from AutoRegisterLib.report import format_table, write_outputs
    from AutoRegisterLib.scoring import head_mask

    from .data import initial_error_mm, label_dice, load_icbm, make_case, point_error_mm

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_out")
    p.add_argument("--spacing-mm", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--jobs", type=int)
    p.add_argument("--skip-alone", action="store_true", help="do not time the slowest preset alone")
    p.add_argument("--skip-reference", action="store_true", help="do not run elastix's default maps by hand")
    args = p.parse_args(argv)

    out = Path(args.out)
    (out / "inputs").mkdir(parents=True, exist_ok=True)
    t1, t2 = load_icbm("t1", args.spacing_mm), load_icbm("t2", args.spacing_mm)
    labels = load_icbm("labels", args.spacing_mm)
    case = make_case(t2, t1, args.seed, fixed_labels=labels, rotation_deg=10.0, translation_mm=8.0,
                     warp_mm=4.0, description="ICBM152 T2 -> T1, rigid + smooth nonlinear")
    head = head_mask(case.fixed, "T1")
    fixed_path, moving_path = out / "inputs" / "fixed_T1.nii.gz", out / "inputs" / "moving_T2.nii.gz"
    write_image(case.fixed, fixed_path)
    write_image(case.moving, moving_path)
    print(f"{case.description} at {args.spacing_mm:g} mm; mean error before registration "
          f"{initial_error_mm(case, head):.2f} mm over the head")

    print(brainsfit_note())
    bar = ProgressBar()
    result = auto_register(fixed_path, moving_path, fixed_modality="T1", moving_modality="T2", jobs=args.jobs,
                           progress=bar)
    bar.close()
    write_outputs(result, out / "registration", keep_all=True)

    truth = {}
    for c in result.candidates:
        if c.transform is not None:
            truth[c.name] = {"err_mm": point_error_mm(case, c.transform, head), "dice": label_dice(case, c.transform)}
    print(format_table(result, truth))

    checks = []
    if result.best is not None and truth:
        best_err = truth[result.best.name]["err_mm"]
        oracle = min(truth, key=lambda n: truth[n]["err_mm"])
        print(f"winner {result.best.name}: {best_err:.2f} mm over the head, Dice {truth[result.best.name]['dice']:.3f}; "
              f"best of the race {oracle}: {truth[oracle]['err_mm']:.2f} mm")
        if args.spacing_mm == 2.0:  # the bar measured for the 2 mm case
            checks.append(("winner's head error <= 1.2 mm", best_err <= 1.2))
    score_s = sum(c.score_seconds or 0.0 for c in result.candidates)
    print(f"scoring took {score_s:.2f} s of {result.wall_seconds:.1f} s ({100 * score_s / result.wall_seconds:.1f}%); "
          f"loading the scorer took {result.scorer_setup_seconds:.1f} s on a thread while the workers started")
    checks.append(("scoring <= 5% of the total", score_s <= 0.05 * result.wall_seconds))
    if result.pose:
        share = result.pose["seconds"] / result.wall_seconds
        print(f"pose search took {result.pose['seconds']:.2f} s ({100 * share:.1f}%); start: "
              f"{'a ' + result.pose['source'] if result.pose['applied'] else 'the header'}")
        checks.append(("pose search <= 15% of the click", share <= 0.15))
    if result.trust is not None:
        v = result.trust
        true_err = truth[result.best.name]["err_mm"]
        print(f"trust verdict {v.light.upper()}: estimated {v.estimate_mm:.2f} mm (90 %: {v.low_mm:.2f}-{v.high_mm:.2f}), "
              f"true {true_err:.2f} mm; {v.reason}; it took {v.seconds:.2f} s "
              f"({100 * v.seconds / result.wall_seconds:.1f}% of the click)")
        checks.append(("trust verdict <= 10% of the click", v.seconds <= 0.10 * result.wall_seconds))
        checks.append(("the true error lies in the verdict's 90 % interval", v.low_mm <= true_err <= v.high_mm))

    if not args.skip_alone:
        # Racing runs a preset twice and on warm workers, so a candidate's own seconds do not say which preset
        # is slowest when run alone: time each one alone, as a one-preset button press.
        # Racing eliminates presets early, so their full-resolution accuracy also comes from these runs.
        alone, errors = {}, {}
        for c in result.candidates:
            if c.status != "unavailable":
                t0 = time.perf_counter()
                single = auto_register(fixed_path, moving_path, fixed_modality="T1", moving_modality="T2",
                                       presets=[c.name], jobs=1).candidates[0]
                alone[c.name] = time.perf_counter() - t0
                if single.transform is not None:
                    errors[c.name] = point_error_mm(case, single.transform, head)
        if errors and result.best is not None:
            truly_best = min(errors, key=errors.get)
            print(f"truly best preset (each run alone): {truly_best}, {errors[truly_best]:.2f} mm")
            checks.append(("winner within 0.1 mm of the truly best",
                           truth[result.best.name]["err_mm"] <= errors[truly_best] + 0.1))
        linear = {n: e for n, e in errors.items()
                  if next(c for c in result.candidates if c.name == n).transform_type != "deformable"}
        if linear:
            floor = min(linear.values())
            print("linear presets alone: " + ", ".join(f"{n} {e:.2f} mm" for n, e in linear.items())
                  + f" (best linear {floor:.2f} mm)")
            checks.append(("every linear preset within 0.3 mm of the best linear", max(linear.values()) <= floor + 0.3))
        slowest = max(alone, key=alone.get)
        print("each preset alone: " + ", ".join(
            f"{n} {s:.1f} s" + (f" {errors[n]:.2f} mm" if n in errors else "") for n, s in alone.items()))
        print(f"one click took {result.wall_seconds:.1f} s = {result.wall_seconds / alone[slowest]:.2f}x the slowest "
              f"preset alone ({slowest})")
        checks.append(("one click <= 1.5x the slowest preset alone", result.wall_seconds <= 1.5 * alone[slowest]))

    if not args.skip_reference:
        ref_s, ref_transform = reference_elastix(case, out / "reference")
        ref_err = point_error_mm(case, ref_transform, head)
        print(f"reference: elastix's default maps (rigid, affine, B-spline) by hand, {os.cpu_count()} threads, "
              f"toolkit loaded beforehand: {ref_s:.1f} s, {ref_err:.2f} mm over the head")
        print(f"one click took {result.wall_seconds:.1f} s = {result.wall_seconds / ref_s:.2f}x the reference")
        checks.append(("one click <= 1.5x the reference elastix run", result.wall_seconds <= 1.5 * ref_s))
        if result.best is not None:
            checks.append(("winner's head error <= the reference's + 0.1 mm",
                           truth[result.best.name]["err_mm"] <= ref_err + 0.1))

    print(f"report: {out / 'registration' / 'report.png'}")
    for name, ok in checks:
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    # The checks are measurements to read, not a verdict on the run: a kept result is a successful demo.
    return 0 if result.best is not None else 3


def brainsfit_note() -> str:
    """Whether the BRAINSFit presets can race here, and why not when they cannot."""
    from AutoRegisterLib.backends import get_backend

    ok, reason = get_backend("brainsfit").availability()
    return "BRAINSFit: available" if ok else f"BRAINSFit: unavailable, its presets are left out ({reason})"


def reference_elastix(case, workdir: Path):
    """Elastix's default maps run by hand on the case (itk-elastix in this process, every core, the
    toolkit loaded first so its load is not timed): (seconds, its fixed -> moving transform)."""
    import itk

    from AutoRegisterLib.backends import get_backend
    from AutoRegisterLib.presets import load_catalog

    itk.ParameterObject.New()  # loading itk-elastix takes ~8 s; in a user's open session it is loaded
    preset = load_catalog()["elastix-defaults"]
    backend = get_backend(preset.backend)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    transform = backend.estimate(preset, case.fixed, case.moving, workdir, os.cpu_count() or 1)
    return time.perf_counter() - t0, transform


if __name__ == "__main__":
    sys.exit(main())
