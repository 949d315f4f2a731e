"""One-click registration: race presets in parallel worker processes, score each result, keep the best.

Data flows one way: the user's images → `Image` → a temp folder → one worker process per preset →
candidate transforms → warp + score here, as each finishes → the winner → outputs and report.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backends.base import Preset, warp_with
from .errors import Cancelled, InputError
from .events import DEVICES, is_cancelled
from .image import Image, as_image, write_image
from .modality import modality_or_guess
from .presets import RacingSchedule, table_from_presets
from .presets import resolve_table as presets_resolve_table
from .results import Candidate, RegistrationResult
from .scoring import ScoringSettings

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
#: Rough relative cost of each transform type; longest jobs start first so the slowest preset sets the wall time.
EXPECTED_COST = {"rigid": 1.0, "affine": 1.5, "deformable": 6.0}
#: Seconds a fresh worker spends loading a backend's toolkit (measured here; SimpleITK is always loaded).
TOOLKIT_LOAD_S = {"elastix": 11.0, "ants": 2.0}
#: A toolkit that loads faster than this is loaded by any idle worker: waiting for its holder rarely pays.
CHEAP_LOAD_S = 5.0


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill a worker and everything it started (it leads its own session)."""
    if proc.poll() is not None:
        return
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


@dataclass
class _Job:
    """One preset on one pair of images; `on_done(preset, status, folder)` takes its result."""

    preset: Preset
    folder: Path
    fixed_path: Path
    moving_path: Path
    on_done: object
    started: float = 0.0


@dataclass
class _Lane:
    """One worker process and the preset it runs; it keeps the toolkits it has loaded for the next preset."""

    index: int
    proc: subprocess.Popen | None = None
    log: Path | None = None
    backends: set = field(default_factory=set)
    job: _Job | None = None
    threads: int = 1


def prepare_input(image: Image, name: str) -> Image:
    """Float32 copy with NaN/Inf replaced by the lowest finite value (inputs themselves are never touched)."""
    arr = np.array(image.array, dtype=np.float32, copy=True)
    bad = ~np.isfinite(arr)
    if bad.all():
        raise InputError(f"{name}: every voxel is NaN or infinite")
    if bad.any():
        arr[bad] = np.min(arr[~bad])
    if arr.min() == arr.max():
        raise InputError(f"{name}: every voxel is {arr.flat[0]:g}; a constant image holds nothing to register")
    return image.with_array(arr)


