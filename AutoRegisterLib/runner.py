"""The worker pool: presets run in parallel worker processes, with timeouts, progress and cancel.

With `worker.py` it owns the spec/status file protocol. For each preset the runner writes
``<folder>/spec.json`` (the preset, the image and mask paths, the thread count) and sends its path on the
worker's stdin; the worker writes its transform and ``<folder>/status.json`` there. A status file that
never appears means the worker died: `_read_status` then names the signal or exit code. A worker runs
presets one at a time and keeps the toolkits it has loaded, so a preset goes to the worker that already
holds its toolkit when one is free.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .backends.base import Preset
from .errors import Cancelled
from .events import Status, is_cancelled
from .worker import SPEC_FILE, STATUS_FILE

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
class Job:
    """One preset on one pair of images, optionally masked; `on_done(preset, status, folder)` takes its result.

    A mask file lies on the grid of the image it masks (nonzero voxels inside); None means no mask.
    """

    preset: Preset
    folder: Path
    fixed_path: Path
    moving_path: Path
    on_done: object
    started: float = 0.0
    fixed_mask_path: Path | None = None
    moving_mask_path: Path | None = None

    def spec(self, threads: int, memory_limit_mb: int | None = None) -> dict:
        """The spec a worker runs this job from (`worker.run_spec`); the mask keys are null when unmasked."""
        return {"preset": self.preset.to_dict(), "fixed": str(self.fixed_path), "moving": str(self.moving_path),
                "fixed_mask": _path_or_none(self.fixed_mask_path), "moving_mask": _path_or_none(self.moving_mask_path),
                "out": str(self.folder), "threads": threads, "memory_limit_mb": memory_limit_mb}


def _path_or_none(path) -> str | None:
    return None if path is None else str(path)


@dataclass
class _Lane:
    """One worker process and the preset it runs; it keeps the toolkits it has loaded for the next preset."""

    index: int
    proc: subprocess.Popen | None = None
    log: Path | None = None
    backends: set = field(default_factory=set)
    job: Job | None = None
    threads: int = 1


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

    def _submit(self, lane: _Lane, job: Job, starting: int) -> None:
        job.folder.mkdir(parents=True, exist_ok=True)
        lane.threads = self._threads_for(lane, starting)
        spec = job.spec(lane.threads, self.memory_limit_mb)
        spec_path = job.folder / SPEC_FILE
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
        status_file = job.folder / STATUS_FILE
        if status_file.exists():
            return _read_status(job.folder, 0, elapsed, lane.log)
        code = lane.proc.poll()
        if code is None and self.timeout_s is not None and elapsed > self.timeout_s:
            _kill_tree(lane.proc)
            lane.proc = None
            return {"status": Status.TIMEOUT, "seconds": elapsed, "error": f"timed out after {self.timeout_s:g} s"}
        if code is None:
            return None
        lane.proc = None
        return _read_status(job.folder, code, elapsed, lane.log)

    def _pick(self, lane: _Lane, pending: list[Job]) -> Job | None:
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

    def run(self, jobs: list[Job], more=None, expected: int | None = None) -> None:
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
    """The status a worker wrote for the preset in `folder`, or, when it wrote none, why it died."""
    status_file = folder / STATUS_FILE
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
    return {"status": Status.FAILED, "seconds": elapsed, "error": reason + (f": {tail[0][:200]}" if tail else "")}
