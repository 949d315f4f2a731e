"""The one small interface every registration backend implements.

A backend estimates a transform that maps FIXED physical points (LPS, mm) to MOVING points, as a
SimpleITK transform, so that ``sitk.Resample(moving, fixed, transform)`` puts the moving image on the
fixed grid. Warping and the valid-domain mask are derived from that transform here, once, for all
backends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable
from ..image import Image, resample_to_grid, valid_mask_on_grid

TRANSFORM_TYPES = ("rigid", "affine", "deformable")


@dataclass(frozen=True)
class Preset:
    """A named registration recipe: which backend, what kind of transform, and backend parameters."""

    name: str
    backend: str
    transform_type: str
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain-data form, for JSON and for passing to worker processes."""
        return {"name": self.name, "backend": self.backend, "transform_type": self.transform_type,
                "params": dict(self.params)}

    @classmethod
    def from_dict(cls, d: dict) -> Preset:
        """Inverse of `to_dict` (validation of user tables happens in `presets.py`)."""
        return cls(d["name"], d["backend"], d["transform_type"], dict(d.get("params", {})))


@dataclass
class RegistrationOutput:
    """What a backend run yields: the fixed->moving transform, the warped moving image, its valid mask."""

    transform: object  # SimpleITK.Transform
    warped: Image
    valid_mask: np.ndarray


class Backend:
    """Base class: subclasses set `name` and implement `check_available` and `estimate`."""

    name = "base"

    def check_available(self) -> None:
        """Raise BackendUnavailable with the reason when this backend cannot run here."""
        raise NotImplementedError

    def availability(self) -> tuple[bool, str]:
        """(True, "") when usable, else (False, reason)."""
        try:
            self.check_available()
        except BackendUnavailable as exc:
            return False, str(exc)
        return True, ""

    def estimate(self, preset: Preset, fixed: Image, moving: Image, workdir: Path, threads: int):
        """Return a SimpleITK transform mapping fixed points to moving points."""
        raise NotImplementedError

    def run(self, preset: Preset, fixed: Image, moving: Image, workdir: Path | None = None,
            threads: int = 1) -> RegistrationOutput:
        """Estimate the transform, then warp the moving image and its domain onto the fixed grid."""
        import tempfile

        self.check_available()
        if workdir is None:
            with tempfile.TemporaryDirectory(prefix="autoreg-") as tmp:
                transform = self.estimate(preset, fixed, moving, Path(tmp), threads)
        else:
            transform = self.estimate(preset, fixed, moving, Path(workdir), threads)
        return warp_with(transform, fixed, moving)


def warp_with(transform, fixed: Image, moving: Image) -> RegistrationOutput:
    """Resample the moving image and its domain mask onto the fixed grid through `transform`."""
    warped = resample_to_grid(moving, fixed, transform, "linear", 0.0)
    mask = valid_mask_on_grid(moving, fixed, transform)
    return RegistrationOutput(transform, warped, mask)
