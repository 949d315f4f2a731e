"""Faults injected into preset workers from outside, the way a crash, a hang or a kill reaches them.

A slow preset is not a reliable hang: SyN on a tiny image converges within a second on a fast machine.
A worker frozen with SIGSTOP is: it exists, holds its resources and never finishes, until the runner's
timeout, Cancel or Ctrl-C kills it.
"""

from __future__ import annotations

import json
import signal

import psutil

#: A real preset that the tests freeze or kill once its worker has started.
HANGING = {"name": "slow-syn", "backend": "ants", "transform_type": "deformable",
           "params": {"type_of_transform": "SyN", "reg_iterations": [5000, 5000, 5000]}}


def signal_workers(name: str, signum: int, parent: psutil.Process | None = None) -> int:
    """Send `signum` to every worker of preset `name` below `parent` (default: this process); return how many."""
    sent = 0
    for child in (parent or psutil.Process()).children(recursive=True):
        try:
            # The worker's spec path names its preset: .../NN-<preset>/spec.json
            if any(f"-{name}/" in part for part in child.cmdline()):
                child.send_signal(signum)
                sent += 1
        except psutil.NoSuchProcess:
            pass
    return sent


def on_start(*names: str, signum: int = signal.SIGSTOP):
    """A progress callback that sends `signum` to each named preset's worker as soon as it starts."""
    def callback(event: dict) -> None:
        if event["event"] == "start" and event["candidate"] in names:
            assert signal_workers(event["candidate"], signum) == 1, f"no worker found for {event['candidate']}"
    return callback


def freeze_from_progress_json(cli, names) -> None:
    """Read a CLI's ``--progress-json`` events and freeze each named preset's worker as it starts.

    Returns once every named worker is frozen; the CLI keeps running.
    """
    waiting = set(names)
    parent = psutil.Process(cli.pid)
    for line in cli.stdout:
        event = json.loads(line)
        if event["event"] == "start" and event["candidate"] in waiting:
            assert signal_workers(event["candidate"], signal.SIGSTOP, parent) == 1
            waiting.discard(event["candidate"])
            if not waiting:
                return
    raise AssertionError(f"the command line ended before {sorted(waiting)} started")
