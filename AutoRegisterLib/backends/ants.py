"""ANTs backend through antspyx: Rigid, Affine, SyN and its variants.

``ants.registration`` returns forward transforms in ITK's convention (fixed points -> moving points, LPS):
``[warp.nii.gz, affine.mat]`` for SyN-like transforms, ``[affine.mat]`` for linear ones. Linear results
are read with SimpleITK (it reads ANTs' .mat files) and returned as an AffineTransform; nonlinear chains
are composed by ANTs itself (``apply_transforms(..., compose=...)``) into one displacement field on the
fixed grid and returned as a DisplacementFieldTransform.

Params (all optional; names follow ``ants.registration``):

- ``type_of_transform``: ``Rigid``, ``Affine`` (linear presets) or ``SyN``, ``SyNRA``, ``SyNOnly``,
  ``ElasticSyN``, ``antsRegistrationSyNQuick[s]`` (deformable); default from the preset's transform_type. antspyx's default SyN
  optimises Mattes MI (``syn_metric``), not CC.
- ``aff_metric``: ``mattes``, ``GC`` or ``meansquares`` (default ``mattes``)
- ``aff_sampling``: histogram bins / radius of the linear metric (default 32)
- ``aff_random_sampling_rate``: fraction of voxels sampled by the linear metric (default 0.2)
- ``aff_iterations``, ``aff_shrink_factors``, ``aff_smoothing_sigmas``: one entry per level
  (defaults [2100, 1200, 1200, 10], [6, 4, 2, 1], [3, 2, 1, 0])
- ``syn_metric``: ``mattes``, ``CC``, ``meansquares`` or ``demons`` (default ``mattes``)
- ``syn_sampling``: bins (mattes) or radius (CC) of the SyN metric (default 32)
- ``reg_iterations``: SyN iterations per level, coarse to fine (default [40, 20, 0])
- ``grad_step``, ``flow_sigma``, ``total_sigma``: SyN step and regularisation (default 0.2, 3, 0)
- ``random_seed``: seed of ANTs' random sampling (default 17)

Masks go to ``ants.registration`` as ``mask`` (fixed) and ``moving_mask``, with ``mask_all_stages=True``:
antspyx otherwise gives the early stages of a chain (the affine stage before SyN) ``[NA,NA]`` and masks only
the last one (ants/registration/registration.py, ``earlymaskopt``), and antsRegistration then takes its one
``-x`` per stage as written (ANTs Examples/itkantsRegistrationHelper.hxx: one mask for all stages, or one per
stage). ANTs' initial centre-of-mass alignment (``-r [fixed,moving,1]``) uses the whole images.

Threads: ITK inside antspyx reads ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS when its thread pool starts,
so the count is honoured in a fresh worker process; later changes in the same process may be ignored.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable, InputError
from ..image import Image, to_ants
from ..transforms import as_affine, field_transform_from_image
from .base import Backend, Preset, binary_mask, check_params, same_length, set_threads

DEFAULTS = {
    "type_of_transform": "",
    "aff_metric": "mattes",
    "aff_sampling": 32,
    "aff_random_sampling_rate": 0.2,
    "aff_iterations": [2100, 1200, 1200, 10],
    "aff_shrink_factors": [6, 4, 2, 1],
    "aff_smoothing_sigmas": [3.0, 2.0, 1.0, 0.0],
    "syn_metric": "mattes",
    "syn_sampling": 32,
    "reg_iterations": [40, 20, 0],
    "grad_step": 0.2,
    "flow_sigma": 3.0,
    "total_sigma": 0.0,
    "random_seed": 17,
}
LINEAR = {"rigid": ("Rigid",), "affine": ("Affine",)}
# antsRegistrationSyNQuick[s]: ANTs' own quick rigid + affine + SyN script defaults (its own metrics and
# schedule; the aff_* / syn_* params do not apply): what a user running ANTs by hand gets.
DEFORMABLE = ("SyN", "SyNRA", "SyNOnly", "ElasticSyN", "antsRegistrationSyNQuick[s]")
CHOICES = {
    "type_of_transform": ("",) + LINEAR["rigid"] + LINEAR["affine"] + DEFORMABLE,
    "aff_metric": ("mattes", "GC", "meansquares"),
    "syn_metric": ("mattes", "CC", "meansquares", "demons"),
}
DEFAULT_TYPE = {"rigid": "Rigid", "affine": "Affine", "deformable": "SyN"}


class AntsBackend(Backend):
    """Registration with antspyx (ANTs' antsRegistration in-process)."""

    name = "ants"

    def check_available(self) -> None:
        """Raise BackendUnavailable when antspyx is not installed (checked without importing it: that is slow)."""
        import importlib.util

        if importlib.util.find_spec("ants") is None:
            raise BackendUnavailable("antspyx is not installed; pip install antspyx")

    def validate(self, preset: Preset) -> dict:
        """Return the preset's params merged with the defaults, or raise InputError naming the field."""
        params = check_params(preset, DEFAULTS, CHOICES)
        kind = params["type_of_transform"] or DEFAULT_TYPE[preset.transform_type]
        allowed = DEFORMABLE if preset.transform_type == "deformable" else LINEAR[preset.transform_type]
        if kind not in allowed:
            raise InputError(f"preset {preset.name!r}: params.type_of_transform {kind!r} does not give a "
                             f"{preset.transform_type} transform (use one of {list(allowed)})")
        params["type_of_transform"] = kind
        same_length(preset, params, "aff_iterations", "aff_shrink_factors", "aff_smoothing_sigmas")
        return params

    def estimate(self, preset: Preset, fixed: Image, moving: Image, workdir: Path, threads: int,
                 fixed_mask: Image | None = None, moving_mask: Image | None = None):
        """Run ants.registration, masked every stage, and return its forward chain as one fixed->moving transform."""
        params = self.validate(preset)
        set_threads(threads)
        os.environ["ANTS_RANDOM_SEED"] = str(params["random_seed"])
        import ants
        import SimpleITK as sitk

        ants.config._random_seed = params["random_seed"]  # antspyx passes it on as --random-seed
        f = to_ants(fixed)
        m = to_ants(moving)
        masks = {}
        for key, mask, image, name in (("mask", fixed_mask, fixed, "fixed mask"),
                                       ("moving_mask", moving_mask, moving, "moving mask")):
            if (checked := binary_mask(mask, image, name)) is not None:
                masks[key] = to_ants(checked)
        if masks:
            masks["mask_all_stages"] = True
        prefix = str(Path(workdir) / "ants_")
        result = ants.registration(
            f, m, type_of_transform=params["type_of_transform"], outprefix=prefix,
            aff_metric=params["aff_metric"], aff_sampling=params["aff_sampling"],
            aff_random_sampling_rate=params["aff_random_sampling_rate"],
            aff_iterations=tuple(params["aff_iterations"]),
            aff_shrink_factors=tuple(params["aff_shrink_factors"]),
            aff_smoothing_sigmas=tuple(params["aff_smoothing_sigmas"]),
            syn_metric=params["syn_metric"], syn_sampling=params["syn_sampling"],
            reg_iterations=tuple(params["reg_iterations"]), grad_step=params["grad_step"],
            flow_sigma=params["flow_sigma"], total_sigma=params["total_sigma"], **masks,
        )
        forward = list(result["fwdtransforms"])
        if preset.transform_type != "deformable":
            if len(forward) != 1:
                raise RuntimeError(f"ANTs returned {len(forward)} transforms for a linear preset: {forward}")
            return as_affine(sitk.ReadTransform(forward[0]))
        # ANTs composes its own chain, in its own order, onto the fixed grid: no order to get wrong here.
        composed = ants.apply_transforms(f, m, forward, compose=str(Path(workdir) / "ants_composed_"))
        if composed is None:
            raise RuntimeError("ANTs could not compose its forward transforms into a displacement field")
        field = sitk.ReadImage(composed)
        _check_field_grid(field, fixed)
        return field_transform_from_image(field)


def _check_field_grid(field, fixed: Image) -> None:
    """The composed field must lie on the fixed grid, or warped images would be misplaced."""
    same = (field.GetSize() == fixed.size
            and np.allclose(field.GetSpacing(), fixed.spacing_mm, atol=1e-4)
            and np.allclose(field.GetOrigin(), fixed.origin_mm, atol=1e-3)
            and np.allclose(np.array(field.GetDirection()), fixed.direction.ravel(), atol=1e-4))
    if not same:
        raise RuntimeError("ANTs' composed displacement field is not on the fixed grid")
