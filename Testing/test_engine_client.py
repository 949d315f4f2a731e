"""The engine client (`AutoRegisterLib.engine`) against real engine processes, without Slicer.

A run is started, followed through its events (``hello`` first), cancelled or killed, and read back;
every test then checks that no process whose command line mentions the run folder is left (read from
/proc, as the client itself does without psutil) and that the run folder is gone after `cleanup()`.
The images are the 24^3 blobs of test_reliability and the presets SimpleITK ones, so a run costs
about what starting Python, torch and one SimpleITK worker costs.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import SimpleITK as sitk
from test_reliability import pair, table_file

import AutoRegisterLib
from AutoRegisterLib import cli
from AutoRegisterLib.engine import EngineRun, engine_command, new_run_dir, read_outputs
from AutoRegisterLib.events import ExitCode, RunningSet, Status, is_cancelled, parse_event
from AutoRegisterLib.image import write_image
from AutoRegisterLib.results import Candidate

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to find leftover processes")

#: A SimpleITK preset the tests freeze (SIGSTOP) as soon as its worker starts: a hang that costs nothing.
FROZEN = {"name": "frozen", "backend": "sitk", "transform_type": "rigid", "params": {}}
#: A preset that fails at once, so no preset succeeds.
BROKEN = {"name": "broken", "backend": "sitk", "transform_type": "rigid", "params": {"iterations": -1}}
#: Grace period of the runs that must end by themselves: long, so that a loaded machine (a cancelled run
#: waits for torch's import to finish: 2-7 s here with other runs beside it) is not taken for a hung engine.
GRACE_S = 30.0
#: What must never appear in an engine's output: an abort or a crash at exit.
ABORT_MARKERS = ("FATAL", "terminate called", "Aborted", "Fatal Python error", "Segmentation fault",
                 "Traceback")


# --- helpers (also used by test_exit_paths) ----------------------------------------------------------

def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """Live processes (not zombies) whose command line mentions `text`, read from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append((int(entry), cmdline))
    return found


def wait_until_gone(text: str, timeout: float = 3.0) -> list[tuple[int, str]]:
    """Processes mentioning `text` still alive after `timeout` s (a SIGKILLed one takes a moment to go)."""
    deadline = time.monotonic() + timeout
    while True:
        left = processes_mentioning(text)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def assert_clean_end(run: EngineRun, graceful: bool = True) -> None:
    """No abort in the output; the engine's temp folder emptied by itself (graceful end); after cleanup
    no process mentions the run folder and the run folder is gone."""
    text = "\n".join(run.log)
    assert not any(marker in text for marker in ABORT_MARKERS), text
    if graceful:
        assert isinstance(run.exit_code, ExitCode), (run.exit_code, text)
        assert not any(run.tmp_dir.iterdir()), list(run.tmp_dir.iterdir())
    run.cleanup()
    assert not run.run_dir.exists()
    assert not wait_until_gone(str(run.run_dir)), processes_mentioning(str(run.run_dir))


def freeze(event: dict, *names: str) -> None:
    """SIGSTOP the worker of each named preset as it starts (see worker_faults)."""
    if event.get("event") == "start" and event["candidate"] in names:
        os.kill(event["pid"], signal.SIGSTOP)


