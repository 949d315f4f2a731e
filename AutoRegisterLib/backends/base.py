"""The one small interface every registration backend implements.

A backend estimates a transform that maps FIXED physical points (LPS, mm) to MOVING points, as a
SimpleITK transform, so that ``sitk.Resample(moving, fixed, transform)`` puts the moving image on the
fixed grid. Warping and the valid-domain mask are derived from that transform here, once, for all
backends.

Masks: `estimate` and `run` take an optional fixed mask and moving mask, each an `Image` on exactly the grid
of the image it masks, nonzero voxels inside. Each backend hands them to its toolkit so that its similarity
metric only counts fixed samples inside the fixed mask that map inside the moving mask; `binary_mask` checks
and converts them, once, for all backends.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable, InputError
from ..image import Image, resample_to_grid

TRANSFORM_TYPES = ("rigid", "affine", "deformable")
#: The conditions a table may put on a preset: it races only on inputs this fine or this coarse.
INPUT_LIMITS = ("max_input_mm", "min_input_mm")


@dataclass(frozen=True)
class Preset:
    """A named registration recipe: which backend, what kind of transform, and backend parameters.

    `grid_mm` sizes its finest stage physically: it registers copies of the images coarsened to voxels of at
    least `grid_mm` along each axis (0: the input's own grid). Its transform, being physical, applies to the
    inputs as they are. `max_input_mm` (0: no limit) keeps it out of a table's race when the fixed image's
    voxels are coarser than that along some axis: a preset that pays at 1 mm may overfit at 3 mm;
    `min_input_mm` (0: no limit) keeps it out when they are that fine or finer along every axis.
    """

    name: str
    backend: str
    transform_type: str
    params: dict = field(default_factory=dict)
    grid_mm: float = 0.0
    max_input_mm: float = 0.0
    min_input_mm: float = 0.0

    def to_dict(self) -> dict:
        """Plain-data form, for JSON and for passing to worker processes."""
        out = {"name": self.name, "backend": self.backend, "transform_type": self.transform_type,
               "params": dict(self.params), "grid_mm": self.grid_mm}
        for key in INPUT_LIMITS:
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Preset:
        """Inverse of `to_dict` (validation of user tables happens in `presets.py`)."""
        return cls(d["name"], d["backend"], d["transform_type"], dict(d.get("params", {})),
                   float(d.get("grid_mm", 0.0)), **{k: float(d.get(k, 0.0)) for k in INPUT_LIMITS})

    def suits(self, fixed_spacing_mm) -> bool:
        """Whether this preset races on a fixed image with these voxel sizes (`max_input_mm`, `min_input_mm`)."""
        coarsest = max(fixed_spacing_mm)
        return ((not self.max_input_mm or coarsest <= self.max_input_mm + 1e-6)
                and (not self.min_input_mm or coarsest > self.min_input_mm + 1e-6))


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

    def validate(self, preset: Preset) -> dict:
        """Return the preset's params merged with the backend's defaults; raise InputError naming a bad field."""
        return dict(preset.params)

    def availability(self) -> tuple[bool, str]:
        """(True, "") when usable, else (False, reason)."""
        try:
            self.check_available()
        except BackendUnavailable as exc:
            return False, str(exc)
        return True, ""

    def estimate(self, preset: Preset, fixed: Image, moving: Image, workdir: Path, threads: int,
                 fixed_mask: Image | None = None, moving_mask: Image | None = None):
        """Return a SimpleITK transform mapping fixed points to moving points (masks: see the module docstring)."""
        raise NotImplementedError

    def run(self, preset: Preset, fixed: Image, moving: Image, workdir: Path | None = None,
            threads: int = 1, fixed_mask: Image | None = None, moving_mask: Image | None = None) -> RegistrationOutput:
        """Estimate the transform, then warp the moving image and its domain onto the fixed grid."""
        import tempfile

        self.check_available()
        masks = {"fixed_mask": fixed_mask, "moving_mask": moving_mask}
        if workdir is not None:
            Path(workdir).mkdir(parents=True, exist_ok=True)
        if workdir is None:
            with tempfile.TemporaryDirectory(prefix="autoreg-") as tmp:
                transform = self.estimate(preset, fixed, moving, Path(tmp), threads, **masks)
        else:
            transform = self.estimate(preset, fixed, moving, Path(workdir), threads, **masks)
        return warp_with(transform, fixed, moving)


def warp_with(transform, fixed: Image, moving: Image) -> RegistrationOutput:
    """Resample the moving image and its domain mask onto the fixed grid through `transform`."""
    # One pass: samples outside the moving domain come back as NaN, which marks them; then they become 0.
    warped = resample_to_grid(moving, fixed, transform, "linear", float("nan"))
    mask = np.isfinite(warped.array)
    if not mask.all():
        warped = warped.with_array(np.where(mask, warped.array, np.float32(0.0)))
    return RegistrationOutput(transform, warped, mask)


# --- helpers shared by the backend modules ---------------------------------------------------

def check_params(preset: Preset, defaults: dict, choices: dict | None = None) -> dict:
    """Merge a preset's params over `defaults`; unknown fields, wrong types or values raise InputError naming the field."""
    choices = choices or {}
    if preset.transform_type not in TRANSFORM_TYPES:
        raise InputError(f"preset {preset.name!r}: transform_type must be one of {TRANSFORM_TYPES}, "
                         f"got {preset.transform_type!r}")
    if not isinstance(preset.params, dict):
        raise InputError(f"preset {preset.name!r}: params must be an object")
    merged = dict(defaults)
    for key, value in preset.params.items():
        where = f"preset {preset.name!r}: params.{key}"
        if key not in defaults:
            raise InputError(f"{where} is not a {preset.backend} parameter (known: {', '.join(sorted(defaults))})")
        default = defaults[key]
        if not _same_kind(value, default):
            raise InputError(f"{where} must be {_kind_name(default)}, got {value!r}")
        if key in choices and value not in choices[key]:
            raise InputError(f"{where} must be one of {list(choices[key])}, got {value!r}")
        merged[key] = list(value) if isinstance(value, (list, tuple)) else value
    return merged


def _same_kind(value, default) -> bool:
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)) or not value:
            return False
        return all(_same_kind(v, default[0]) for v in value) if default else True
    return isinstance(value, type(default))


