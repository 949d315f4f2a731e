"""BRAINSFit backend: rigid, affine and B-spline through a BRAINSFit executable.

The executable is ``params.executable`` (inside Slicer, the path of its BRAINSFit CLI module), else
the environment variable AUTOREGISTER_BRAINSFIT, else ``BRAINSFit`` on PATH. It runs as a subprocess
with an argument list (never a shell). BRAINSFit writes its result as an ITK transform file in ITK's
resampling convention (fixed points -> moving points, LPS), read back with SimpleITK: linear results
become an AffineTransform, B-spline results are sampled on the fixed grid as a DisplacementFieldTransform.

Params (all optional; names follow BRAINSFit's options):

- ``initialize_transform_mode``: ``useMomentsAlign``, ``useGeometryAlign``, ``useCenterOfHeadAlign``
  or ``Off`` (default useMomentsAlign)
- ``cost_metric``: ``MMI``, ``MSE``, ``NC`` or ``MIH`` (default MMI)
- ``histogram_bins``: bins of the MI metric (default 50)
- ``sampling_percentage``: fraction of voxels sampled (default 0.05)
- ``iterations``: maximum iterations per transform stage (default 1500)
- ``spline_grid_size``: B-spline control points per axis, x,y,z (default [8, 8, 8])
- ``executable``: path of the BRAINSFit executable ("" = $AUTOREGISTER_BRAINSFIT or PATH)
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable, InputError
from ..image import Image, write_image
from .base import Backend, Preset, as_affine, check_params, dense_field, set_threads

DEFAULTS = {
    "initialize_transform_mode": "useMomentsAlign",
    "cost_metric": "MMI",
    "histogram_bins": 50,
    "sampling_percentage": 0.05,
    "iterations": 1500,
    "spline_grid_size": [8, 8, 8],
    "executable": "",
}
CHOICES = {
    "initialize_transform_mode": ("useMomentsAlign", "useGeometryAlign", "useCenterOfHeadAlign", "Off"),
    "cost_metric": ("MMI", "MSE", "NC", "MIH"),
}
# BRAINSFit refines through a chain of transform types; each starts from the previous one.
TRANSFORM_CHAIN = {
    "rigid": "Rigid",
    "affine": "Rigid,ScaleVersor3D,ScaleSkewVersor3D,Affine",
    "deformable": "Rigid,ScaleVersor3D,ScaleSkewVersor3D,Affine,BSpline",
}
ENV_EXECUTABLE = "AUTOREGISTER_BRAINSFIT"


def find_executable(explicit: str = "") -> str | None:
    """The BRAINSFit executable to use: explicit path, $AUTOREGISTER_BRAINSFIT, `BRAINSFit` on PATH, or None."""
    for candidate in (explicit, os.environ.get(ENV_EXECUTABLE, "")):
        if candidate:
            return candidate
    return shutil.which("BRAINSFit")


class BrainsFitBackend(Backend):
    """Registration with the BRAINSFit command-line tool."""

    name = "brainsfit"

    def __init__(self, executable: str = ""):
        """`executable` overrides $AUTOREGISTER_BRAINSFIT and PATH (the Slicer module passes its CLI's path)."""
        self.executable = executable

    def check_available(self) -> None:
        """Raise BackendUnavailable unless a runnable BRAINSFit executable is found."""
        exe = find_executable(self.executable)
        if not exe:
            raise BackendUnavailable(f"BRAINSFit executable not found on PATH (set {ENV_EXECUTABLE} to its path, "
                                     "or run inside 3D Slicer)")
        if not (Path(exe).is_file() and os.access(exe, os.X_OK)):
            raise BackendUnavailable(f"BRAINSFit executable {exe} does not exist or is not executable")

    def validate(self, preset: Preset) -> dict:
        """Return the preset's params merged with the defaults, or raise InputError naming the field."""
        params = check_params(preset, DEFAULTS, CHOICES)
        if len(params["spline_grid_size"]) != 3 or min(params["spline_grid_size"]) < 3:
            raise InputError(f"preset {preset.name!r}: params.spline_grid_size needs 3 values of at least 3")
        if not 0 < params["sampling_percentage"] <= 1:
            raise InputError(f"preset {preset.name!r}: params.sampling_percentage must be in (0, 1]")
        return params

    def command(self, preset: Preset, exe: str, fixed_path: Path, moving_path: Path, transform_path: Path,
                threads: int) -> list:
        """The BRAINSFit argument list for a preset (no shell: every argument is one list item)."""
        params = self.validate(preset)
        cmd = [
            exe,
            "--fixedVolume", str(fixed_path),
            "--movingVolume", str(moving_path),
            "--outputTransform", str(transform_path),
            "--transformType", TRANSFORM_CHAIN[preset.transform_type],
            "--initializeTransformMode", params["initialize_transform_mode"],
            "--costMetric", params["cost_metric"],
            "--numberOfHistogramBins", str(params["histogram_bins"]),
            "--samplingPercentage", repr(float(params["sampling_percentage"])),
            "--numberOfIterations", str(params["iterations"]),
            "--interpolationMode", "Linear",
            "--numberOfThreads", str(max(1, int(threads))),
        ]
        if preset.transform_type == "deformable":
            cmd += ["--splineGridSize", ",".join(str(n) for n in params["spline_grid_size"])]
        return cmd

    def estimate(self, preset: Preset, fixed: Image, moving: Image, workdir: Path, threads: int):
        """Run BRAINSFit on files in `workdir` and read its output transform."""
        import SimpleITK as sitk

        params = self.validate(preset)
        if fixed.dimension != 3 or moving.dimension != 3:
            raise InputError("BRAINSFit registers 3D images only")
        threads = set_threads(threads)
        exe = find_executable(params["executable"] or self.executable)
        if not exe:
            self.check_available()
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        fixed_path, moving_path = workdir / "fixed.nii.gz", workdir / "moving.nii.gz"
        transform_path = workdir / "brainsfit_transform.h5"
        write_image(fixed.astype(np.float32), fixed_path)
        write_image(moving.astype(np.float32), moving_path)
        cmd = self.command(preset, exe, fixed_path, moving_path, transform_path, threads)
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            raise RuntimeError(f"BRAINSFit failed with exit code {proc.returncode}: {' | '.join(tail)}")
        if not transform_path.exists():
            raise RuntimeError(f"BRAINSFit wrote no transform to {transform_path}")
        transform = sitk.ReadTransform(str(transform_path))
        if preset.transform_type == "deformable":
            return dense_field(transform, fixed)
        return as_affine(_flatten(transform))


def _flatten(transform):
    """A composite of one transform is that transform; otherwise keep the composite (as_affine samples it)."""
    import SimpleITK as sitk

    if transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        if composite.GetNumberOfTransforms() == 1:
            return composite.GetNthTransform(0).Downcast()
        return composite
    return transform.Downcast()
