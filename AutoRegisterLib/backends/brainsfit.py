"""BRAINSFit backend: rigid, affine and B-spline through a BRAINSFit executable.

The executable is ``params.executable`` (inside Slicer, the path of its BRAINSFit CLI module), else
the environment variable AUTOREGISTER_BRAINSFIT, else ``BRAINSFit`` on PATH. It runs as a subprocess
with an argument list (never a shell), in the worker's process group (so a timeout or Cancel kills it
with the worker), and without ITK_AUTOLOAD_PATH (ITK loads every plugin on it, and plugins built for
another ITK can crash it; Slicer clears it for its CLIs too). A 2D pair makes its presets `unavailable`:
BRAINSFit reads a 2D image as a one-slice volume and estimates a 3D transform.

BRAINSFit writes its result as an ITK transform file in ITK's resampling convention (fixed points ->
moving points, LPS), read back with SimpleITK: linear results become an AffineTransform; a B-spline run
writes a composite (the affine bulk transform, then the B-spline applied first), sampled on the fixed
grid as a DisplacementFieldTransform.

Masks are written beside the images as uint8 files and passed as ``--fixedBinaryVolume`` /
``--movingBinaryVolume`` with ``--maskProcessingMode ROI``; either one alone is accepted (BRAINSFit.cxx: ROI
needs at least one). They replace the preset's ``mask_processing_mode``: BRAINSFit refuses mask files with
NOMASK or ROIAUTO. The moving mask goes to the metric; with a fixed mask BRAINSFit draws its samples
(``sampling_percentage`` of all fixed voxels) inside it, so a mask smaller than that gives all of its voxels
(BRAINSFitHelper.h, SetupRegistration). ``useMomentsAlign`` uses the whole images.

Params (all optional; names follow BRAINSFit's options):

- ``initialize_transform_mode``: ``useMomentsAlign``, ``useGeometryAlign``, ``useCenterOfHeadAlign``
  or ``Off`` (default useMomentsAlign)
- ``cost_metric``: ``MMI``, ``MSE``, ``NC`` or ``MIH`` (default MMI)
- ``histogram_bins``: bins of the MI metric (default 50)
- ``sampling_percentage``: fraction of voxels sampled (default 0.05)
- ``iterations``: maximum iterations per transform stage (default 1500)
- ``spline_grid_size``: B-spline control points per axis, x,y,z (default [8, 8, 8])
- ``mask_processing_mode``: ``NOMASK`` or ``ROIAUTO`` (Otsu head masks on both images) (default NOMASK)
- ``transform_chain``: BRAINSFit's ``--transformType`` list, "" = the preset type's default chain
  (rigid: Rigid; affine: Rigid,ScaleVersor3D,ScaleSkewVersor3D,Affine; deformable: that, then BSpline)
- ``executable``: path of the BRAINSFit executable ("" = $AUTOREGISTER_BRAINSFIT or PATH)
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable, InputError
from ..image import Image, write_image
from ..transforms import as_affine, dense_field
from . import base
from .base import Backend, Preset, binary_mask, check_params, set_threads

DEFAULTS = {
    "initialize_transform_mode": "useMomentsAlign",
    "cost_metric": "MMI",
    "histogram_bins": 50,
    "sampling_percentage": 0.05,
    "iterations": 1500,
    "spline_grid_size": [8, 8, 8],
    "mask_processing_mode": "NOMASK",
    "transform_chain": "",
    "executable": "",
}
CHOICES = {
    "initialize_transform_mode": ("useMomentsAlign", "useGeometryAlign", "useCenterOfHeadAlign", "Off"),
    "cost_metric": ("MMI", "MSE", "NC", "MIH"),
    "mask_processing_mode": ("NOMASK", "ROIAUTO"),
}
# BRAINSFit refines through a chain of transform types; each starts from the previous one.
TRANSFORM_CHAIN = {
    "rigid": "Rigid",
    "affine": "Rigid,ScaleVersor3D,ScaleSkewVersor3D,Affine",
    "deformable": "Rigid,ScaleVersor3D,ScaleSkewVersor3D,Affine,BSpline",
}
LINEAR_STAGES = ("Rigid", "ScaleVersor3D", "ScaleSkewVersor3D", "Affine")
ENV_EXECUTABLE = "AUTOREGISTER_BRAINSFIT"
#: Variables removed from BRAINSFit's environment: ITK loads every plugin on this path at start-up.
CLEARED_ENV = ("ITK_AUTOLOAD_PATH",)
_PROBED: dict = {}  # (path, mtime, size) -> "" when it runs, else why it cannot


def find_executable(explicit: str = "") -> str | None:
    """The BRAINSFit executable to use: explicit path, $AUTOREGISTER_BRAINSFIT, `BRAINSFit` on PATH, or None."""
    return base.find_executable(explicit, ENV_EXECUTABLE, "BRAINSFit")


def tool_environment(threads: int) -> dict:
    """The environment BRAINSFit runs with: ours without ITK_AUTOLOAD_PATH, its thread count set."""
    env = {k: v for k, v in os.environ.items() if k not in CLEARED_ENV}
    env["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(max(1, int(threads)))
    return env


def probe(exe: str) -> str:
    """Why `exe` cannot run (``--version`` fails or hangs), or "" when it runs; cached per file version."""
    path = Path(exe)
    if not (path.is_file() and os.access(path, os.X_OK)):
        return f"BRAINSFit executable {exe} does not exist or is not executable"
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _PROBED:
        try:
            proc = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30,
                                  env=tool_environment(1), stdin=subprocess.DEVNULL)
            ok = proc.returncode == 0
            detail = _tail(proc.stdout + proc.stderr, 2) if not ok else ""
            _PROBED[key] = "" if ok else (f"BRAINSFit at {exe} cannot run ({exit_reason(proc.returncode)}): "
                                          f"{detail}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            _PROBED[key] = f"BRAINSFit at {exe} cannot run: {exc}"
    return _PROBED[key]


def exit_reason(code: int) -> str:
    """'exit code N', or the signal that killed the process ('killed by SIGSEGV')."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _tail(text: str, n: int) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-n:] if line.strip())