def _kind_name(default) -> str:
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, (list, tuple)):
        return f"a non-empty list of {_kind_name(default[0]) if default else 'values'}"
    return {int: "an integer", float: "a number", str: "a string"}.get(type(default), type(default).__name__)


def same_length(preset: Preset, params: dict, *keys: str) -> None:
    """Raise InputError when per-level lists (iterations, shrink factors, ...) differ in length."""
    lengths = {k: len(params[k]) for k in keys}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"params.{k} has {n}" for k, n in lengths.items())
        raise InputError(f"preset {preset.name!r}: one entry per resolution level is needed ({detail})")


def binary_mask(mask: Image | None, image: Image, name: str) -> Image | None:
    """`mask` as a uint8 image of 0 (outside) and 1 (inside: nonzero, finite), checked to lie on `image`'s grid
    and to hold a voxel inside; None stays None. `name` ("fixed mask", "moving mask") names it in errors."""
    if mask is None:
        return None
    if not mask.same_grid(image):
        raise InputError(f"the {name} is not on its image's grid (mask {mask.size} voxels of {mask.spacing_mm} mm "
                         f"at {mask.origin_mm}; image {image.size} of {image.spacing_mm} mm at {image.origin_mm})")
    values = np.asarray(mask.array)
    # A plain cast would turn 0.5 into 0 and 256 into 0, and NaN into whatever the platform gives.
    inside = (values != 0) & np.isfinite(values) if values.dtype.kind == "f" else values != 0
    if not inside.any():
        raise InputError(f"the {name} has no voxel inside it (every voxel is 0)")
    return mask.with_array(inside.astype(np.uint8))


def find_executable(explicit: str, env_var: str, program: str) -> str | None:
    """The executable to run: an explicit path, else $`env_var`, else `program` on PATH, else None."""
    for candidate in (explicit, os.environ.get(env_var, "")):
        if candidate:
            return candidate
    return shutil.which(program)


def set_threads(threads: int) -> int:
    """Limit ITK (all copies: SimpleITK, itk, ANTs) to `threads` threads for the work that follows."""
    import SimpleITK as sitk

    threads = max(1, int(threads))
    # ITK copies bundled in antspyx and itk read the variable when their thread pool starts.
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    return threads
