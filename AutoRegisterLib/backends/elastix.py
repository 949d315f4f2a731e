"""Elastix backend: rigid, affine and affine -> B-spline, through itk-elastix or an elastix executable.

The executable is used when ``params.executable`` or the environment variable AUTOREGISTER_ELASTIX
names one, or when ``elastix`` is on PATH (SlicerElastix ships one; transformix is expected next to
it); otherwise itk-elastix runs in-process. Both paths run the same parameter maps.

Transform convention: elastix maps fixed points to moving points in physical (LPS) space. Rather than
re-implement elastix's chain composition and angle conventions, the whole chain is sampled by
transformix as a deformation field on the fixed grid: deformable presets return that field as a
DisplacementFieldTransform, linear presets fit an AffineTransform to it (exact for a linear chain; the
fit residual is checked).

Masks go to elastix as its fixed and moving masks (itk-elastix: ``fixed_mask`` / ``moving_mask``, uint8 ITK
images; the executable: ``-fMask`` / ``-mMask`` files), for every stage, with ``ErodeMask "false"``: elastix
erodes masks by default at each pyramid level (elxRegistrationBase.hxx, ReadMaskParameters), which its own
parameter-file notes advise against for a region-of-interest mask and which can erase a small mask at the
coarse levels. The random sampler draws its samples inside the fixed mask (itkImageRandomCoordinateSampler:
it rejects points outside it, within the mask's bounding box), so the sample count stays as set; a sample whose
moving point falls outside the moving mask is invalid, and elastix fails when fewer than a quarter of them are
valid (``RequiredRatioOfValidSamples``). The centre-of-gravity initialisation uses the whole images.

Params (all optional):

- ``stages``: transforms run in sequence, each starting from the previous one; from ``rigid``,
  ``affine``, ``bspline`` (defaults: rigid ["rigid"], affine ["rigid", "affine"], deformable
  ["affine", "bspline"]); the last stage must give the preset's transform_type.
- ``initialization``: ``moments`` (centres of gravity) or ``geometry`` (image centres) (default moments)
- ``metric``: ``AdvancedMattesMutualInformation`` or ``AdvancedNormalizedCorrelation`` (default MI)
- ``histogram_bins``: MI bins (default 32)
- ``linear_resolutions`` / ``linear_iterations`` / ``linear_samples``: per linear stage (default 3 / 250 / 2000)
- ``bspline_resolutions`` / ``bspline_iterations`` / ``bspline_samples``: for the B-spline stage
  (default 2 / 200 / 3000)
- ``grid_spacing_mm``: final B-spline control-point spacing (default 40: on 2 mm T2->T1 heads finer
  grids fitted contrast differences, 16 mm gave 1.8 mm error against 1.3 mm at 40 mm)
- ``bending_energy_weight``: weight of a bending-energy penalty against folding; 0 turns it off
  (default 0: it made the B-spline stage about 5x slower for no gain at a 40 mm grid)
- ``random_seed``: seed of the random sampler (default 17)
- ``default_maps``: run elastix's own default parameter maps for the stages (``GetDefaultParameterMap``:
  what SlicerElastix's generic preset and a user by hand get; the fields above but ``stages`` are then
  unused); needs itk-elastix to read them (default false)
- ``executable``: path of an elastix executable ("" = environment / PATH / itk-elastix)
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable, InputError
from ..image import Image, to_itk, write_image
from ..transforms import affine_from_field, field_transform_from_image
from . import base
from .base import Backend, Preset, binary_mask, check_params, set_threads

DEFAULTS = {
    "stages": ["rigid"],
    "initialization": "moments",
    "metric": "AdvancedMattesMutualInformation",
    "histogram_bins": 32,
    "linear_resolutions": 3,
    "linear_iterations": 250,
    "linear_samples": 2000,
    "bspline_resolutions": 2,
    "bspline_iterations": 200,
    "bspline_samples": 3000,
    "grid_spacing_mm": 40.0,
    "bending_energy_weight": 0.0,
    "random_seed": 17,
    "default_maps": False,
    "executable": "",
}
CHOICES = {
    "initialization": ("moments", "geometry"),
    "metric": ("AdvancedMattesMutualInformation", "AdvancedNormalizedCorrelation"),
}
DEFAULT_STAGES = {"rigid": ["rigid"], "affine": ["rigid", "affine"], "deformable": ["affine", "bspline"]}
STAGE_TYPE = {"rigid": "rigid", "affine": "affine", "bspline": "deformable"}
ELASTIX_TRANSFORM = {"rigid": "EulerTransform", "affine": "AffineTransform", "bspline": "BSplineTransform"}
ENV_EXECUTABLE = "AUTOREGISTER_ELASTIX"


def find_executable(explicit: str = "") -> str | None:
    """The elastix executable to use: explicit path, $AUTOREGISTER_ELASTIX, `elastix` on PATH, or None."""
    return base.find_executable(explicit, ENV_EXECUTABLE, "elastix")


def itk_elastix_installed() -> bool:
    """True when itk-elastix's wrapping is installed; checked on disk, as loading it takes about 8 s."""
    import importlib.util

    spec = importlib.util.find_spec("itk")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any((Path(p) / "ElastixPython.py").exists() for p in spec.submodule_search_locations)