class Runner:
    """Runs presets on `jobs` worker processes in parallel, with timeouts, progress and cancel.

    Workers live as long as the runner (use it as a context manager), so a later round of the race finds
    its toolkits already loaded; a preset goes to a worker that has loaded its backend when one is free.
    """

    def __init__(self, jobs: int, timeout_s: float | None, run_dir: Path, progress=None, cancel=None,
                 memory_limit_mb: int | None = None, threads_per_job: int | None = None, cores: int | None = None):
        """`progress(event_dict)` is called from this thread; `cancel` is an Event or a callable.

        Workers run in `run_dir`. `memory_limit_mb` caps each worker's address space (posix), so a preset
        that needs more fails with "out of memory" instead of taking the machine down; None means no cap.
        A preset gets `threads_per_job` threads, or by default its share of the `cores` no running
        preset uses when it starts, so the cores are not oversubscribed and a preset that starts while
        the other workers idle gets them all.
        """
        self.threads_per_job = threads_per_job
        self.cores = max(1, int(cores or os.cpu_count() or 1))
        self.timeout_s = timeout_s
        self.run_dir = Path(run_dir)
        self.progress = progress or (lambda event: None)
        self.cancel = cancel
        self.memory_limit_mb = memory_limit_mb
        self.lanes = [_Lane(i) for i in range(max(1, int(jobs)))]

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker (idle ones included) and everything they started."""
        for lane in self.lanes:
            if lane.proc is not None:
                _kill_tree(lane.proc)
                if lane.proc.stdin:
                    lane.proc.stdin.close()
                lane.proc = None

    def _spawn(self, lane: _Lane) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "AutoRegisterLib.worker", "--threads", str(lane.threads),
               "--run-dir", str(self.run_dir)]
        if self.memory_limit_mb is not None:
            cmd += ["--memory-limit-mb", str(int(self.memory_limit_mb))]
        env = dict(os.environ)
        # Slicer's launcher sets it; a worker that loads pip's ITK/ANTs with it set can crash (Slicer clears
        # it for its own CLIs too). The worker also drops it itself, for launchers that set it again.
        env.pop("ITK_AUTOLOAD_PATH", None)
        env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
        env["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(lane.threads)
        lane.log = self.run_dir / f"worker-{lane.index}-{time.monotonic_ns()}.log"
        with open(lane.log, "wb") as log:
            lane.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=(os.name == "posix"), cwd=str(self.run_dir), text=True)
        lane.backends = set()

    def _threads_for(self, lane: _Lane, starting: int) -> int:
        """Threads for a preset starting on `lane`, `starting` presets (this one included) starting now."""
        if self.threads_per_job:
            return max(1, int(self.threads_per_job))
        busy = sum(other.threads for other in self.lanes if other is not lane and other.job is not None)
        return max(1, (self.cores - busy) // max(1, starting))

    def _submit(self, lane: _Lane, job: _Job, starting: int) -> None:
        job.folder.mkdir(parents=True, exist_ok=True)
        lane.threads = self._threads_for(lane, starting)
        spec = {"preset": job.preset.to_dict(), "fixed": str(job.fixed_path), "moving": str(job.moving_path),
                "out": str(job.folder), "threads": lane.threads, "memory_limit_mb": self.memory_limit_mb}
        spec_path = job.folder / "spec.json"
        spec_path.write_text(json.dumps(spec))
        if lane.proc is None or lane.proc.poll() is not None:
            self._spawn(lane)
        try:
            lane.proc.stdin.write(f"{spec_path}\n")
            lane.proc.stdin.flush()
        except OSError:  # the worker died while idle: the preset gets a fresh one
            _kill_tree(lane.proc)
            self._spawn(lane)
            lane.proc.stdin.write(f"{spec_path}\n")
            lane.proc.stdin.flush()
        lane.backends.add(job.preset.backend)
        lane.job = job
        job.started = time.perf_counter()

    def _finished(self, lane: _Lane) -> dict | None:
        """The status of the lane's job once it has ended (None while it runs); a dead worker is let go."""
        job = lane.job
        elapsed = time.perf_counter() - job.started
        status_file = job.folder / "status.json"
        if status_file.exists():
            return _read_status(job.folder, 0, elapsed, lane.log)
        code = lane.proc.poll()
        if code is None and self.timeout_s is not None and elapsed > self.timeout_s:
            _kill_tree(lane.proc)
            lane.proc = None
            return {"status": "timeout", "seconds": elapsed, "error": f"timed out after {self.timeout_s:g} s"}
        if code is None:
            return None
        lane.proc = None
        return _read_status(job.folder, code, elapsed, lane.log)

    def _pick(self, lane: _Lane, pending: list[_Job]) -> _Job | None:
        """The next job for an idle lane, or None when waiting is cheaper than loading a toolkit again.

        First a preset whose toolkit this worker has loaded; else the costliest one whose toolkit is cheap
        to load (``CHEAP_LOAD_S``) or held by no other worker; else one whose holder has been busy for over
        twice the toolkit's load time (a long job: loading it again beats waiting for it).
        """
        own = [j for j in pending if j.preset.backend in lane.backends]
        if own:
            return own[0]
        now = time.perf_counter()
        held = {}  # backend -> how long its holder has been on its current job (0 when idle: it takes it now)
        for other in self.lanes:
            if other is not lane and other.proc is not None:
                busy_s = now - other.job.started if other.job is not None else 0.0
                for backend in other.backends:
                    held[backend] = min(held.get(backend, float("inf")), busy_s)
        for job in pending:
            load_s = TOOLKIT_LOAD_S.get(job.preset.backend, 0.0)
            if load_s < CHEAP_LOAD_S or held.get(job.preset.backend, float("inf")) > 2 * load_s:
                return job
        return None

    def free_cores(self) -> int:
        """Cores no running preset holds (at least 1): what the scorer in this process may use."""
        return max(1, self.cores - sum(lane.threads for lane in self.lanes if lane.job is not None))

    def run(self, jobs: list[_Job], more=None, expected: int | None = None) -> None:
        """Run every job, each ending with its own `on_done`; `more()`, asked whenever a worker would idle
        with nothing pending, may hand out further jobs. `expected` is the job count progress counts with."""
        pending = sorted(jobs, key=lambda j: -EXPECTED_COST.get(j.preset.transform_type, 1.0))
        finished = 0

        def total() -> int:
            return max(expected or 0, finished + len(pending) + sum(lane.job is not None for lane in self.lanes))

        def start_pending() -> None:
            idle = [lane for lane in self.lanes if lane.job is None]
            for lane in idle:
                if pending and (job := self._pick(lane, pending)) is not None:
                    pending.remove(job)
                    self._submit(lane, job, starting=min(len(pending) + 1, sum(lh.job is None for lh in idle)))
                    self.progress({"event": "start", "candidate": job.preset.name, "pid": lane.proc.pid,
                                   "threads": lane.threads, "fraction": finished / total()})
        try:
            while True:
                if is_cancelled(self.cancel):
                    raise Cancelled("registration cancelled")
                done = [(lane, lane.job, status) for lane in self.lanes
                        if lane.job is not None and (status := self._finished(lane)) is not None]
                for lane, _, _ in done:
                    lane.job = None
                # Idle workers take their next preset before the finished ones are scored, so scoring
                # never holds a worker up; `more()` waits for the scores, as it chooses by them.
                start_pending()
                for _, job, status in done:
                    finished += 1
                    job.on_done(job.preset, status, job.folder)
                    self.progress({"event": "finish", "candidate": job.preset.name, "status": status["status"],
                                   "fraction": finished / total()})
                if more is not None and not pending and any(lane.job is None for lane in self.lanes):
                    pending += more()
                    start_pending()
                if not pending and all(lane.job is None for lane in self.lanes):
                    break
                time.sleep(0.05)
        except BaseException:
            self.close()
            raise


