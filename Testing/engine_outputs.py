"""An engine run that has ended, from an output folder written here: what the module reads when a run is over
(result.json with a trust verdict, the transforms, disagreement.nii.gz), without running the engine.

The folder is written by the library's own types (`Candidate`, `RegistrationResult`, `Verdict` and their
``to_dict``, `write_transform`, `write_image`), so it has result.json's shape whatever that becomes; `EndedEngine`
answers what the module asks of `AutoRegisterLib.engine.EngineRun` once the process is gone, and reads the folder
back with the library's `read_outputs`, as EngineRun.outputs() does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from AutoRegisterLib.events import ExitCode, RunningSet, Status
from AutoRegisterLib.image import Image, coarsened, write_image
from AutoRegisterLib.presets import Table
from AutoRegisterLib.results import DISAGREEMENT_IMAGE, Candidate, RegistrationResult, read_outputs
from AutoRegisterLib.transforms import write_transform
from AutoRegisterLib.trust import Signals, Verdict

#: A verdict of each light, as the engine words them.
VERDICTS = {
    "green": (0.6, 0.3, 1.1, "1 other candidate; the closest agrees within 0.4 mm; they differ most (0.9 mm) "
              "in the middle of the head"),
    "amber": (1.8, 0.9, 3.4, "candidates disagree by 1.9 mm (up to 3.2 mm in the left part of the head); "
              "the closest is 1.9 mm away"),
    "red": (6.1, 3.5, 11.0, "candidates disagree by 6.1 mm (up to 14.0 mm in the left back part of the head); "
            "the closest is 6.1 mm away"),
}


def disagreement_map(fixed: Image, hot_xyz=(3, 2, 1), hot_mm=9.0, spacing_mm=8.0) -> Image:
    """A map on `fixed`'s grid coarsened to `spacing_mm`: NaN outside a central block (the head), 0.5 mm inside,
    `hot_mm` at voxel `hot_xyz` (x, y, z), the largest disagreement."""
    grid = coarsened(fixed, spacing_mm)
    values = np.full(grid.array.shape, np.nan, np.float32)
    values[1:-1, 1:-1, 1:-1] = 0.5
    x, y, z = hot_xyz
    values[z, y, x] = hot_mm
    return grid.with_array(values)


def write_engine_outputs(out_dir, best_transform, light="red", disagreement: Image | None = None,
                         worst_slice: int | None = None, warnings=()) -> Path:
    """Write what the engine writes for a run won by sitk-rigid (`best_transform`) over sitk-affine (identity),
    with a `light` verdict (None: no verdict), and `disagreement` as disagreement.nii.gz when given."""
    import SimpleITK as sitk

    out = Path(out_dir)
    (out / "candidates").mkdir(parents=True)
    rigid = Candidate("sitk-rigid", "sitk", "rigid", status=Status.OK, score=0.92, coverage=1.0, seconds=2.0,
                      transform_path=write_transform(best_transform, out).name)
    other = write_transform(sitk.AffineTransform(3), out / "candidates", stem="sitk-affine")
    affine = Candidate("sitk-affine", "sitk", "affine", status=Status.OK, score=0.85, coverage=1.0, seconds=3.0,
                       transform_path=str(other.relative_to(out)))
    verdict = None
    if light is not None:
        estimate, low, high, reason = VERDICTS[light]
        verdict = Verdict(light, estimate, low, high, reason, Signals(1, 0, estimate, None, estimate, high, 0.92,
                                                                      1.0, 0.08), 0.2, None, worst_slice)
    table = Table("two", "T1", "T1", ())
    result = RegistrationResult([rigid, affine], rigid, None, None, "T1", "T1", table, trust=verdict,
                                warnings=list(warnings))
    (out / "result.json").write_text(json.dumps(result.to_dict(), default=str))
    if disagreement is not None:
        write_image(disagreement, out / DISAGREEMENT_IMAGE)
    return out


def exit_code_of(light) -> ExitCode:
    """The engine's exit code for a run with a winner and this verdict: 4 when red."""
    return ExitCode.UNTRUSTED if light == "red" else ExitCode.OK


class EndedEngine:
    """What the module asks of an `EngineRun` whose process has ended by itself: not running, not cancelled,
    nothing more to poll, its outputs (read back by the library), and its run folder to clean up."""

    def __init__(self, run_dir, exit_code, message=None):
        """The run folder holds the outputs in "out"."""
        self.run_dir = Path(run_dir)
        self.out_dir = self.run_dir / "out"
        self.exit_code, self.message = int(exit_code), message
        self.cancelled = False
        self.events: list[dict] = []
        self.running = RunningSet()
        self.argv: list[str] = []

    def poll(self) -> list[dict]:
        """No event is left."""
        return []

    def is_running(self) -> bool:
        """The process has ended."""
        return False

    def outputs(self):
        """The output folder read back, as EngineRun.outputs() reads it."""
        return read_outputs(self.out_dir, self.exit_code, message=self.message)

    def cancel(self) -> None:
        """Too late to cancel: nothing happens."""

    def terminate(self, grace_s: float = 0.0) -> None:
        """Nothing runs."""

    def cleanup(self) -> None:
        """Remove the run folder."""
        shutil.rmtree(self.run_dir, ignore_errors=True)