class ElastixBackend(Backend):
    """Registration with elastix (itk-elastix in-process, or an elastix executable)."""

    name = "elastix"

    def check_available(self) -> None:
        """Raise BackendUnavailable when neither an elastix executable nor itk-elastix is usable."""
        exe = find_executable()
        if exe:
            if not (Path(exe).is_file() and os.access(exe, os.X_OK)):
                raise BackendUnavailable(f"elastix executable {exe} does not exist or is not executable")
            return
        if not itk_elastix_installed():
            raise BackendUnavailable("neither an elastix executable (PATH or $AUTOREGISTER_ELASTIX) nor "
                                     "itk-elastix is available; pip install itk-elastix")

    def validate(self, preset: Preset) -> dict:
        """Return the preset's params merged with the defaults, or raise InputError naming the field."""
        defaults = dict(DEFAULTS, stages=DEFAULT_STAGES.get(preset.transform_type, ["rigid"]))
        params = check_params(preset, defaults, CHOICES)
        where = f"preset {preset.name!r}: params.stages"
        bad = [s for s in params["stages"] if s not in STAGE_TYPE]
        if bad:
            raise InputError(f"{where} has unknown stages {bad} (use rigid, affine, bspline)")
        if STAGE_TYPE[params["stages"][-1]] != preset.transform_type:
            raise InputError(f"{where} ends with {params['stages'][-1]!r}, which does not give a "
                             f"{preset.transform_type} transform")
        for key in ("linear_resolutions", "linear_iterations", "linear_samples", "bspline_resolutions",
                    "bspline_iterations", "bspline_samples", "histogram_bins"):
            if params[key] < 1:
                raise InputError(f"preset {preset.name!r}: params.{key} must be at least 1")
        if params["grid_spacing_mm"] <= 0 or params["bending_energy_weight"] < 0:
            raise InputError(f"preset {preset.name!r}: params.grid_spacing_mm must be > 0 and "
                             "params.bending_energy_weight >= 0")
        return params

    def estimate(self, preset: Preset, fixed: Image, moving: Image, workdir: Path, threads: int,
                 fixed_mask: Image | None = None, moving_mask: Image | None = None):
        """Run the stage chain, masked when given, and return it sampled on the fixed grid as a SimpleITK transform."""
        params = self.validate(preset)
        threads = set_threads(threads)
        masks = (binary_mask(fixed_mask, fixed, "fixed mask"), binary_mask(moving_mask, moving, "moving mask"))
        maps = ([default_parameter_map(stage) for stage in params["stages"]] if params["default_maps"]
                else [parameter_map(stage, params, fixed.dimension) for stage in params["stages"]])
        if any(mask is not None for mask in masks):
            for m in maps:
                m["ErodeMask"] = ["false"]
        workdir = Path(workdir)
        exe = find_executable(params["executable"])
        if exe:
            field = _run_executable(exe, maps, fixed, moving, workdir, threads, *masks)
        else:
            field = _run_itk(maps, fixed, moving, workdir, threads, *masks)
        if preset.transform_type == "deformable":
            return field_transform_from_image(field)
        return affine_from_field(field)


