"""One-click registration: race presets in parallel worker processes, score each result, keep the best.

Data flows one way: the user's images → `Image` (checked, NaN-free float copies) → the table of the
modality pair → the race (`race.py`: worker pool in `runner.py`, scores in `scoring.py`) → the candidates,
ranked → a `RegistrationResult` (`results.py`). Nothing is written here: `report.write_outputs` writes a
result (the command line and the demo call it).
"""

from __future__ import annotations

import os
import time

from .errors import Cancelled, InputError
from .events import Status, is_cancelled
from .image import Image, as_image, covering_grid, prepare_input
from .masks import load_user_masks
from .modality import modality_or_guess
from .pose import Pose, PoseSettings, posed, search_pose, with_pose
from .presets import Table, table_from_presets, with_focus_preset
from .presets import resolve_table as presets_resolve_table
from .race import effective_schedule, race_masks, ranked, run_race
from .results import Candidate, RegistrationResult
from .scoring import pick_device, require_torch

# Re-exported: user code and the Slicer module import the result types from here.
__all__ = ["Candidate", "RegistrationResult", "auto_register", "resolve_table"]

#: Where the winner's warped image lies: the fixed grid, or that grown to keep the whole moving extent.
OUTPUT_GRIDS = ("fixed", "union")


def resolve_table(fixed: Image, moving: Image, fixed_modality, moving_modality, table,
                  presets) -> tuple[str, str, Table]:
    """Pick modalities (given or guessed) and the table (given, by name list, or by modality pair)."""
    fixed_modality = modality_or_guess(fixed_modality, fixed, "fixed modality")
    moving_modality = modality_or_guess(moving_modality, moving, "moving modality")
    chosen = presets_resolve_table(table, fixed_modality, moving_modality)
    if presets:
        names = presets.split(",") if isinstance(presets, str) else list(presets)
        chosen = table_from_presets([n.strip() for n in names if n.strip()], base=chosen)
    return fixed_modality, moving_modality, chosen


