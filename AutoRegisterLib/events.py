"""The engine's vocabulary: exit codes, candidate statuses, progress events, and cancel.

Shared by the command line (which writes the events), the engine client (`engine.py`, which reads them)
and the Slicer module, so each word has one owner. Stdlib only: the Slicer GUI imports it.

Progress events are dicts, one JSON object per line on the engine's stdout with ``--progress-json``:

- ``{"event": "hello", "pid": P, "version": V, "library": ROOT}``: always first; P is the engine's own pid
  (not a launcher's), ROOT the folder the engine imported AutoRegisterLib from;
- ``{"event": "pose", "status": "start"}`` and ``{"event": "pose", "status": "done", "applied": BOOL,
  "seconds": S}``: the pose search (`pose.py`), before any preset starts;
- ``{"event": "start", "candidate": NAME, "pid": WORKER_PID, "threads": N, "fraction": F}``;
- ``{"event": "finish", "candidate": NAME, "status": STATUS, "fraction": F}``;
- ``{"event": "score", "candidate": NAME, "status": STATUS, "score": S}``;
- ``{"event": "round", "round": "full", "candidates": [NAME, ...]}``;
- ``{"event": "done", "exit_code": CODE, "message": TEXT_OR_NULL}``: always last when the engine ends by itself.
"""

from __future__ import annotations

import json
from enum import Enum, IntEnum

#: Every event name, in the order a run produces them.
EVENTS = ("hello", "pose", "start", "finish", "score", "round", "done")
#: Where scores are computed: the best available, or as the user asks (``--device``, the Slicer combo).
DEVICES = ("auto", "cpu", "cuda")


class ExitCode(IntEnum):
    """Exit codes of ``autoregister`` (and of the engine)."""

    OK = 0  #: a result was kept
    USAGE = 2  #: bad input or usage, or a required dependency (torch) is missing: one line on stderr
    NO_RESULT = 3  #: no preset succeeded; result.json still holds every preset's reason
    UNTRUSTED = 4  #: a result was kept and written, but the trust verdict is red: check it before using it
    CANCELLED = 130  #: Ctrl-C, SIGTERM or the cancel file; nothing was written


def exit_code(code: int | None) -> ExitCode | int | None:
    """`code` as an ExitCode when it is one of ours, else the raw int (e.g. -9 for a killed process)."""
    if code is None:
        return None
    try:
        return ExitCode(code)
    except ValueError:
        return int(code)


class Status(str, Enum):
    """A candidate's status, as written in result.json and in progress events."""

    PENDING = "pending"  #: not run yet
    OK = "ok"  #: registered and scored
    FAILED = "failed"  #: the preset or its scoring failed (the error says why)
    TIMEOUT = "timeout"  #: killed after the per-preset timeout
    UNAVAILABLE = "unavailable"  #: its backend is not installed here; it never started
    DISQUALIFIED = "disqualified"  #: ran, but covers too little of the head or folds too much
    ELIMINATED = "eliminated"  #: dropped after the coarse round of a race

    def __str__(self) -> str:
        """The plain value ("ok"), as in result.json, whatever the Python version's Enum formatting."""
        return self.value

    __format__ = str.__format__


def is_cancelled(cancel) -> bool:
    """True when `cancel` (None, a threading.Event or a callable returning a bool) says stop."""
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


def event_line(event: dict) -> str:
    """One event as the JSON line the engine writes (without the newline)."""
    return json.dumps(event, default=str)


def parse_event(line: str) -> dict | None:
    """The event a line of engine output holds, or None for any other line (log text)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("event"), str) else None


class RunningSet:
    """Folds start/finish events into which presets run now and how far the run is."""

    def __init__(self) -> None:
        """Nothing runs yet."""
        self._running: dict[str, int | None] = {}  # candidate -> worker pid
        self.fraction = 0.0
        self.finished: dict[str, str] = {}  # candidate -> last status

    def update(self, event: dict) -> bool:
        """Take one event; True when it changed what runs."""
        kind = event.get("event")
        if "fraction" in event and event.get("fraction") is not None:
            self.fraction = float(event["fraction"])
        if kind == "start":
            self._running[event["candidate"]] = event.get("pid")
            return True
        if kind == "finish":
            self.finished[event["candidate"]] = event.get("status")
            self._running.pop(event["candidate"], None)
            return True
        if kind == "done":
            changed = bool(self._running)
            self._running.clear()
            return changed
        return False

    @property
    def names(self) -> list[str]:
        """Presets running now, sorted."""
        return sorted(self._running)

    @property
    def pids(self) -> list[int]:
        """Worker pids of the presets running now."""
        return [pid for pid in self._running.values() if pid is not None]

    def __contains__(self, name: str) -> bool:
        """True while preset `name` runs."""
        return name in self._running

    def __len__(self) -> int:
        """How many presets run now."""
        return len(self._running)

    def __iter__(self):
        """Running preset names, sorted."""
        return iter(self.names)