def parameter_map(stage: str, params: dict, dim: int) -> dict:
    """Elastix parameter map (name -> list of strings) for one stage."""
    bspline = stage == "bspline"
    resolutions = params["bspline_resolutions"] if bspline else params["linear_resolutions"]
    m = {
        "FixedImageDimension": [str(dim)], "MovingImageDimension": [str(dim)],
        "FixedInternalImagePixelType": ["float"], "MovingInternalImagePixelType": ["float"],
        "Registration": ["MultiResolutionRegistration"],
        "FixedImagePyramid": ["FixedSmoothingImagePyramid"], "MovingImagePyramid": ["MovingSmoothingImagePyramid"],
        "Interpolator": ["LinearInterpolator"], "ResampleInterpolator": ["FinalLinearInterpolator"],
        "Resampler": ["DefaultResampler"], "Optimizer": ["AdaptiveStochasticGradientDescent"],
        "AutomaticParameterEstimation": ["true"],
        "Transform": [ELASTIX_TRANSFORM[stage]],
        "Metric": [params["metric"]],
        "NumberOfHistogramBins": [str(params["histogram_bins"])],
        "NumberOfResolutions": [str(resolutions)],
        "MaximumNumberOfIterations": [str(params["bspline_iterations"] if bspline else params["linear_iterations"])],
        "ImageSampler": ["RandomCoordinate"], "NewSamplesEveryIteration": ["true"],
        "NumberOfSpatialSamples": [str(params["bspline_samples"] if bspline else params["linear_samples"])],
        "RandomSeed": [str(params["random_seed"])],
        "HowToCombineTransforms": ["Compose"],
        "DefaultPixelValue": ["0"], "WriteResultImage": ["false"], "ResultImageFormat": ["mha"],
        "WriteIterationInfo": ["false"],
    }
    if bspline:
        m["FinalGridSpacingInPhysicalUnits"] = [repr(float(params["grid_spacing_mm"]))]
        # Coarse grid first: each resolution halves the control-point spacing.
        m["GridSpacingSchedule"] = [str(2 ** (resolutions - 1 - r)) for r in range(resolutions)]
        # The default ("Original") step-size estimation cost several seconds per resolution here.
        m["ASGDParameterEstimationMethod"] = ["DisplacementDistribution"]
        if params["bending_energy_weight"] > 0:
            m["Registration"] = ["MultiMetricMultiResolutionRegistration"]
            m["Metric"] = [params["metric"], "TransformBendingEnergyPenalty"]
            m["Metric0Weight"] = ["1.0"]
            m["Metric1Weight"] = [repr(float(params["bending_energy_weight"]))]
    else:
        m["AutomaticTransformInitialization"] = ["true"]
        m["AutomaticTransformInitializationMethod"] = [
            "CenterOfGravity" if params["initialization"] == "moments" else "GeometricalCenter"]
        m["AutomaticScalesEstimation"] = ["true"]
    return m


def default_parameter_map(stage: str) -> dict:
    """Elastix's own default map for a stage (rigid, affine, bspline), with no result image written."""
    if not itk_elastix_installed():
        raise BackendUnavailable("params.default_maps needs itk-elastix to read elastix's default maps")
    import itk

    m = itk.ParameterObject.New().GetDefaultParameterMap(stage)
    out = {key: list(m[key]) for key in m.keys()}
    out.update(WriteResultImage=["false"], ResultImageFormat=["mha"])
    return out