def _read_status(folder: Path, exit_code: int, elapsed: float, log: Path | None) -> dict:
    status_file = folder / "status.json"
    if status_file.exists():
        try:
            return json.loads(status_file.read_text())
        except json.JSONDecodeError:
            pass
    if exit_code < 0:
        try:
            reason = f"worker killed by {signal.Signals(-exit_code).name}"
        except ValueError:
            reason = f"worker killed by signal {-exit_code}"
    else:
        reason = f"worker exited with code {exit_code}"
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log and log.exists() else []
    if any("MemoryError" in t or "bad_alloc" in t for t in tail):
        reason += " (out of memory)"
    return {"status": "failed", "seconds": elapsed, "error": reason + (f": {tail[0][:200]}" if tail else "")}


def resolve_table(fixed: Image, moving: Image, fixed_modality, moving_modality, table, presets):
    """Pick modalities (given or guessed) and the table (given, by name list, or by modality pair)."""
    fixed_modality = modality_or_guess(fixed_modality, fixed, "fixed modality")
    moving_modality = modality_or_guess(moving_modality, moving, "moving modality")
    chosen = presets_resolve_table(table, fixed_modality, moving_modality)
    if presets:
        names = presets.split(",") if isinstance(presets, str) else list(presets)
        chosen = table_from_presets([n.strip() for n in names if n.strip()], base=chosen)
    return fixed_modality, moving_modality, chosen


