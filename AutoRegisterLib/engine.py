"""The engine client: run ``python -m AutoRegisterLib ... --progress-json`` in the background, follow its
progress, cancel it, and read its outputs back. Slicer-free (stdlib and this library; no psutil), so the
Slicer module and plain Python use the same code::

    run = EngineRun.start(new_run_dir(), fixed_path="t1.nii.gz", moving_path="t2.nii.gz")
    run.wait(progress=print)                      # or poll() from a GUI timer, cancel() from a button
    outputs = run.outputs()                       # typed candidates; transforms read only when asked
    transform = outputs.read_transform()          # the winner's, as a SimpleITK transform
    run.cleanup()                                 # removes the run folder

A run folder holds everything of one run: the inputs the caller writes there, ``out/`` (the outputs),
``tmp/`` (every temporary file of the engine, its workers and their tools: TMPDIR and ``--work-dir``
point there) and the cancel file. Removing it cleans up whatever way the engine ended, a kill included.

Cancel is cooperative first: `cancel()` creates the cancel file, the engine kills its workers, removes
its temporary folder and exits 130. If it has not ended `grace_s` seconds later (hung, stopped, stuck in
native code), the next `poll()` kills it hard: the engine (its pid comes in the first event, ``hello``, so
a launcher such as Slicer's PythonSlicer in between does not matter), the launcher, and every worker
whose pid came in a ``start`` event; on posix their process groups get SIGKILL, on Windows
``taskkill /F /T``. Workers also watch their parent and end by themselves when the engine is gone.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from .cli import engine_command
from .events import ExitCode, RunningSet, parse_event
from .events import exit_code as as_exit_code
from .results import EngineOutputs, read_outputs

__all__ = ["EngineOutputs", "EngineRun", "engine_command", "engine_environment", "new_run_dir", "read_outputs"]

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
#: Names inside a run folder.
OUT_DIR, TMP_DIR, CANCEL_FILE = "out", "tmp", "cancel"
#: Windows: no console window for the engine or for taskkill (Slicer is a GUI process without a console).
CREATE_NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000)
CREATE_NEW_PROCESS_GROUP = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x00000200)
#: Seconds to wait for the engine's output to end after a hard kill before giving up on it.
KILL_SETTLE_S = 2.0
#: Log lines kept in memory (a runaway traceback loop must not fill the GUI's memory).
MAX_LOG_LINES = 2000


def new_run_dir(base=None, prefix: str = "autoregister-run-") -> Path:
    """A new, empty run folder under `base` (default: the system's temporary folder)."""
    if base is not None:
        Path(base).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=None if base is None else str(base))).resolve()


def engine_environment(run_dir, env=None) -> dict:
    """The engine's environment: `env` (default os.environ) with TMPDIR in the run folder, unbuffered
    output, this library importable, and without ITK_AUTOLOAD_PATH."""
    env = dict(os.environ if env is None else env)
    # Slicer's launcher sets it; inherited by a process loading pip's ITK/ANTs it can crash it. (Through
    # PythonSlicer the launcher sets it again; the engine and the workers then drop it themselves.)
    env.pop("ITK_AUTOLOAD_PATH", None)
    tmp = str(Path(run_dir) / TMP_DIR)
    env["TMPDIR"] = env["TEMP"] = env["TMP"] = tmp
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(PACKAGE_ROOT) not in paths:
        env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT)] + paths)
    return env


def _option(argv: list[str], flag: str) -> str | None:
    """The value of `flag` in an engine argument list (options end at "--")."""
    for i, arg in enumerate(argv):
        if arg == "--":
            break
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1:]
    return None


def _with_options(argv: list[str], extra: list[str]) -> list[str]:
    """`argv` with `extra` options inserted before "--" (or appended)."""
    argv = list(argv)
    at = argv.index("--") if "--" in argv else len(argv)
    return argv[:at] + extra + argv[at:]