def _run_itk(maps: list, fixed: Image, moving: Image, workdir: Path, threads: int,
             fixed_mask: Image | None = None, moving_mask: Image | None = None):
    """Run itk-elastix in-process; return the chain's deformation field as a SimpleITK image."""
    import itk

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    po = itk.ParameterObject.New()
    for m in maps:
        po.AddParameterMap(m)
    f = to_itk(fixed.astype(np.float32))
    mv = to_itk(moving.astype(np.float32))
    # uint8 arrays become itk.Image[UC], the mask type elastix takes.
    masks = {key: to_itk(mask) for key, mask in (("fixed_mask", fixed_mask), ("moving_mask", moving_mask))
             if mask is not None}
    # number_of_threads is deliberately not passed: itk-elastix crashes with it on B-spline chains.
    _, result = itk.elastix_registration_method(f, mv, parameter_object=po, log_to_console=False, **masks)
    # Without an output directory transformix writes deformationField.mha into the current directory.
    workdir.mkdir(parents=True, exist_ok=True)
    field = itk.transformix_deformation_field(mv, result, output_directory=str(workdir))
    return _itk_field_to_sitk(field)


def _itk_field_to_sitk(field):
    import itk
    import SimpleITK as sitk

    arr = np.asarray(itk.array_view_from_image(field), dtype=np.float64)
    out = sitk.GetImageFromArray(arr, isVector=True)
    out.SetSpacing(tuple(field.GetSpacing()))
    out.SetOrigin(tuple(field.GetOrigin()))
    out.SetDirection(tuple(np.asarray(itk.array_from_matrix(field.GetDirection())).ravel()))
    return out


def write_parameter_file(m: dict, path: Path) -> None:
    """Write a parameter map in elastix's text format."""
    lines = []
    for key, values in m.items():
        quoted = [v if _is_number(v) else f'"{v}"' for v in values]
        lines.append(f"({key} {' '.join(quoted)})")
    Path(path).write_text("\n".join(lines) + "\n")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _run_executable(exe: str, maps: list, fixed: Image, moving: Image, workdir: Path, threads: int,
                    fixed_mask: Image | None = None, moving_mask: Image | None = None):
    """Run the elastix and transformix executables with argument lists; return the deformation field."""
    import SimpleITK as sitk

    workdir.mkdir(parents=True, exist_ok=True)
    fixed_path, moving_path = workdir / "fixed.mha", workdir / "moving.mha"
    write_image(fixed.astype(np.float32), fixed_path, compress=False)
    write_image(moving.astype(np.float32), moving_path, compress=False)
    cmd = [exe, "-f", str(fixed_path), "-m", str(moving_path), "-out", str(workdir), "-threads", str(threads)]
    for option, mask, name in (("-fMask", fixed_mask, "fixed_mask.mha"), ("-mMask", moving_mask, "moving_mask.mha")):
        if mask is not None:
            write_image(mask, workdir / name, compress=False)
            cmd += [option, str(workdir / name)]
    for i, m in enumerate(maps):
        p = workdir / f"params.{i}.txt"
        write_parameter_file(m, p)
        cmd += ["-p", str(p)]
    _call(cmd, "elastix")
    transformix = _transformix_next_to(exe)
    tdir = workdir / "transformix"
    tdir.mkdir(exist_ok=True)
    last = workdir / f"TransformParameters.{len(maps) - 1}.txt"
    _call([transformix, "-def", "all", "-tp", str(last), "-out", str(tdir), "-threads", str(threads)], "transformix")
    fields = sorted(tdir.glob("deformationField.*"))
    if not fields:
        raise RuntimeError(f"transformix wrote no deformation field into {tdir}")
    return sitk.ReadImage(str(fields[0]))


def _transformix_next_to(exe: str) -> str:
    name = "transformix.exe" if exe.lower().endswith(".exe") else "transformix"
    sibling = Path(exe).with_name(name)
    if sibling.exists():
        return str(sibling)
    found = shutil.which("transformix")
    if not found:
        raise BackendUnavailable(f"no transformix next to {exe} or on PATH")
    return found


def _call(cmd: list, tool: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        raise RuntimeError(f"{tool} failed with exit code {proc.returncode}: {' | '.join(tail)}")
