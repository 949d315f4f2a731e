"""Faults injected into preset workers from outside, the way a crash, a hang or a kill reaches them.

A slow preset is not a reliable hang: SyN on a tiny image converges within a second on a fast machine.
A worker frozen with SIGSTOP is: it exists, holds its resources and never finishes, until the runner's
timeout, Cancel or Ctrl-C kills it. The runner's "start" event names the worker's pid.
"""

from __future__ import annotations

import json
import os
import signal

#: A real preset that the tests freeze or kill once its worker has started.
HANGING = {"name": "slow-syn", "backend": "ants", "transform_type": "deformable",
           "params": {"type_of_transform": "SyN", "reg_iterations": [5000, 5000, 5000]}}


def on_start(*names: str, signum: int = signal.SIGSTOP):
    """A progress callback that sends `signum` to each named preset's worker as soon as it starts."""
    def callback(event: dict) -> None:
        if event["event"] == "start" and event["candidate"] in names:
            os.kill(event["pid"], signum)
    return callback


def freeze_from_progress_json(cli, names) -> None:
    """Read a CLI's ``--progress-json`` events and freeze each named preset's worker as it starts.

    Returns once every named worker is frozen; the CLI keeps running.
    """
    waiting = set(names)
    freeze = on_start(*names)
    for line in cli.stdout:
        event = json.loads(line)
        freeze(event)
        if event["event"] == "start":
            waiting.discard(event["candidate"])
            if not waiting:
                return
    raise AssertionError(f"the command line ended before {sorted(waiting)} started")