class _ScorerSetup:
    """Loads the scorer (torch, the compiled LNCC kernels), resolves the device and computes the head masks
    on a background thread, so the workers start at once instead of after it; a score waits for it.

    `close()` must end every run that started it: a thread still inside ``import torch`` when the
    interpreter exits is killed by the interpreter's shutdown in the middle of C++ code, and the process
    aborts ("terminate called without an active exception", exit -6) after a run that was otherwise done.
    """

    def __init__(self, device: str, cancel=None):
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
        t0 = time.perf_counter()
        try:
            import torch

            # After each step that cannot be interrupted: a run that is ending skips the rest.
            if self._stop.is_set():
                return
            from .similarity import lncc

            self.device = _pick_device(self.requested)
            if self._stop.is_set():
                return
            tiny = torch.rand(8, 8, 8)
            lncc(tiny, tiny, window=3, mask=torch.ones(8, 8, 8))  # loads the kernels from numba's cache
            for rnd in list(self.rounds):
                if self._stop.is_set():
                    return
                rnd.head()
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
                 setup: _ScorerSetup, candidates: dict[str, Candidate], progress, threads=lambda: 1):
        """`threads()` says how many threads scoring may use when a result arrives."""
        self.fixed, self.moving, self.fixed_modality = fixed, moving, fixed_modality
        self.settings, self.setup, self.threads = settings, setup, threads
        self.candidates, self.progress = candidates, progress
        self.made = 0
        self._head: np.ndarray | None = None
        self._head_lock = threading.Lock()
        setup.rounds.append(self)

    def head(self) -> np.ndarray:
        """The fixed head mask the scores are taken over (the whole grid with ``head_mask: none``)."""
        from .scoring import head_mask

        with self._head_lock:
            if self._head is None:
                self._head = (np.ones(self.fixed.array.shape, bool) if self.settings.head_mask == "none"
                              else head_mask(self.fixed, self.fixed_modality))
            return self._head

    def jobs(self, presets: list[Preset], workdir: Path) -> list[_Job]:
        """Jobs running `presets` on this round's images (written once into `workdir`), scored as each ends."""
        fixed_path, moving_path = workdir / "fixed.mha", workdir / "moving.mha"
        if not fixed_path.exists():
            workdir.mkdir(parents=True, exist_ok=True)
            write_image(self.fixed, fixed_path, compress=False)
            write_image(self.moving, moving_path, compress=False)
        jobs = []
        for preset in presets:
            self.made += 1
            # A preset's name comes from a table: in a folder name it is one safe path component.
            folder = workdir / f"{self.made:02d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', preset.name)}"
            jobs.append(_Job(preset, folder, fixed_path, moving_path, self.on_done))
        return jobs

    def on_done(self, preset: Preset, status: dict, folder: Path) -> None:
        """Record a finished worker and score its result (a scoring failure fails this candidate only)."""
        import SimpleITK as sitk

        from .scoring import score_candidate, thread_limit

        cand = self.candidates[preset.name]
        cand.seconds = status.get("seconds")
        cand.status, cand.error = status["status"], status.get("error")
        if cand.status != "ok":
            return
        t0 = time.perf_counter()
        try:
            device = self.setup.ready()
            # The workers hold the other cores: more threads here would only contend with them.
            with thread_limit(self.threads()):
                cand.transform = sitk.ReadTransform(str(folder / status["transform"]))
                out = warp_with(cand.transform, self.fixed, self.moving)
                measures = score_candidate(self.fixed, out.warped, out.valid_mask, self.head(), self.settings,
                                           cand.transform, device=device, transform_type=cand.transform_type)
        except Cancelled:
            raise
        except Exception as exc:  # scoring one candidate must not end the others
            cand.status, cand.error = "failed", f"scoring failed: {type(exc).__name__}: {exc}"[:500]
            return
        cand.warped = out.warped
        for key in ("score", "lncc", "zncc", "zncc_local", "mi", "coverage", "folding_fraction", "min_jacobian"):
            setattr(cand, key, measures[key])
        if measures["disqualified"]:
            cand.status, cand.error = "disqualified", measures["disqualified"]
        cand.score_seconds = time.perf_counter() - t0
        self.progress({"event": "score", "candidate": cand.name, "status": cand.status, "score": cand.score})


def _ranked(cands: list[Candidate], settings: ScoringSettings) -> list[Candidate]:
    """Successful candidates, best first, by the same rule that picks the winner."""
    from .scoring import choose_best

    remaining = [c for c in cands if c.status == "ok"]
    ranked = []
    while remaining:
        i = choose_best([{"score": c.score, "mi": c.mi, "coverage": c.coverage,
                          "transform_type": c.transform_type} for c in remaining], settings)
        ranked.append(remaining.pop(i))
    return ranked


