"""The race: every preset runs in the worker pool, each result is warped and scored here as it arrives,
and the candidates are ranked by the rule that picks the winner.

A table's `RacingSchedule` makes it coarse to fine: the presets first race on shrunk images and only the
best continue at full resolution. The scorer (torch, the compiled kernels, the head masks) loads on a
thread beside the workers (`_ScorerSetup`), so the workers start at once; a score waits for it.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .backends.base import Preset, warp_with
from .errors import Cancelled
from .events import Status, is_cancelled
from .image import Image, coarsened, write_image
from .presets import FOCUS_PRESET, RacingSchedule
from .results import MEASURES, Candidate
from .runner import Job, Runner
from .scoring import ScoringSettings

#: The focus preset registers the focus grown by this margin: a small structure alone gives a rigid search too
#: little to hold on to (a 25 mm ball: 45 mm off with sitk-rigid, 0.9 mm with the margin; benchmarks/rescue.py).
FOCUS_MARGIN_MM = 20.0


class _ScorerSetup:
    """Loads the scorer (torch, the compiled LNCC kernels), resolves the device and computes the head masks
    on a background thread, so the workers start at once instead of after it; a score waits for it.

    `close()` must end every run that started it: a thread still inside ``import torch`` when the
    interpreter exits is killed by the interpreter's shutdown in the middle of C++ code, and the process
    aborts ("terminate called without an active exception", exit -6) after a run that was otherwise done.
    """

    def __init__(self, device: str, cancel=None):
        """Load for the requested `device` ("auto", "cpu" or "cuda"); `cancel` ends a wait in `ready()`."""
        self.requested, self.cancel = device, cancel
        self.device: str | None = None
        self.seconds = 0.0
        self.rounds: list[_Round] = []
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._load, name="autoregister-scorer-setup", daemon=True)

    def start(self) -> None:
        """Begin loading in the background."""
        self._thread.start()

    def _load(self) -> None:
        from .scoring import warm_up

        t0 = time.perf_counter()
        try:
            # After each step that cannot be interrupted: a run that is ending skips the rest.
            self.device = warm_up(self.requested, stop=self._stop)
            for rnd in list(self.rounds):
                if self._stop.is_set():
                    return
                rnd.scoring_images()
        except Exception as exc:  # handed to every score, which fails that candidate only
            self._error = exc
        finally:
            self.seconds = time.perf_counter() - t0

    def close(self) -> None:
        """Stop after the current step and wait for the thread (an import cannot be cut short: up to ~3 s).

        A Ctrl-C during the wait does not cut it short either; it is raised once the thread has ended.
        """
        self._stop.set()
        interrupted = False
        while self._thread.is_alive():
            try:
                self._thread.join(0.1)
            except KeyboardInterrupt:
                interrupted = True
        if interrupted:
            raise KeyboardInterrupt

    def ready(self) -> str:
        """Wait until loaded (a Cancel still ends the wait within 0.1 s); the device to score on."""
        while self._thread.is_alive():
            self._thread.join(0.1)
            if is_cancelled(self.cancel):
                raise Cancelled("registration cancelled")
        if self._error is not None:
            raise self._error
        return self.device


class _Round:
    """One round of the race: every preset on one pair of images, each result warped and scored here."""

    def __init__(self, fixed: Image, moving: Image, fixed_modality: str, settings: ScoringSettings,
                 setup: _ScorerSetup, candidates: dict[str, Candidate], progress, threads=lambda: 1,
                 moving_modality: str | None = None, masks: dict[str, Image] | None = None):
        """`threads()` says how many threads scoring may use when a result arrives. `masks` holds 0/1 float
        images: "fixed" (on the fixed grid, given to every backend), "moving" (on the moving grid), "user fixed"
        and "focus" (on the fixed grid: where scores are judged) and "focus registration" (the focus grown by
        `FOCUS_MARGIN_MM`: the focus preset's fixed mask)."""
        self.fixed, self.moving, self.fixed_modality = fixed, moving, fixed_modality
        self.moving_modality = moving_modality
        self.masks = dict(masks or {})
        self.coverable = 1.0  # set with the scoring images (`scoring.coverable_fraction`)
        self.settings, self.setup, self.threads = settings, setup, threads
        self.candidates, self.progress = candidates, progress
        self.made = 0
        self._scoring: tuple[Image, Image, np.ndarray] | None = None
        self._scoring_lock = threading.Lock()
        self._written: dict[tuple, tuple[Path, Path]] = {}
        setup.rounds.append(self)

    def scoring_images(self) -> tuple[Image, Image, np.ndarray]:
        """The fixed and moving images on the scoring grid (``grid_mm``) and the fixed head mask there (the
        whole grid with ``head_mask: none``); made once, on the scorer's loading thread when it gets there first."""
        from .scoring import coverable_fraction, head_mask

        with self._scoring_lock:
            if self._scoring is None:
                fixed, moving = coarsened(self.fixed, self.settings.grid_mm), coarsened(self.moving, self.settings.grid_mm)
                head = (np.ones(fixed.array.shape, bool) if self.settings.head_mask == "none"
                        else head_mask(fixed, self.fixed_modality))
                if self.settings.head_mask != "none":
                    self.coverable = coverable_fraction(fixed, head, moving, self.moving_modality)
                for kind in ("user fixed", "focus"):  # only there is a result judged
                    if kind in self.masks:
                        region = _binary(coarsened(self.masks[kind], self.settings.grid_mm))
                        head = head & region if (head & region).any() else region
                self._scoring = (fixed, moving, head)
            return self._scoring

    def _images_for(self, preset: Preset, workdir: Path) -> tuple[Path, Path]:
        """The image files `preset` registers: this round's images on its working grid, written once per grid."""
        # The grid's spacing is known without coarsening: a grid already written costs nothing more.
        key = tuple(max(s, preset.grid_mm) for s in self.fixed.spacing_mm)
        if key not in self._written:
            fixed, moving = coarsened(self.fixed, preset.grid_mm), coarsened(self.moving, preset.grid_mm)
            workdir.mkdir(parents=True, exist_ok=True)
            tag = "" if fixed is self.fixed else f"-{'x'.join(f'{s:g}' for s in key)}mm"
            paths = workdir / f"fixed{tag}.mha", workdir / f"moving{tag}.mha"
            write_image(fixed, paths[0], compress=False)
            write_image(moving, paths[1], compress=False)
            self._written[key] = paths
        return self._written[key]

    def _mask_for(self, kind: str, preset: Preset, workdir: Path) -> Path | None:
        """The file of mask `kind` (a key of `masks`) on `preset`'s working grid (None without it)."""
        if kind not in self.masks:
            return None
        key = (kind,) + tuple(max(s, preset.grid_mm) for s in self.masks[kind].spacing_mm)
        if key not in self._written:
            mask = coarsened(self.masks[kind], preset.grid_mm)
            workdir.mkdir(parents=True, exist_ok=True)
            path = workdir / f"mask-{kind.replace(' ', '-')}-{'x'.join(f'{s:g}' for s in mask.spacing_mm)}mm.mha"
            write_image(mask.with_array(_binary(mask).astype(np.uint8)), path, compress=False)
            self._written[key] = (path, path)
        return self._written[key][0]

    def jobs(self, presets: list[Preset], workdir: Path) -> list[Job]:
        """Jobs running `presets` on this round's images (each on its working grid, written once into
        `workdir`), scored as each ends; each gets the round's masks (the focus preset the focus as its fixed mask)."""
        jobs = []
        for preset in presets:
            fixed_path, moving_path = self._images_for(preset, workdir)
            fixed_mask = self._mask_for("focus registration" if preset.name == FOCUS_PRESET else "fixed", preset,
                                        workdir)
            moving_mask = self._mask_for("moving", preset, workdir)
            self.made += 1
            # A preset's name comes from a table: in a folder name it is one safe path component.
            folder = workdir / f"{self.made:02d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', preset.name)}"
            jobs.append(Job(preset, folder, fixed_path, moving_path, self.on_done, fixed_mask_path=fixed_mask,
                            moving_mask_path=moving_mask))
        return jobs

    def on_done(self, preset: Preset, status: dict, folder: Path) -> None:
        """Record a finished worker and score its result (a scoring failure fails this candidate only)."""
        import SimpleITK as sitk

        from .scoring import score_candidate, thread_limit

        cand = self.candidates[preset.name]
        cand.seconds = status.get("seconds")
        cand.status, cand.error = Status(status["status"]), status.get("error")
        if cand.status != Status.OK:
            return
        t0 = time.perf_counter()
        try:
            device = self.setup.ready()
            # The workers hold the other cores: more threads here would only contend with them.
            with thread_limit(self.threads()):
                cand.transform = sitk.ReadTransform(str(folder / status["transform"]))
                fixed, moving, head = self.scoring_images()
                out = warp_with(cand.transform, fixed, moving)
                measures = score_candidate(fixed, out.warped, out.valid_mask, head, self.settings,
                                           cand.transform, device=device, transform_type=cand.transform_type,
                                           coverable=self.coverable)
        except Cancelled:
            raise
        except Exception as exc:  # scoring one candidate must not end the others
            cand.status, cand.error = Status.FAILED, f"scoring failed: {type(exc).__name__}: {exc}"[:500]
            return
        cand.warped = out.warped
        for key in MEASURES:
            setattr(cand, key, measures[key])
        if measures["disqualified"]:
            cand.status, cand.error = Status.DISQUALIFIED, measures["disqualified"]
        cand.score_seconds = time.perf_counter() - t0
        self.progress({"event": "score", "candidate": cand.name, "status": cand.status.value, "score": cand.score})


def _binary(mask: Image) -> np.ndarray:
    """A resampled 0/1 mask as booleans: the voxels at least half inside (any inside, for a mask so thin that
    none is)."""
    arr = np.asarray(mask.array)
    inside = arr >= 0.5
    return inside if inside.any() else arr > 0


def race_masks(fixed: Image, moving: Image, fixed_mask: np.ndarray | None = None,
               moving_mask: np.ndarray | None = None, focus: np.ndarray | None = None,
               reach_margin_mm: float = 10.0) -> dict[str, Image]:
    """The masks of a race, as 0/1 float images on their images' grids (see `_Round`).

    The backends' fixed mask is the user's fixed mask cut to where the moving image reaches (`image.reach_mask`)
    when it reaches less than the whole fixed grid: a slab or a limited-FOV CT then gives the backends only
    fixed samples that can find moving data ("samples map outside the moving image" ends elastix's run).
    """
    from .image import reach_mask

    def as_image(grid: Image, arr) -> Image:
        return grid.with_array(np.asarray(arr, dtype=bool).astype(np.float32))

    out = {}
    reach = reach_mask(moving, fixed, reach_margin_mm)
    backend_fixed = fixed_mask if fixed_mask is not None else None
    if reach.mean() < 0.98:
        backend_fixed = reach if backend_fixed is None else (backend_fixed & reach if (backend_fixed & reach).any()
                                                              else backend_fixed)
    if backend_fixed is not None:
        out["fixed"] = as_image(fixed, backend_fixed)
    if fixed_mask is not None:
        out["user fixed"] = as_image(fixed, fixed_mask)
    if moving_mask is not None:
        out["moving"] = as_image(moving, moving_mask)
    if focus is not None:
        out["focus"] = as_image(fixed, focus)
        out["focus registration"] = as_image(fixed, _grown(focus, fixed.spacing_mm, FOCUS_MARGIN_MM))
    return out


def _grown(mask: np.ndarray, spacing_mm, margin_mm: float) -> np.ndarray:
    """`mask` grown by `margin_mm` (Euclidean, in mm)."""
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(~mask, sampling=tuple(reversed(spacing_mm))) <= margin_mm


def ranked(cands: list[Candidate], settings: ScoringSettings) -> list[Candidate]:
    """Successful candidates, best first, by the same rule that picks the winner."""
    from .scoring import choose_best

    remaining = [c for c in cands if c.status == Status.OK]
    order = []
    while remaining:
        i = choose_best([{"score": c.score, "mi": c.mi, "coverage": c.coverage,
                          "transform_type": c.transform_type} for c in remaining], settings)
        order.append(remaining.pop(i))
    return order


def effective_schedule(schedule: RacingSchedule | None, presets: list[Preset]) -> RacingSchedule | None:
    """The schedule to race `presets` with: None when every raced preset would be kept anyway (a coarse
    round would only add time)."""
    if schedule is None or len(schedule.raced(presets)) <= schedule.keep:
        return None
    return schedule


def _race_coarse_to_fine(runner: Runner, full: _Round, presets: list[Preset], schedule: RacingSchedule,
                         fixed_modality: str, tmp: Path, progress) -> None:
    """Every preset on images shrunk by ``coarse_shrink`` (and coarsened to ``coarse_mm``); the best ``keep``
    of them again at full resolution (each on its own working grid).

    Presets named in ``full_resolution`` skip the coarse round and run once, at full resolution, from the
    start: elastix samples a fixed number of points whatever the image size, so its coarse run costs nearly
    as much as the full one and would only delay it. There is no barrier between the rounds: a worker that
    would idle while coarse runs are still out starts the full-resolution run of the best coarse result so
    far. Only the final best ``keep`` count, so the choice is the same as with a barrier; a run started
    ahead of time for a preset that drops out is discarded. Candidates that drop out are reported as
    ``eliminated`` with their coarse score.
    """
    from .image import shrink

    raced = schedule.raced(presets)
    direct = [p for p in presets if p not in raced]
    coarse_results = {p.name: Candidate(p.name, p.backend, p.transform_type) for p in raced}
    def coarse_copy(image: Image) -> Image:
        return coarsened(shrink(image, schedule.coarse_shrink), schedule.coarse_mm)

    coarse = _Round(coarse_copy(full.fixed), coarse_copy(full.moving), fixed_modality, full.settings, full.setup,
                    coarse_results, progress, full.threads, full.moving_modality,
                    {kind: coarse_copy(mask) for kind, mask in full.masks.items()})
    by_name = {p.name: p for p in raced}
    started: list[str] = []
    kept: list[str] | None = None  # the final best `keep`, once every coarse run has ended

    def more() -> list[Job]:
        nonlocal kept
        done = [c for c in coarse_results.values() if c.status != Status.PENDING]
        best = [c.name for c in ranked(done, full.settings)[:schedule.keep]]
        if len(done) < len(raced):
            best = best[:1]  # a guess while coarse runs are out: one at a time
        elif kept is None:
            kept = best
            progress({"event": "round", "round": "full", "candidates": sorted(kept + [p.name for p in direct])})
        ahead = [n for n in best if n not in started]
        started.extend(ahead)
        return full.jobs([by_name[n] for n in ahead], tmp / "full")

    jobs = full.jobs(direct, tmp / "full") + coarse.jobs(raced, tmp / "coarse")
    runner.run(jobs, more, expected=len(presets) + schedule.keep)
    for name, coarse_cand in coarse_results.items():
        if name in (kept or ()):
            continue
        # Dropped out: its coarse outcome stands (a full-resolution run started ahead of time is discarded).
        eliminated = replace(coarse_cand, transform=None, warped=None, coarse_transform=coarse_cand.transform)
        if coarse_cand.status == Status.OK:
            eliminated.status = Status.ELIMINATED
            eliminated.error = f"eliminated in the coarse round (score {eliminated.score:.4f})"
        full.candidates[name] = eliminated


def run_race(fixed: Image, moving: Image, fixed_modality: str, settings: ScoringSettings, presets: list[Preset],
             candidates: dict[str, Candidate], schedule: RacingSchedule | None, *, device: str, jobs: int,
             cores: int, timeout_s: float | None, progress, cancel, memory_limit_mb: int | None,
             threads_per_job: int | None, work_dir=None, moving_modality: str | None = None,
             masks: dict[str, Image] | None = None) -> tuple[str | None, float]:
    """Race `presets` on the prepared images and fill in their `candidates` (a dict by name, whose
    eliminated entries are replaced); return the device scores ran on (None when the scorer never
    loaded) and the seconds loading the scorer took.

    The run's temporary folder goes under `work_dir` (default: the system's) and is removed on every exit;
    so are the workers and the scorer's loading thread. Raises Cancelled on cancel and on Ctrl-C.
    """
    setup = _ScorerSetup(device, cancel)
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="autoregister-", dir=None if work_dir is None else str(work_dir)))
    try:
        try:
            with Runner(jobs, timeout_s, tmp / "workers", progress, cancel, memory_limit_mb, threads_per_job,
                        cores) as runner:
                full = _Round(fixed, moving, fixed_modality, settings, setup, candidates, progress,
                              runner.free_cores, moving_modality, masks)
                setup.start()
                if schedule is not None:
                    _race_coarse_to_fine(runner, full, presets, schedule, fixed_modality, tmp, progress)
                else:
                    runner.run(full.jobs(presets, tmp / "full"))
        finally:
            # Workers are gone (Runner.close); the scorer thread must end too, on every path (see _ScorerSetup).
            setup.close()
        if is_cancelled(cancel):  # cancelled while the scorer thread ended: still a cancel
            raise Cancelled("registration cancelled")
    except KeyboardInterrupt:
        raise Cancelled("registration interrupted") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return setup.device, setup.seconds
