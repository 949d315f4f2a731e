"""SimpleITK backend: rigid (Euler, Mattes MI) and affine registration; always available.

Linear registration here has three steps:

1. centre the images (``initialization``: ``moments`` = centres of mass, ``geometry`` = grid centres);
2. a coarse rotation search: every combination of rotations about the centre in steps of
   ``rotation_search_step_deg`` up to ±``rotation_search_deg`` is scored on a coarse copy of the
   images and the best start is kept (centre initialisation alone failed at 20–25°);
3. multi-resolution regular-step gradient descent on Mattes MI, rigid first, then affine for the
   affine preset.

Masks (`SetMetricFixedMask` / `SetMetricMovingMask`) restrict the metric of both the rotation search and the
optimisation; they are evaluated in physical space, so the full-resolution masks serve the coarse search
images and every shrink level alike. The centring of step 1 uses the whole images (moments of the intensities).
With a fixed mask the random samples outside it are dropped, so a small mask gets fewer samples.

Params (all optional):

- ``initialization``: ``"moments"`` or ``"geometry"`` (default ``"moments"``)
- ``rotation_search_deg``: half-range of the coarse search, degrees; 0 turns it off (default 30)
- ``rotation_search_step_deg``: step of that search, degrees (default 15)
- ``search_spacing_mm``: voxel size of the images the search scores (default 8)
- ``histogram_bins``: Mattes MI bins (default 32)
- ``sampling_percentage``: fraction of voxels sampled at random per iteration (default 0.25)
- ``shrink_factors`` / ``smoothing_sigmas_vox``: one entry per resolution level (default [4, 2, 1] / [2, 1, 0])
- ``iterations``: maximum iterations per level (default 200)
- ``learning_rate``: initial step, in mm of the largest voxel shift (default 2.0)
- ``random_seed``: sampling seed, for reproducible results (default 17)
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..image import Image, to_sitk
from ..transforms import as_affine
from .base import Backend, Preset, binary_mask, check_params, same_length, set_threads

DEFAULTS = {
    "initialization": "moments",
    "rotation_search_deg": 30.0,
    "rotation_search_step_deg": 15.0,
    "search_spacing_mm": 8.0,
    "histogram_bins": 32,
    "sampling_percentage": 0.25,
    "shrink_factors": [4, 2, 1],
    "smoothing_sigmas_vox": [2.0, 1.0, 0.0],
    "iterations": 200,
    "learning_rate": 2.0,
    "random_seed": 17,
}
CHOICES = {"initialization": ("moments", "geometry")}


class SimpleITKBackend(Backend):
    """Rigid and affine registration with SimpleITK's ImageRegistrationMethod."""

    name = "sitk"

    def check_available(self) -> None:
        """SimpleITK is a core dependency, so this backend is always available."""

    def validate(self, preset: Preset) -> dict:
        """Return the preset's params merged with the defaults, or raise InputError naming the field."""
        params = check_params(preset, DEFAULTS, CHOICES)
        if preset.transform_type == "deformable":
            raise InputError(f"preset {preset.name!r}: the sitk backend only does rigid and affine")
        same_length(preset, params, "shrink_factors", "smoothing_sigmas_vox")
        if not 0 < params["sampling_percentage"] <= 1:
            raise InputError(f"preset {preset.name!r}: params.sampling_percentage must be in (0, 1]")
        return params

    def estimate(self, preset: Preset, fixed: Image, moving: Image, workdir: Path, threads: int,
                 fixed_mask: Image | None = None, moving_mask: Image | None = None):
        """Centre, search rotations coarsely, then optimise rigid (and affine) Mattes MI, within the masks."""
        import SimpleITK as sitk

        params = self.validate(preset)
        set_threads(threads)
        f = to_sitk(fixed, np.float32)
        m = to_sitk(moving, np.float32)
        masks = {key: to_sitk(mask) for key, mask in (("fixed", binary_mask(fixed_mask, fixed, "fixed mask")),
                                                      ("moving", binary_mask(moving_mask, moving, "moving mask")))
                 if mask is not None}
        dim = fixed.dimension
        rigid = sitk.Euler3DTransform() if dim == 3 else sitk.Euler2DTransform()
        mode = (sitk.CenteredTransformInitializerFilter.MOMENTS if params["initialization"] == "moments"
                else sitk.CenteredTransformInitializerFilter.GEOMETRY)
        rigid = sitk.CenteredTransformInitializer(f, m, rigid, mode)
        if params["rotation_search_deg"] > 0:
            rigid = _rotation_search(f, m, rigid, params, masks)
        rigid = _optimise(f, m, rigid, params, masks)
        if preset.transform_type == "rigid":
            return as_affine(rigid)
        affine = as_affine(rigid)
        return as_affine(_optimise(f, m, affine, params, masks))


def _method(params: dict, masks: dict):
    """Mattes MI with linear interpolation, its metric limited to the masks ("fixed", "moving": SimpleITK images)."""
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=params["histogram_bins"])
    reg.SetInterpolator(sitk.sitkLinear)
    if "fixed" in masks:
        reg.SetMetricFixedMask(masks["fixed"])
    if "moving" in masks:
        reg.SetMetricMovingMask(masks["moving"])
    return reg


def _coarse(image, spacing_mm: float):
    """Smooth and resample to a coarse isotropic grid, for cheap metric evaluations."""
    import SimpleITK as sitk

    spacing = [max(s, spacing_mm) for s in image.GetSpacing()]
    size = [max(4, int(round(n * s / c))) for n, s, c in zip(image.GetSize(), image.GetSpacing(), spacing)]
    smoothed = sitk.SmoothingRecursiveGaussian(image, 0.5 * spacing_mm)
    return sitk.Resample(smoothed, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(), spacing,
                         image.GetDirection(), 0.0, sitk.sitkFloat32)


def _rotation_search(fixed, moving, rigid, params: dict, masks: dict):
    """Try a grid of rotations about the centre; return the start with the lowest MI (rigid transform)."""
    f = _coarse(fixed, params["search_spacing_mm"])
    m = _coarse(moving, params["search_spacing_mm"])
    reg = _method(params, masks)
    half = np.deg2rad(params["rotation_search_deg"])
    step = np.deg2rad(params["rotation_search_step_deg"])
    angles = np.arange(-half, half + 1e-9, step) if step > 0 else np.array([0.0])
    dim = fixed.GetDimension()
    base = np.array(rigid.GetParameters())
    n_angles = 3 if dim == 3 else 1
    best, best_value = base, np.inf
    for combo in itertools.product(angles, repeat=n_angles):
        trial = type(rigid)(rigid)
        p = base.copy()
        p[:n_angles] = combo
        trial.SetParameters(tuple(p))
        reg.SetInitialTransform(trial, inPlace=False)
        try:
            value = reg.MetricEvaluate(f, m)
        except RuntimeError:
            # Too few overlapping samples at this angle: not a candidate.
            continue
        if value < best_value:
            best, best_value = p, value
    out = type(rigid)(rigid)
    out.SetParameters(tuple(best))
    return out


def _optimise(fixed, moving, transform, params: dict, masks: dict):
    """Multi-resolution gradient descent on Mattes MI from `transform`; returns the optimised copy."""
    reg = _method(params, masks)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(params["sampling_percentage"], params["random_seed"])
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=params["learning_rate"], minStep=1e-3, numberOfIterations=params["iterations"],
        relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(params["shrink_factors"])
    reg.SetSmoothingSigmasPerLevel(params["smoothing_sigmas_vox"])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    start = type(transform)(transform)
    reg.SetInitialTransform(start, inPlace=True)
    reg.Execute(fixed, moving)
    return start
