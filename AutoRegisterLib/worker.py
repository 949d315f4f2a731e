"""A worker process runs presets, one at a time: ``python -m AutoRegisterLib.worker --threads N``.

It reads spec file paths from stdin, one per line, and runs each until stdin closes. Each preset writes
its transform and a status file into its own folder; the parent reads them, and a status file that never
appears means the worker died.

Running presets in worker processes lets a crash, a hang or an out-of-memory kill take down only the
preset that was running, and lets Cancel kill the whole tree. A worker serves several presets in turn
because loading a toolkit costs more than a small registration (itk-elastix: about 11 s, antspyx: about
2 s here), so the runner hands presets of a toolkit to the worker that has already loaded it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from .events import Status
from .transforms import write_transform

#: The protocol's two files in a preset's folder: the runner writes the spec, this worker the status.
SPEC_FILE, STATUS_FILE = "spec.json", "status.json"


def _write_status(out: Path, status: dict) -> None:
    tmp = out / f".{STATUS_FILE}.partial"
    tmp.write_text(json.dumps(status))
    os.replace(tmp, out / STATUS_FILE)  # whole or absent: the runner reads it as soon as it exists


def run_spec(spec: dict) -> dict:
    """Run the preset a spec describes and write its outputs; return the status written."""
    out = Path(spec["out"])
    start = time.perf_counter()
    try:
        from .backends import get_backend
        from .backends.base import Preset
        from .image import read_image

        preset = Preset.from_dict(spec["preset"])
        backend = get_backend(preset.backend)
        backend.check_available()
        fixed = read_image(spec["fixed"])
        moving = read_image(spec["moving"])
        # Absent or null: no mask (specs written before masks existed have neither key).
        masks = {key: read_image(spec[key]) for key in ("fixed_mask", "moving_mask") if spec.get(key)}
        workdir = out / "work"
        workdir.mkdir(exist_ok=True)
        transform = backend.estimate(preset, fixed, moving, workdir, int(spec.get("threads", 1)), **masks)
        path = write_transform(transform, out)
        status = {"status": Status.OK, "transform": path.name}
    except Exception as exc:  # a failed preset must report, never take the others down
        from .errors import BackendUnavailable
        from .image import itk_reason

        kind = Status.UNAVAILABLE if isinstance(exc, BackendUnavailable) else Status.FAILED
        error = f"{type(exc).__name__}: {itk_reason(str(exc))}"
        if _out_of_memory(exc):
            limit = spec.get("memory_limit_mb")
            error = f"out of memory{f' (limit {limit} MB per worker)' if limit else ''}: {error}"
        status = {"status": kind, "error": error[:500], "traceback": traceback.format_exc()[-4000:]}
    status["seconds"] = time.perf_counter() - start
    _write_status(out, status)
    return status


def _out_of_memory(exc: BaseException) -> bool:
    """True for Python's MemoryError and for C++ allocation failures that toolkits rethrow."""
    text = str(exc)
    return isinstance(exc, MemoryError) or any(
        marker in text for marker in ("bad_alloc", "MemoryAllocationError", "Failed to allocate memory",
                                      "failed to map segment", "Cannot allocate memory"))


def limit_memory(megabytes) -> None:
    """Cap this process's address space (posix only): allocations beyond it fail instead of swapping."""
    if not megabytes:
        return
    import resource

    limit = int(megabytes) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def serve(lines) -> None:
    """Run the spec at each path in `lines` (stdin for a served worker), in order, until they end."""
    for line in lines:
        if line.strip():
            run_spec(json.loads(Path(line.strip()).read_text()))


def watch_parent(interval_s: float = 0.5):
    """Kill this worker's process group once its parent (the engine) has gone; returns a function that
    stops watching (None on Windows).

    The engine kills its workers whenever it ends by itself; this covers an engine that is killed
    (SIGKILL, a crash): the worker is then re-parented, and it and any tool it runs (it leads its own
    process group) end within `interval_s`. Posix only: on Windows the engine client kills the workers
    by the pids of the "start" events.
    """
    if os.name != "posix":
        return None
    parent, stop = os.getppid(), threading.Event()

    def watch() -> None:
        while not stop.wait(interval_s):
            if os.getppid() != parent:
                if os.getpgrp() == os.getpid():  # our own group: the tools we started go too
                    os.killpg(os.getpid(), signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="autoregister-parent-watch", daemon=True)
    # A small stack: it only polls, and under --memory-limit-mb every MB of address space counts.
    default_stack = threading.stack_size(256 * 1024)
    try:
        thread.start()
    finally:
        threading.stack_size(default_stack)

    def stop_watching() -> None:
        stop.set()  # the watcher only sleeps on this Event: it ends at once, before the interpreter does
        thread.join(1.0)

    return stop_watching


def main(argv=None) -> int:
    """Entry point of a worker process."""
    # Before ITK/ANTs load: Slicer's launcher sets it, and pip's ITK loading Slicer's factories crashes.
    os.environ.pop("ITK_AUTOLOAD_PATH", None)
    p = argparse.ArgumentParser(prog="python -m AutoRegisterLib.worker",
                                description="Run the spec files whose paths arrive on stdin, one per line.")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--memory-limit-mb", type=int)
    p.add_argument("--run-dir", help="the run this worker belongs to (so process lists show it)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    # Must be set before ITK/ANTs load: they read it once at start-up.
    for var in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(max(1, args.threads))
    # Before the memory cap: under a tight cap there may be no address space left for a thread's stack.
    stop_watching = watch_parent()
    if os.name == "posix":
        # numpy loads before the cap: OpenBLAS retries forever when it cannot map its buffers.
        from . import image  # noqa: F401
        limit_memory(args.memory_limit_mb)
    try:
        serve(sys.stdin)
    finally:
        if stop_watching is not None:
            stop_watching()
    return 0


if __name__ == "__main__":
    sys.exit(main())