def auto_register(fixed, moving, *, fixed_modality: str | None = None, moving_modality: str | None = None,
                  table=None, presets=None, jobs: int | None = None, timeout_s: float | None = 600.0,
                  device: str = "auto", progress=None, cancel=None, threads_per_job: int | None = None,
                  memory_limit_mb: int | None = None, work_dir=None, pose_search=True,
                  output_grid: str = "fixed", judge: bool = True,
                  fixed_mask=None, moving_mask=None, focus=None) -> RegistrationResult:
    """Run every preset of the table for this modality pair, score each, and return all with the best.

    `fixed`/`moving` are paths, SimpleITK/ITK/ANTs images or `Image`s; their modalities (T1, T2, FLAIR,
    PD, CT, MR) are guessed when not given. `table` is a `Table`, a JSON path or a table's name; `presets`
    a list (or comma-separated names) overriding the table's. `jobs` worker processes run at once (default:
    one per core); each preset gets `threads_per_job` threads (default: its share of the free cores) and is
    killed after `timeout_s` seconds. `device` ("auto", "cpu", "cuda") is where scores are computed.
    `progress` receives event dicts (see `events`); `cancel` is a threading.Event or a callable. A table with
    a ``racing`` schedule first runs every preset on images shrunk by ``coarse_shrink`` and continues only
    the best ``keep`` at full resolution. `memory_limit_mb` caps each worker's address space (posix; ANTs
    needs about 1500 MB just to load). `work_dir` is where the run's temporary folder goes (default: the
    system's temporary folder); the engine client puts it inside its run folder, so removing that folder
    cleans up even after a kill. `pose_search` (True, False or a `pose.PoseSettings`) first races starting
    poses (`pose.search_pose`): when a far pose scores clearly better than the header, every preset starts
    from it, the candidates' transforms include it, and `warnings` say so. `output_grid` is where the winner's
    warped image (`RegistrationResult.output`) lies: "fixed" (the fixed grid) or "union" (the fixed grid grown
    to keep the whole moving extent, for a moving image that reaches beyond the fixed one). `judge` gives the
    winner a trust verdict (`trust.verdict`: estimated error, 90 % interval, green/amber/red, the map of
    where candidates disagree); a red one is also a warning.

    `fixed_mask` and `moving_mask` say where each image holds what matters, and `focus` ("align this structure
    best") is a region of the fixed image where the result is judged. Each is a path (a labelmap, nonzero inside),
    a `masks.MaskSpec` (a Slicer ``.seg.nrrd`` and the segment's name), an `Image`, a SimpleITK image, a numpy
    array on its image's grid or, for the focus, a `masks.FocusBox`; one on another grid is resampled onto its
    image's (result.json's ``inputs.masks`` records each and the notes of what resampling lost).

    Nothing is written: `report.write_outputs(result, out_dir)` writes the outputs. Raises InputError for
    bad input and when torch (needed to score) is not installed, before any worker starts, and Cancelled
    when `cancel` says so (or on Ctrl-C).
    """
    from .backends import get_backend, warp_with

    wall_start = time.perf_counter()
    if output_grid not in OUTPUT_GRIDS:
        raise InputError(f"output grid must be one of {', '.join(OUTPUT_GRIDS)}, got {output_grid!r}")
    if memory_limit_mb is not None and (isinstance(memory_limit_mb, bool) or not int(memory_limit_mb) > 0):
        raise InputError(f"memory limit must be a positive number of MB, got {memory_limit_mb!r}")
    fixed_img = as_image(fixed, "fixed")
    moving_img = as_image(moving, "moving")
    if fixed_img.dimension != moving_img.dimension:
        raise InputError(f"fixed is {fixed_img.dimension}D but moving is {moving_img.dimension}D")
    fixed_modality, moving_modality, chosen = resolve_table(
        fixed_img, moving_img, fixed_modality, moving_modality, table, presets)
    chosen = chosen.for_input(fixed_img.spacing_mm)
    ncores = os.cpu_count() or 1
    fixed_f = prepare_input(fixed_img, "fixed")
    moving_f = prepare_input(moving_img, "moving")
    # Before any worker starts: a bad mask is a usage error, reported at once.
    user_masks = load_user_masks(fixed_f, moving_f, fixed_mask=fixed_mask, moving_mask=moving_mask, focus=focus)
    if user_masks.focus is not None:
        chosen = with_focus_preset(chosen)  # a rigid candidate that registers the focus alone joins the race
    if device != "auto":
        pick_device(device)  # a bad or missing device is a usage error, reported before any work starts
    require_torch()

    candidates = {p.name: Candidate(p.name, p.backend, p.transform_type) for p in chosen.presets}
    runnable = []
    for p in chosen.presets:
        ok, reason = get_backend(p.backend).availability()
        if ok:
            runnable.append(p)
        else:
            candidates[p.name].status, candidates[p.name].error = Status.UNAVAILABLE, reason
    jobs = max(1, min(int(jobs or ncores), max(1, len(runnable))))
    schedule = effective_schedule(chosen.racing, runnable)
    if is_cancelled(cancel):
        raise Cancelled("registration cancelled")
    pose = None
    if pose_search is not False and fixed_f.dimension == 3:
        progress_cb = progress or (lambda event: None)
        progress_cb({"event": "pose", "status": "start"})
        try:
            pose = search_pose(fixed_f, moving_f, fixed_modality, moving_modality,
                               pose_search if isinstance(pose_search, PoseSettings) else None, cancel=cancel)
        except Cancelled:
            raise
        except Exception as exc:  # the presets can still start from the header: say so, do not stop
            pose = Pose(None, "header", 0.0, "", 0.0, 0.0, 0.0, None, 0.0,
                        [f"the pose search failed ({type(exc).__name__}: {exc}); the presets started from the header"])
        progress_cb({"event": "pose", "status": "done", "applied": pose.transform is not None,
                     "seconds": pose.seconds})
    race_moving = posed(moving_f, pose.transform) if pose is not None and pose.transform is not None else moving_f
    masks = race_masks(fixed_f, race_moving, *(None if m is None else m.array for m in
                                                (user_masks.fixed, user_masks.moving, user_masks.focus)))
    scored_on, setup_seconds = run_race(
        fixed_f, race_moving, fixed_modality, chosen.scoring, runnable, candidates, schedule, device=device,
        jobs=jobs, cores=ncores, timeout_s=timeout_s, progress=progress or (lambda event: None), cancel=cancel,
        memory_limit_mb=memory_limit_mb, threads_per_job=threads_per_job, work_dir=work_dir,
        moving_modality=moving_modality, masks=masks)

    ordered = [candidates[p.name] for p in chosen.presets]
    if race_moving is not moving_f:
        for cand in ordered:  # the presets registered the posed image: their transforms start with the pose
            if cand.transform is not None:
                cand.transform = with_pose(cand.transform, pose.transform)
            if cand.coarse_transform is not None:
                cand.coarse_transform = with_pose(cand.coarse_transform, pose.transform)
    best = ranked(ordered, chosen.scoring)
    if best and best[0].warped is not None and best[0].warped.spacing_mm != fixed_f.spacing_mm:
        # Scored on the coarser scoring grid: the winner's output image is on the fixed image's own grid.
        best[0].warped = warp_with(best[0].transform, fixed_f, moving_f).warped
    output = None
    if best and output_grid == "union":
        output = warp_with(best[0].transform, covering_grid(fixed_f, moving_f, best[0].transform), moving_f).warped
    result = RegistrationResult(
        candidates=ordered, best=best[0] if best else None, fixed=fixed_f, moving=moving_f,
        fixed_modality=fixed_modality, moving_modality=moving_modality, table=chosen,
        inputs={"fixed": _described(fixed), "moving": _described(moving), "device": scored_on or device,
                "jobs": jobs, "racing": schedule.to_dict() if schedule is not None else None,
                "output_grid": output_grid, "masks": user_masks.to_dict()},
        scorer_setup_seconds=setup_seconds, wall_seconds=time.perf_counter() - wall_start,
        output=output, pose=pose.to_dict() if pose is not None else {}, warnings=list(pose.warnings) if pose is not None else [],
    )
    if judge and result.best is not None and fixed_f.dimension == 3:
        from .trust import verdict

        try:
            result.trust = verdict(result)
        except Exception as exc:  # a broken calibration must not take down a finished registration
            result.warnings.append(f"no trust verdict: {type(exc).__name__}: {exc}")
        if result.trust is not None and result.trust.light == "red":
            result.warnings.append(f"the trust verdict is red (estimated error {result.trust.estimate_mm:.1f} mm): "
                                   f"{result.trust.reason}; check the result before using it")
        result.wall_seconds = time.perf_counter() - wall_start
    return result


def _described(source) -> str:
    """How result.json names an input: its path, or the type of the image object it was."""
    return str(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__