def _race_coarse_to_fine(runner: Runner, full: _Round, presets: list[Preset], racing: RacingSchedule, fixed_modality: str,
                         tmp: Path, progress) -> None:
    """Every preset on images shrunk by ``coarse_shrink``; the best ``keep`` of them again at full resolution.

    Presets named in ``full_resolution`` skip the coarse round and run once, at full resolution, from the
    start: elastix samples a fixed number of points whatever the image size, so its coarse run costs nearly
    as much as the full one and would only delay it. There is no barrier between the rounds: a worker that
    would idle while coarse runs are still out starts the full-resolution run of the best coarse result so
    far. Only the final best ``keep`` count, so the choice is the same as with a barrier; a run started
    ahead of time for a preset that drops out is discarded. Candidates that drop out are reported as
    ``eliminated`` with their coarse score.
    """
    from .image import shrink

    factor, keep = racing.coarse_shrink, racing.keep
    raced = racing.raced(presets)
    direct = [p for p in presets if p not in raced]
    coarse_results = {p.name: Candidate(p.name, p.backend, p.transform_type) for p in raced}
    coarse = _Round(shrink(full.fixed, factor), shrink(full.moving, factor), fixed_modality, full.settings,
                    full.setup, coarse_results, progress, full.threads)
    by_name = {p.name: p for p in raced}
    started: list[str] = []
    kept: list[str] | None = None  # the final best `keep`, once every coarse run has ended

    def more() -> list[_Job]:
        nonlocal kept
        done = [c for c in coarse_results.values() if c.status != "pending"]
        best = [c.name for c in _ranked(done, full.settings)[:keep]]
        if len(done) < len(raced):
            best = best[:1]  # a guess while coarse runs are out: one at a time
        elif kept is None:
            kept = best
            progress({"event": "round", "round": "full", "candidates": sorted(kept + [p.name for p in direct])})
        ahead = [n for n in best if n not in started]
        started.extend(ahead)
        return full.jobs([by_name[n] for n in ahead], tmp / "full")

    jobs = full.jobs(direct, tmp / "full") + coarse.jobs(raced, tmp / "coarse")
    runner.run(jobs, more, expected=len(presets) + keep)
    for name, coarse_cand in coarse_results.items():
        if name in (kept or ()):
            continue
        cand = full.candidates[name]
        cand.__dict__.update({k: v for k, v in coarse_cand.__dict__.items() if k not in ("transform", "warped")})
        cand.transform = cand.warped = None
        if coarse_cand.status == "ok":
            cand.status, cand.error = "eliminated", f"eliminated in the coarse round (score {cand.score:.4f})"