class BrainsFitBackend(Backend):
    """Registration with the BRAINSFit command-line tool."""

    name = "brainsfit"

    def __init__(self, executable: str = ""):
        """`executable` overrides $AUTOREGISTER_BRAINSFIT and PATH (the Slicer module passes its CLI's path)."""
        self.executable = executable

    def check_available(self) -> None:
        """Raise BackendUnavailable unless a BRAINSFit executable is found and starts (`--version`)."""
        exe = find_executable(self.executable)
        if not exe:
            raise BackendUnavailable(f"BRAINSFit executable not found on PATH (set {ENV_EXECUTABLE} to its path, "
                                     "or run inside 3D Slicer)")
        reason = probe(exe)
        if reason:
            raise BackendUnavailable(reason)

    def validate(self, preset: Preset) -> dict:
        """Return the preset's params merged with the defaults, or raise InputError naming the field."""
        params = check_params(preset, DEFAULTS, CHOICES)
        if len(params["spline_grid_size"]) != 3 or min(params["spline_grid_size"]) < 3:
            raise InputError(f"preset {preset.name!r}: params.spline_grid_size needs 3 values of at least 3")
        if not 0 < params["sampling_percentage"] <= 1:
            raise InputError(f"preset {preset.name!r}: params.sampling_percentage must be in (0, 1]")
        if params["histogram_bins"] < 2 or params["iterations"] < 1:
            raise InputError(f"preset {preset.name!r}: params.histogram_bins must be >= 2 and "
                             "params.iterations >= 1")
        chain = self.chain(preset, params)
        stages = chain.split(",")
        allowed = LINEAR_STAGES + (("BSpline",) if preset.transform_type == "deformable" else ())
        bad = [s for s in stages if s not in allowed]
        last_ok = (stages[-1] == "BSpline") if preset.transform_type == "deformable" else (
            stages[-1] == "Rigid" if preset.transform_type == "rigid" else stages[-1] != "Rigid")
        if bad or not last_ok:
            raise InputError(f"preset {preset.name!r}: params.transform_chain {chain!r} does not give a "
                             f"{preset.transform_type} transform (stages: {', '.join(allowed)})")
        return params

    @staticmethod
    def chain(preset: Preset, params: dict) -> str:
        """BRAINSFit's --transformType for a preset: its own chain, or the default of its transform type."""
        return params["transform_chain"] or TRANSFORM_CHAIN[preset.transform_type]

    def command(self, preset: Preset, exe: str, fixed_path: Path, moving_path: Path, transform_path: Path,
                threads: int, fixed_mask_path: Path | None = None, moving_mask_path: Path | None = None) -> list:
        """The BRAINSFit argument list for a preset (no shell: every argument is one list item)."""
        params = self.validate(preset)
        masks = [(option, path) for option, path in (("--fixedBinaryVolume", fixed_mask_path),
                                                     ("--movingBinaryVolume", moving_mask_path)) if path is not None]
        cmd = [
            exe,
            "--fixedVolume", str(fixed_path),
            "--movingVolume", str(moving_path),
            "--outputTransform", str(transform_path),
            "--transformType", self.chain(preset, params),
            "--initializeTransformMode", params["initialize_transform_mode"],
            "--costMetric", params["cost_metric"],
            "--numberOfHistogramBins", str(params["histogram_bins"]),
            "--samplingPercentage", repr(float(params["sampling_percentage"])),
            "--numberOfIterations", str(params["iterations"]),
            "--maskProcessingMode", "ROI" if masks else params["mask_processing_mode"],
            "--interpolationMode", "Linear",
            "--numberOfThreads", str(max(1, int(threads))),
        ]
        for option, path in masks:
            cmd += [option, str(path)]
        if preset.transform_type == "deformable":
            cmd += ["--splineGridSize", ",".join(str(n) for n in params["spline_grid_size"])]
        return cmd

    def estimate(self, preset: Preset, fixed: Image, moving: Image, workdir: Path, threads: int,
                 fixed_mask: Image | None = None, moving_mask: Image | None = None):
        """Run BRAINSFit on files in `workdir` (masks too, when given) and read its output transform."""
        params = self.validate(preset)
        fixed_mask = binary_mask(fixed_mask, fixed, "fixed mask")
        moving_mask = binary_mask(moving_mask, moving, "moving mask")
        if fixed.dimension != 3 or moving.dimension != 3:
            raise BackendUnavailable(f"BRAINSFit registers 3D images only; these are {fixed.dimension}D")
        threads = set_threads(threads)
        exe = find_executable(params["executable"] or self.executable)
        if not exe:
            self.check_available()  # raises, naming where BRAINSFit was looked for
        reason = probe(exe)
        if reason:
            raise BackendUnavailable(reason)
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        # MetaImage keeps the direction cosines in double precision (oblique inputs) and needs no compression.
        fixed_path, moving_path = workdir / "fixed.mha", workdir / "moving.mha"
        transform_path = workdir / "brainsfit_transform.h5"
        write_image(fixed.astype(np.float32), fixed_path, compress=False)
        write_image(moving.astype(np.float32), moving_path, compress=False)
        mask_paths = {}
        for key, mask, path in (("fixed_mask_path", fixed_mask, workdir / "fixed_mask.mha"),
                                ("moving_mask_path", moving_mask, workdir / "moving_mask.mha")):
            if mask is not None:
                write_image(mask, path, compress=False)
                mask_paths[key] = path
        cmd = self.command(preset, exe, fixed_path, moving_path, transform_path, threads, **mask_paths)
        log_path = workdir / "brainsfit.log"
        with open(log_path, "w", encoding="utf-8", errors="replace") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir,
                                  env=tool_environment(threads)).returncode
        if code != 0:
            text = log_path.read_text(encoding="utf-8", errors="replace")
            raise RuntimeError(f"BRAINSFit failed ({exit_reason(code)}): {_tail(text, 3) or 'no output'}")
        if not transform_path.exists():
            raise RuntimeError(f"BRAINSFit wrote no transform to {transform_path}")
        return read_output(transform_path, preset.transform_type, fixed)


def read_output(path: Path, transform_type: str, fixed: Image):
    """BRAINSFit's transform file as the backend returns it: an AffineTransform, or the field on the fixed grid."""
    import SimpleITK as sitk

    transform = sitk.ReadTransform(str(path))
    if transform_type == "deformable":
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