def wait_for(run: EngineRun, predicate, timeout: float = 60.0, on_event=None) -> dict | None:
    """Poll until an event satisfies `predicate` (returned) or the engine ends (None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in run.poll():
            if on_event is not None:
                on_event(event)
            if predicate(event):
                return event
        if not run.is_running():
            return None
        time.sleep(0.02)
    raise AssertionError(f"no such event in {timeout} s; events {run.events}, log {run.log[-5:]}")


@pytest.fixture(scope="module", name="inputs")
def inputs_fixture(tmp_path_factory):
    """The blob pair on disk, and tables: sitk-rigid, a frozen preset beside sitk-rigid, a broken one."""
    folder = tmp_path_factory.mktemp("engine inputs")
    fixed, moving = pair()
    write_image(fixed, folder / "fixed.nii.gz")
    write_image(moving, folder / "moving.nii.gz")
    table_file(folder, ["sitk-rigid"], "rigid.json")
    table_file(folder, [FROZEN, "sitk-rigid"], "frozen.json")
    table_file(folder, [BROKEN], "broken.json")
    (folder / "bad.json").write_text("{ not json")
    return folder


class Runs:
    """Starts engine runs in run folders under one test's tmp_path, with a private "system" temp folder
    (TMPDIR of the environment the client starts from) that must stay empty."""

    def __init__(self, tmp_path: Path):
        """Runs go under `tmp_path`/runs."""
        self.root = tmp_path / "runs"
        self.system_tmp = tmp_path / "system tmp"
        self.system_tmp.mkdir()
        self.env = dict(os.environ, TMPDIR=str(self.system_tmp), OMP_NUM_THREADS="1")
        self.started: list[EngineRun] = []

    def new_dir(self) -> Path:
        """A new run folder."""
        return new_run_dir(self.root)

    def start(self, inputs_dir: Path, table: str, grace_s: float = GRACE_S, env_extra=None, run_dir=None,
              **options) -> EngineRun:
        """Register the blob pair with `table` (a file in `inputs_dir`); `options` go to engine_command."""
        options = {"jobs": 2, "timeout_s": 60, "fixed_modality": "T1", "moving_modality": "T2", **options}
        run = EngineRun.start(run_dir or self.new_dir(), fixed_path=inputs_dir / "fixed.nii.gz",
                              moving_path=inputs_dir / "moving.nii.gz", table_path=inputs_dir / table,
                              env={**self.env, **(env_extra or {})}, grace_s=grace_s, **options)
        self.started.append(run)
        return run

    def start_argv(self, argv: list[str], run_dir: Path, grace_s: float = GRACE_S) -> EngineRun:
        """Start a ready-made engine command."""
        run = EngineRun.start(run_dir, argv, env=self.env, grace_s=grace_s)
        self.started.append(run)
        return run

    def close(self) -> None:
        """Clean up every run; nothing may have landed in the private system temp folder."""
        for run in self.started:
            run.cleanup()
        assert not any(self.system_tmp.iterdir()), list(self.system_tmp.iterdir())


@pytest.fixture(name="runs")
def runs_fixture(tmp_path):
    """A `Runs` for this test, cleaned up after it."""
    r = Runs(tmp_path)
    yield r
    r.close()


# --- the vocabulary ----------------------------------------------------------------------------------

def test_engine_command_has_one_owner_the_cli_parser(tmp_path):
    argv = engine_command("-odd fixed.nii", "moving ü.nrrd", tmp_path / "out", python="py", presets=["a", "b"],
                          fixed_modality="T1", moving_modality="T2", timeout_s=30, device="cpu", jobs=2,
                          cancel_file=tmp_path / "c", work_dir=tmp_path / "w")
    assert argv[:3] == ["py", "-m", "AutoRegisterLib"]
    args = cli.build_parser().parse_args(argv[3:])
    assert (args.fixed, args.moving, args.out) == ("-odd fixed.nii", "moving ü.nrrd", str(tmp_path / "out"))
    assert (args.presets, args.fixed_modality, args.timeout, args.device, args.jobs) == ("a,b", "T1", 30.0, "cpu", 2)
    assert args.keep_all and args.progress_json and args.cancel_file == str(tmp_path / "c")
    assert args.work_dir == str(tmp_path / "w") and args.table is None
    with pytest.raises(ValueError):
        engine_command("f", "m", "o", table_path="t.json", presets="a")


def test_events_vocabulary():
    import threading

    assert [int(c) for c in ExitCode] == [0, 2, 3, 4, 130]
    assert {s.value for s in Status} == {"pending", "ok", "failed", "timeout", "unavailable", "disqualified",
                                         "eliminated"}
    assert Status.OK == "ok" and f"{Status.FAILED:<7}|" == "failed |" and json.dumps(Status.OK) == '"ok"'
    assert Candidate("x", "sitk", "rigid").status == Status.PENDING
    event = threading.Event()
    assert not is_cancelled(None) and not is_cancelled(event) and is_cancelled(lambda: True)
    event.set()
    assert is_cancelled(event)
    assert parse_event('{"event": "hello", "pid": 1}') == {"event": "hello", "pid": 1}
    assert parse_event("Traceback (most recent call last):") is None and parse_event("{oops") is None
    running = RunningSet()
    for e in ({"event": "hello", "pid": 9}, {"event": "start", "candidate": "b", "pid": 11, "fraction": 0.0},
              {"event": "start", "candidate": "a", "pid": 12, "fraction": 0.0},
              {"event": "finish", "candidate": "b", "status": "ok", "fraction": 0.5}):
        running.update(e)
    assert running.names == ["a"] and running.pids == [12] and "a" in running and len(running) == 1
    assert running.fraction == 0.5 and running.finished == {"b": "ok"}


def test_tables_no_longer_imports_the_cli():
    import ast

    source = (Path(AutoRegisterLib.__file__).parent / "tables.py").read_text(encoding="utf-8")
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    assert "cli" not in imported and "cli_common" in imported


# --- real runs ---------------------------------------------------------------------------------------

def test_a_run_says_hello_first_reports_progress_and_reads_back_typed_outputs(inputs, runs):
    run = runs.start(inputs, "rigid.json")
    seen = []
    code = run.wait(progress=seen.append, timeout=120)
    assert code == ExitCode.OK and isinstance(code, ExitCode), run.log
    assert seen == run.events
    kinds = [e["event"] for e in seen]
    assert kinds[0] == "hello" and kinds[-1] == "done" and {"start", "finish", "score"} <= set(kinds)
    assert seen[0] == {"event": "hello", "pid": run.launcher_pid, "version": AutoRegisterLib.__version__,
                       "library": str(Path(AutoRegisterLib.__file__).resolve().parent.parent)}
    assert run.engine_pid == run.launcher_pid and run.version == AutoRegisterLib.__version__
    assert run.worker_pids == [e["pid"] for e in seen if e["event"] == "start"]
    assert seen[-1] == {"event": "done", "exit_code": 0, "message": None}
    assert not run.running and run.running.fraction == 1.0 and not run.cancelled

    outputs = run.outputs()
    assert outputs.exit_code == ExitCode.OK and outputs.ok
    (cand,) = outputs.candidates
    assert isinstance(cand, Candidate) and cand is outputs.best and cand.name == "sitk-rigid"
    assert cand.status == Status.OK and cand.score > 0 and cand.transform is None  # read only when asked
    assert cand.transform_path == "transform.tfm"
    transform = outputs.read_transform()
    assert isinstance(transform, sitk.Transform) and transform.IsLinear()
    assert outputs.summary["report"] == "report.png" and outputs.report_path.stat().st_size > 1000
    assert outputs.warped_path is not None
    assert read_outputs(run.out_dir, 0).best.name == "sitk-rigid"
    assert_clean_end(run)


def test_without_result_json_the_outputs_are_empty_and_carry_the_message(inputs, runs):
    # A bare command line: the client adds --out, --cancel-file, --work-dir and --progress-json itself.
    run_dir = runs.new_dir()
    run = runs.start_argv([sys.executable, "-m", "AutoRegisterLib", "--table", str(inputs / "bad.json"), "--",
                           str(inputs / "fixed.nii.gz"), str(inputs / "moving.nii.gz")], run_dir)
    assert run.out_dir == run_dir / "out" and run.cancel_file.parent == run_dir and "--progress-json" in run.argv
    assert run.wait(timeout=60) == ExitCode.USAGE
    assert [e["event"] for e in run.events] == ["hello", "done"]
    outputs = run.outputs()
    assert outputs.exit_code == ExitCode.USAGE and not outputs.ok and outputs.candidates == []
    assert "bad.json: not valid JSON" in outputs.message
    with pytest.raises(ValueError):
        outputs.read_transform()
    assert_clean_end(run)


#: A launcher like Slicer's PythonSlicer: the engine is its child (so the pid the client started is not
#: the engine's), it forwards the output and it dies at once on SIGINT.
LAUNCHER = [sys.executable, "-c", "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))",
            sys.executable]


def test_through_a_launcher_the_hello_pid_is_the_engine_and_cancel_still_works(inputs, runs):
    run_dir = runs.new_dir()
    argv = engine_command(inputs / "fixed.nii.gz", inputs / "moving.nii.gz", run_dir / "mine",
                          python=LAUNCHER, table_path=inputs / "frozen.json", jobs=2, fixed_modality="T1",
                          moving_modality="T2")
    run = runs.start_argv(argv, run_dir)  # the client adds --cancel-file and --work-dir in run_dir
    assert "--cancel-file" in run.argv and "--work-dir" in run.argv and run.out_dir == run_dir / "mine"
    wait_for(run, lambda e: e["event"] == "hello")
    assert run.engine_pid != run.launcher_pid
    wait_for(run, lambda e: e["event"] == "score", on_event=lambda e: freeze(e, "frozen"))
    run.cancel()
    assert run.wait(timeout=30) == ExitCode.CANCELLED, run.log
    assert not run.killed and run.cancelled
    assert run.events[-1] == {"event": "done", "exit_code": 130,
                              "message": "autoregister: cancelled; nothing was written"}
    assert not run.out_dir.exists()
    assert_clean_end(run)


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_stopped_engine_behind_a_launcher_is_killed_within_the_grace_period(inputs, runs):
    run = runs.start(inputs, "frozen.json", python=LAUNCHER, grace_s=1.0)
    wait_for(run, lambda e: e["event"] == "start")
    os.kill(run.engine_pid, signal.SIGSTOP)
    pids = [run.engine_pid, run.launcher_pid] + run.worker_pids
    t0 = time.monotonic()
    run.cancel()
    while run.is_running():
        run.poll()
        time.sleep(0.02)
    assert time.monotonic() - t0 < 1.0 + 2.0
    assert run.killed and run.exit_code == -signal.SIGKILL
    assert not [pid for pid in pids if _alive(pid)]
    assert_clean_end(run, graceful=False)


def test_a_sigkilled_engine_leaves_no_worker_behind(inputs, runs):
    """Killed from outside (not by the client), the engine cannot kill its workers: they notice alone."""
    run = runs.start(inputs, "frozen.json")
    wait_for(run, lambda e: e["event"] == "score", on_event=lambda e: freeze(e, "frozen"))
    (frozen,) = [e["pid"] for e in run.events if e["event"] == "start" and e["candidate"] == "frozen"]
    workers = set(run.worker_pids)
    os.kill(run.engine_pid, signal.SIGKILL)
    os.kill(frozen, signal.SIGCONT)  # a stopped process runs nothing, its watchdog included
    deadline = time.monotonic() + 3.0
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in workers if _alive(pid)]
    while run.is_running():
        run.poll()
        time.sleep(0.02)
    assert run.exit_code == -signal.SIGKILL and not run.killed
    assert_clean_end(run, graceful=False)


def test_wait_with_a_timeout_cancels_and_raises(inputs, runs):
    run = runs.start(inputs, "frozen.json")
    calls = []
    with pytest.raises(TimeoutError):
        run.wait(timeout=0.5, idle=lambda: calls.append(1), progress=lambda e: freeze(e, "frozen"))
    assert calls and run.cancelled and not run.is_running()
    assert run.exit_code == ExitCode.CANCELLED, run.log
    assert_clean_end(run)


def _python_without(tmp_path: Path, prefixes: tuple[str, ...]) -> tuple[list[str], dict]:
    """A Python (command, environment) whose site-packages lack every package whose name starts with one of
    `prefixes`: no site (-S), and on PYTHONPATH a copy of site-packages made of links, minus those."""
    import sysconfig

    site = Path(sysconfig.get_paths()["purelib"])
    folder = tmp_path / f"site without {prefixes[0]}"
    folder.mkdir()
    for entry in site.iterdir():
        if not entry.name.lower().startswith(prefixes):
            (folder / entry.name).symlink_to(entry)
    return [sys.executable, "-S"], {"PYTHONPATH": str(folder)}


def test_without_matplotlib_everything_but_the_report_is_written(inputs, runs, tmp_path):
    python, env = _python_without(tmp_path, ("matplotlib", "mpl_toolkits", "pylab"))
    run = runs.start(inputs, "rigid.json", python=python, env_extra=env, jobs=1)
    assert run.wait(timeout=120) == ExitCode.OK, run.log
    outputs = run.outputs()
    assert outputs.summary["report"] == "skipped: matplotlib is not installed"
    assert outputs.report_path is None and outputs.best is not None and outputs.warped_path is not None
    assert_clean_end(run)


def test_without_torch_the_engine_fails_fast_with_one_line_and_exit_2(inputs, runs, tmp_path):
    python, env = _python_without(tmp_path, ("torch",))
    run = runs.start(inputs, "rigid.json", python=python, env_extra=env, jobs=1)
    assert run.wait(timeout=60) == ExitCode.USAGE, run.log
    assert run.log == ["autoregister: error: torch is not installed; AutoRegister needs it to score the results "
                       "(pip install torch)"]
    assert run.message == run.log[0]
    assert [e["event"] for e in run.events] == ["hello", "done"]  # no worker started
    assert_clean_end(run)