def auto_register(fixed, moving, *, fixed_modality: str | None = None, moving_modality: str | None = None,
                  table=None, presets=None, jobs: int | None = None, timeout_s: float | None = 600.0,
                  device: str = "auto", keep_all: bool = False, out_dir=None, progress=None,
                  cancel=None, threads_per_job: int | None = None,
                  memory_limit_mb: int | None = None, work_dir=None) -> RegistrationResult:
    """Run every preset of the table for this modality pair, score each, and return all with the best.

    `fixed`/`moving` are paths, SimpleITK/ITK/ANTs images or `Image`s. `table` is a `Table` or a JSON
    path; `presets` a list (or comma-separated names) overriding the table's. `progress` receives
    event dicts; `cancel` is a threading.Event or a callable. With `out_dir`, the outputs are written
    there atomically (see `report.write_outputs`). A table with a ``racing`` schedule first runs every
    preset on images shrunk by ``coarse_shrink`` and continues only the best ``keep`` at full resolution.
    `memory_limit_mb` caps each worker's address space (posix; ANTs needs about 1500 MB just to load).
    `work_dir` is where the run's temporary folder goes (default: the system's temporary folder); the
    engine client puts it inside its run folder, so removing that folder cleans up even after a kill.
    Raises InputError for bad input and when torch (needed to score) is not installed, before any
    worker starts, and Cancelled when `cancel` says so (or on Ctrl-C).
    """
    from .backends import get_backend

    wall_start = time.perf_counter()
    if memory_limit_mb is not None and (isinstance(memory_limit_mb, bool) or not int(memory_limit_mb) > 0):
        raise InputError(f"memory limit must be a positive number of MB, got {memory_limit_mb!r}")
    fixed_img = as_image(fixed, "fixed")
    moving_img = as_image(moving, "moving")
    if fixed_img.dimension != moving_img.dimension:
        raise InputError(f"fixed is {fixed_img.dimension}D but moving is {moving_img.dimension}D")
    fixed_modality, moving_modality, chosen = resolve_table(
        fixed_img, moving_img, fixed_modality, moving_modality, table, presets)
    settings: ScoringSettings = chosen.scoring
    ncores = os.cpu_count() or 1
    progress_cb = progress or (lambda event: None)
    fixed_f = prepare_input(fixed_img, "fixed")
    moving_f = prepare_input(moving_img, "moving")
    if device != "auto":
        _pick_device(device)  # a bad or missing device is a usage error, reported before any work starts
    _require_torch()
    setup = _ScorerSetup(device, cancel)

    candidates = {p.name: Candidate(p.name, p.backend, p.transform_type) for p in chosen.presets}
    runnable = []
    for p in chosen.presets:
        ok, reason = get_backend(p.backend).availability()
        if ok:
            runnable.append(p)
        else:
            candidates[p.name].status, candidates[p.name].error = "unavailable", reason
    jobs = max(1, min(int(jobs or ncores), max(1, len(runnable))))
    racing = chosen.racing
    if racing and len(racing.raced(runnable)) <= racing.keep:
        racing = None  # every raced preset would be kept: a coarse round would only add time
    if is_cancelled(cancel):
        raise Cancelled("registration cancelled")
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="autoregister-", dir=None if work_dir is None else str(work_dir)))
    try:
        try:
            with Runner(jobs, timeout_s, tmp / "workers", progress_cb, cancel, memory_limit_mb, threads_per_job,
                        ncores) as runner:
                full = _Round(fixed_f, moving_f, fixed_modality, settings, setup, candidates, progress_cb,
                              runner.free_cores)
                setup.start()
                if racing:
                    _race_coarse_to_fine(runner, full, runnable, racing, fixed_modality, tmp, progress_cb)
                else:
                    runner.run(full.jobs(runnable, tmp / "full"))
        finally:
            # Workers are gone (Runner.close); the scorer thread must end too, on every path (see _ScorerSetup).
            setup.close()
        if is_cancelled(cancel):  # cancelled while the scorer thread ended: still a cancel
            raise Cancelled("registration cancelled")
    except KeyboardInterrupt:
        raise Cancelled("registration interrupted") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ordered = [candidates[p.name] for p in chosen.presets]
    ranked = _ranked(ordered, settings)
    result = RegistrationResult(
        candidates=ordered, best=ranked[0] if ranked else None, fixed=fixed_f, moving=moving_f,
        fixed_modality=fixed_modality, moving_modality=moving_modality, table=chosen,
        inputs={"fixed": str(fixed) if isinstance(fixed, (str, os.PathLike)) else type(fixed).__name__,
                "moving": str(moving) if isinstance(moving, (str, os.PathLike)) else type(moving).__name__,
                "device": setup.device or device, "jobs": jobs, "racing": racing.to_dict() if racing else None},
        scorer_setup_seconds=setup.seconds,
    )
    result.wall_seconds = time.perf_counter() - wall_start
    if out_dir is not None:
        from .report import write_outputs

        write_outputs(result, out_dir, keep_all=keep_all)
    return result


def _require_torch() -> None:
    """Fail fast, before any worker starts, when torch (which every score needs) is not installed."""
    import importlib.util

    if "torch" not in sys.modules and importlib.util.find_spec("torch") is None:
        raise InputError("torch is not installed; AutoRegister needs it to score the results (pip install torch)")


def _pick_device(device: str) -> str:
    if device not in DEVICES:
        raise InputError(f"device must be {', '.join(DEVICES[:-1])} or {DEVICES[-1]}, got {device!r}")
    if device == "cpu":
        return "cpu"
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if device == "cuda" and not has_cuda:
        raise InputError("device 'cuda' was requested but no CUDA device is available")
    return "cuda" if has_cuda else "cpu"