class EngineRun:
    """One engine process: its progress events, cancel with a grace period, hard kill, cleanup.

    Every method is safe to call from a GUI timer: only `wait()`, `terminate()` and `cleanup()` block.
    """

    def __init__(self, argv: list[str], run_dir, env: dict | None = None, grace_s: float = 10.0):
        """Start `argv` (an engine command with ``--progress-json``); prefer `EngineRun.start`."""
        self.argv = [str(a) for a in argv]
        self.run_dir = Path(run_dir).resolve()
        out = _option(self.argv, "--out")
        self.out_dir = Path(out) if out is not None else self.run_dir / OUT_DIR
        cancel_file = _option(self.argv, "--cancel-file")
        self.cancel_file = Path(cancel_file) if cancel_file is not None else self.run_dir / CANCEL_FILE
        self.tmp_dir = self.run_dir / TMP_DIR
        self.grace_s = float(grace_s)
        #: Every event received so far, in order.
        self.events: list[dict] = []
        #: Lines of the engine's output that are not events (its stderr is merged in: errors, warnings).
        self.log: list[str] = []
        #: Which presets run now and how far the run is.
        self.running = RunningSet()
        #: The engine's own pid and library version, from its first event (None until then).
        self.engine_pid: int | None = None
        self.version: str | None = None
        #: Worker pids seen in "start" events (killed with the engine on a hard kill).
        self.worker_pids: list[int] = []
        #: The exit code once the engine has ended: an ExitCode, or the raw code (e.g. -9 when killed).
        self.exit_code: ExitCode | int | None = None
        #: The message of the "done" event (the one line the engine printed on stderr), if any.
        self.message: str | None = None
        #: True once cancel() (or terminate()) was called; `killed` once the hard kill was needed.
        self.cancelled = False
        self.killed = False
        self._kill_at: float | None = None
        self._killed_at: float | None = None
        self._eof = False
        self._queue: queue.Queue = queue.Queue()

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(exist_ok=True)
        try:
            self.cancel_file.unlink()
        except OSError:
            pass
        kwargs = {}
        if os.name == "posix":
            kwargs["start_new_session"] = True  # its own group: a hard kill reaches it and nothing of ours
        else:
            kwargs["creationflags"] = CREATE_NO_WINDOW | CREATE_NEW_PROCESS_GROUP
        self.process = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=engine_environment(self.run_dir, env), text=True, encoding="utf-8", errors="replace", **kwargs)
        self._reader = threading.Thread(target=self._read, name="autoregister-engine-reader", daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, run_dir, argv: list[str] | None = None, *, env: dict | None = None, grace_s: float = 10.0,
              **command) -> EngineRun:
        """Start the engine for a run folder: from `argv`, or from `engine_command` keyword arguments
        (`fixed_path`, `moving_path`, and its options; `out_dir`, `cancel_file` and `work_dir` default
        to the run folder's). Options the client needs (those three and ``--progress-json``) are added,
        in the run folder, to an `argv` that lacks them."""
        run_dir = Path(run_dir).resolve()
        if argv is None:
            command.setdefault("out_dir", run_dir / OUT_DIR)
            command.setdefault("cancel_file", run_dir / CANCEL_FILE)
            command.setdefault("work_dir", run_dir / TMP_DIR)
            argv = engine_command(**command)
        else:
            if command:
                raise TypeError("give argv or engine_command keyword arguments, not both")
            argv = [str(a) for a in argv]
            extra = []
            if _option(argv, "--out") is None:
                extra += ["--out", str(run_dir / OUT_DIR)]
            if _option(argv, "--cancel-file") is None:
                extra += ["--cancel-file", str(run_dir / CANCEL_FILE)]
            if _option(argv, "--work-dir") is None:
                extra += ["--work-dir", str(run_dir / TMP_DIR)]
            if "--progress-json" not in argv:
                extra.append("--progress-json")
            argv = _with_options(argv, extra)
        return cls(argv, run_dir, env=env, grace_s=grace_s)

    # --- reading --------------------------------------------------------------------------------

    def _read(self) -> None:
        try:
            for line in self.process.stdout:
                self._queue.put(line)
        except (OSError, ValueError):  # the pipe closed under us (a kill during shutdown)
            pass
        finally:
            self._queue.put(None)

    @property
    def launcher_pid(self) -> int:
        """The pid of the process started (the engine itself, or a launcher such as PythonSlicer)."""
        return self.process.pid

    def poll(self) -> list[dict]:
        """Events received since the last call (never blocks); also hard-kills once a cancel's grace is over."""
        new = []
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._eof = True
                continue
            event = parse_event(line)
            if event is None:
                if line.strip():
                    self.log.append(line.rstrip("\r\n"))
                    del self.log[:-MAX_LOG_LINES]
                continue
            self._take(event)
            new.append(event)
        self.events.extend(new)
        now = time.monotonic()
        if self._kill_at is not None and not self.killed and now >= self._kill_at and self.exit_code is None:
            self.kill()
        if self.killed and not self._eof and now >= (self._killed_at or now) + KILL_SETTLE_S:
            self._eof = True  # something we do not know holds the pipe: the engine is dead, stop waiting
        if self._eof and self.exit_code is None and self.process.poll() is not None:
            self.exit_code = as_exit_code(self.process.returncode)
        return new

    def _take(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "hello":
            self.engine_pid = int(event["pid"]) if event.get("pid") is not None else None
            self.version = event.get("version")
        elif kind == "start" and event.get("pid") is not None:
            self.worker_pids.append(int(event["pid"]))
        elif kind == "done":
            self.message = event.get("message")
        self.running.update(event)

    def is_running(self) -> bool:
        """True until `poll()` has seen the engine end (its output closed, its process gone) and has handed
        out its last event; then `exit_code` is set."""
        return self.exit_code is None

    def wait(self, progress=None, timeout: float | None = None, idle=None) -> ExitCode | int | None:
        """Block until the engine ends; each event goes to `progress(event)`, `idle()` runs every loop (e.g.
        Slicer's processEvents). After `timeout` seconds the run is cancelled and TimeoutError raised once
        it has ended. Returns the exit code."""
        deadline = None if timeout is None else time.monotonic() + timeout
        timed_out = False
        while True:
            for event in self.poll():
                if progress is not None:
                    progress(event)
            if not self.is_running():
                break
            if idle is not None:
                idle()
            if deadline is not None and not timed_out and time.monotonic() > deadline:
                timed_out = True
                self.cancel()
            time.sleep(0.05)
        if timed_out:
            raise TimeoutError(f"the registration did not finish in {timeout:g} s; it was cancelled")
        return self.exit_code

    # --- stopping -------------------------------------------------------------------------------

    def cancel(self, grace_s: float | None = None) -> None:
        """Ask the engine to stop (never blocks): create the cancel file; `poll()` kills it hard if it has
        not ended `grace_s` (default: the run's) seconds later."""
        if not self.is_running():
            return
        if self._kill_at is not None:  # already cancelled: a shorter grace (e.g. at shutdown) still applies
            if grace_s is not None:
                self._kill_at = min(self._kill_at, time.monotonic() + float(grace_s))
            return
        self.cancelled = True
        try:
            self.cancel_file.parent.mkdir(parents=True, exist_ok=True)
            self.cancel_file.touch()
        except OSError:  # the run folder is gone: the hard kill below does the job
            pass
        self._kill_at = time.monotonic() + (self.grace_s if grace_s is None else float(grace_s))

    def terminate(self, grace_s: float | None = None) -> ExitCode | int | None:
        """Cancel and block until the engine has ended (killed after `grace_s`); for shutdown. The exit code."""
        self.cancel(grace_s)
        while self.is_running():
            self.poll()
            time.sleep(0.05)
        return self.exit_code

    def kill(self) -> None:
        """Kill the engine, the launcher and every known worker now (with their process groups on posix)."""
        self.cancelled = self.killed = True
        self._killed_at = time.monotonic()
        launcher_alive = self.process.poll() is None  # not reaped yet: its pid cannot have been reused
        pids = [self.process.pid] if launcher_alive else []
        for pid in [self.engine_pid] + self.worker_pids:
            if pid is not None and pid not in pids and self._owned(pid):
                pids.append(pid)
        if os.name == "posix":
            groups = set(pids)  # the launcher and every worker lead their own group
            for pid in pids:
                try:
                    groups.add(os.getpgid(pid))
                except OSError:
                    pass
            groups -= {0, 1, os.getpgrp()}  # never our own group (the GUI's) or init's
            for group in groups:
                try:
                    os.killpg(group, signal.SIGKILL)
                except OSError:
                    pass
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        else:
            for pid in pids:
                subprocess.call(["taskkill", "/F", "/T", "/PID", str(pid)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, creationflags=CREATE_NO_WINDOW)
        try:
            self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:  # poll() keeps checking; a GUI must not block here
            pass

    def _owned(self, pid: int) -> bool:
        """True when `pid` still runs AutoRegister (a pid from an event may have ended and been reused)."""
        if not os.path.isdir("/proc/self"):
            return True  # no /proc (macOS, Windows): the pid is recent enough to trust
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return b"AutoRegisterLib" in f.read()
        except OSError:
            return False

    def cleanup(self) -> None:
        """Remove the run folder (inputs, outputs, temporary files), terminating the engine first if it runs."""
        if self.is_running():
            self.terminate()
        self._reader.join(timeout=1.0)
        if self.process.stdout is not None:
            try:
                self.process.stdout.close()
            except OSError:
                pass
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> EngineRun:
        """Use as a context manager: cleanup() on exit."""
        return self

    def __exit__(self, *exc) -> None:
        """Terminate if still running and remove the run folder."""
        self.cleanup()

    # --- results --------------------------------------------------------------------------------

    def outputs(self) -> EngineOutputs:
        """The engine's outputs read back (see `read_outputs`); call once it has ended."""
        return read_outputs(self.out_dir, self.exit_code, message=self.message or self._last_log_line())

    def _last_log_line(self) -> str | None:
        return self.log[-1] if self.log else None
