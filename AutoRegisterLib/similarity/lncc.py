"""Local normalized cross-correlation (LNCC) and its signed form, the local ZNCC map.

For every voxel, with the sums S taken over the window around it and N the number of voxels the window
counts,

    cross = S(F·M) − S(F)·S(M)/N,   varF = S(F²) − S(F)²/N,   varM = S(M²) − S(M)²/N
    cc    = cross² / (varF · varM)  ∈ [0, 1],      zncc = cross / sqrt(varF · varM)  ∈ [−1, 1].

Numerics (why the naive formula fails, and what we do instead):

* varF is a small difference of two large sums. In float32, on CT values (−1024..3071) or on images with
  a large offset, it loses every significant digit and cc comes out at 40 or NaN. Both NCCs are
  invariant to a global affine change of intensity, so each image is first centred and scaled by its
  own mean and standard deviation (over the mask), and every box sum is accumulated in float64.
  Integer inputs are converted exactly (to float32 up to 16 bits, float64 above), so nothing overflows.
* A window whose local variance is below ``FLAT_VARIANCE`` times the image's global variance is *flat*:
  its correlation is undefined, and it gets cc = 0 (and zncc = 0) by definition, with zero gradient.
  The threshold is relative, so it means the same on CT in HU and on MR in arbitrary units.
* Rounding can push cross² a hair above varF·varM; values are clipped to the range, and the gradient
  passes through the clip unchanged.

Boundaries: ``"valid"`` (default) clips windows to the image and counts only in-image voxels, as ANTs
does; with a mask, N = box(mask), so only voxels inside the mask count. ``"zeros"`` reproduces
VoxelMorph's NCC exactly: raw values, zero padding, N = w^d everywhere and 1e-5 added to varF·varM.
It inherits VoxelMorph's conditioning too: on raw values of magnitude V the float64 rounding of the sums,
about 1e-16·V²·w^d, is divided by sqrt(1e-5) in flat windows, so it is meant for intensities scaled to
[0, 1] (as VoxelMorph's are); on CT in HU or large offsets use ``"valid"``, which standardizes first.

Engines (``engine=``; all exact to float64 rounding, so they differ only in speed and memory):

* ``"fft"``, ``"running_sum"``, ``"grouped_conv"``: torch box filters (one batched FFT, separable
  prefix sums, FastLNCC's grouped convolution) in float64, differentiated by autograd.
* ``"fused_cpu"`` (numba, the ``[fast]`` extra): the whole forward and backward streamed plane by
  plane with float64 running sums, in parallel; forward + backward needs about one float32 volume
  beyond its inputs (the gradient) plus cache-sized ring buffers. The default on CPU.
* ``"cupy"`` (the ``[cuda]`` extra): the same computation as CuPy kernels; the default on CUDA.

References: Avants et al., "A reproducible evaluation of ANTs similarity metric performance in brain
image registration", NeuroImage 2011; Balakrishnan et al., "VoxelMorph", IEEE TMI 2019; FastLNCC
(one grouped convolution for the five box sums).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._inputs import (
    BOUNDARIES,
    FLAT_VARIANCE,
    REDUCTIONS,
    ZEROS_EPS,
    Layout,
    check_choice,
    radii,
    reduce_map,
    to_batch,
)
from .box import TORCH_ENGINES, box_filter, window_counts

#: The fused engines, and the device type (with its name in messages) their tensors must be on.
FUSED_DEVICE = {"fused_cpu": ("cpu", "CPU"), "cupy": ("cuda", "CUDA")}
ENGINES = ("auto",) + TORCH_ENGINES + tuple(FUSED_DEVICE)


def standardize(x: torch.Tensor, mask: torch.Tensor | None):
    """Centre and scale each (B, ...) slice by its mean and std over the mask, in float64.

    The statistics are detached: both NCCs are invariant to them, so their gradient contribution is
    exactly zero.
    """
    x64 = x.to(torch.float64)
    dims = tuple(range(1, x.ndim))
    with torch.no_grad():
        if mask is None:
            mean = x64.mean(dims, keepdim=True)
            var = (x64 - mean).square().mean(dims, keepdim=True)
        else:
            w = mask.to(torch.float64)
            count = w.sum(dims, keepdim=True).clamp(min=1)
            mean = (x64 * w).sum(dims, keepdim=True) / count
            var = ((x64 - mean) * w).square().sum(dims, keepdim=True) / count
        scale = var.sqrt()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (x64 - mean) / scale, mean, scale


def local_moments(f: torch.Tensor, m: torch.Tensor, mask, rad, boundary: str, engine: str):
    """cross, varF, varM, N and the "has a value" mask, all float64, from five (or six) box sums."""
    spatial = tuple(f.shape[1:])
    if boundary == "zeros":
        f64, m64 = f.to(torch.float64), m.to(torch.float64)
        n = torch.full((), float(math.prod(2 * r + 1 for r in rad)), dtype=torch.float64, device=f.device)
    else:
        f64, _, _ = standardize(f, mask)
        m64, _, _ = standardize(m, mask)
        n = window_counts(spatial, rad, f.device)
        if mask is not None:
            w = mask.to(torch.float64)
            f64, m64 = f64 * w, m64 * w
    quantities = [f64, m64, f64 * f64, m64 * m64, f64 * m64]
    if boundary == "valid" and mask is not None:
        quantities.append(mask.to(torch.float64))
    sums = box_filter(torch.stack(quantities, dim=1), rad, engine)
    s_f, s_m, s_ff, s_mm, s_fm = sums.unbind(1)[:5]
    if boundary == "valid" and mask is not None:
        n = sums[:, 5].round()
    n_safe = torch.where(n > 0, n, torch.ones_like(n))
    cross = s_fm - s_f * s_m / n_safe
    var_f = s_ff - s_f * s_f / n_safe
    var_m = s_mm - s_m * s_m / n_safe
    inside = mask if mask is not None else None
    return cross, var_f, var_m, n, inside


def _clip_passing_gradient(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Clip the value into [lo, hi] while letting the gradient of the unclipped formula through."""
    return x + (x.clamp(lo, hi) - x).detach()


def _maps_torch(f, m, mask, rad, boundary, engine, signed: bool) -> torch.Tensor:
    """The cc (or signed zncc) map, (B, *spatial), through the torch box engines and autograd."""
    cross, var_f, var_m, n, inside = local_moments(f, m, mask, rad, boundary, engine)
    if boundary == "zeros":
        den = var_f * var_m + ZEROS_EPS
        ok = den > 0
    else:
        threshold = FLAT_VARIANCE * n
        ok = (var_f > threshold) & (var_m > threshold)
        den = var_f * var_m
    if inside is not None:
        ok = ok & inside
    den = torch.where(ok, den, torch.ones_like(den))
    if signed:
        value = torch.where(ok, cross / den.sqrt(), torch.zeros_like(cross))
        return _clip_passing_gradient(value, -1.0, 1.0)
    value = torch.where(ok, cross * cross / den, torch.zeros_like(cross))
    return _clip_passing_gradient(value, 0.0, 1.0)


def resolve_engine(engine: str, device: torch.device, spatial_ndim: int) -> str:
    """The engine to run: the caller's choice (if it can run here), or the fastest correct one.

    Every engine is exact to float64 rounding, so "auto" only weighs speed: on CPU the fused numba
    kernel (O(1) work per voxel whatever the window, no volume-sized temporaries), else running sums;
    on CUDA the CuPy kernels, else the FFT engine (one batched transform for all five sums).
    """
    check_choice(engine, ENGINES, "engine")
    if engine == "auto":
        fused, fallback = ("cupy", "fft") if device.type == "cuda" else ("fused_cpu", "running_sum")
        return fused if _fused_module(fused).available()[0] else fallback
    if engine in FUSED_DEVICE:
        ok, why = _fused_module(engine).available()
        if not ok:
            raise RuntimeError(f"engine {engine!r} cannot run: {why}")
        device_type, device_name = FUSED_DEVICE[engine]
        if device.type != device_type:
            raise RuntimeError(f"engine {engine!r} runs on {device_name} tensors, got device {device}")
    return engine


def _fused_module(engine: str):
    """The module of a fused engine, imported on first use (numba and CuPy take seconds to load)."""
    if engine == "cupy":
        from . import _fused_cuda

        return _fused_cuda
    from . import _fused_cpu

    return _fused_cpu


def _compute_map(f, m, mk, rad, boundary, chosen, signed):
    """The (B, *spatial) map from already batched inputs with the resolved engine."""
    if chosen in FUSED_DEVICE:
        return _fused_module(chosen).fused_map(f, m, mk, rad, boundary, signed)
    return _maps_torch(f, m, mk, rad, boundary, chosen, signed)


def _prepare(fixed, moving, window, mask, reduction, boundary, engine):
    """Validate every argument, batch the inputs and pick the engine."""
    check_choice(reduction, REDUCTIONS, "reduction")
    check_choice(boundary, BOUNDARIES, "boundary")
    check_choice(engine, ENGINES, "engine")
    f, m, mk, layout = to_batch(fixed, moving, mask)
    rad = radii(window, layout.spatial_ndim)
    return f, m, mk, layout, rad, resolve_engine(engine, f.device, layout.spatial_ndim)


def lncc(fixed, moving, window=9, mask=None, reduction: str = "mean", boundary: str = "valid",
         engine: str = "auto") -> torch.Tensor:
    """Squared local normalized cross-correlation cc = cross²/(varF·varM) in [0, 1], reduced or per voxel.

    fixed, moving: tensors or numpy arrays of the same shape, (H,W), (D,H,W), (N,C,H,W) or
        (N,C,D,H,W); any integer or float dtype (converted exactly, never overflowing).
    window: odd window size in voxels, an int or one per spatial axis.
    mask: optional, shaped like the grid or like the images; nonzero = inside. Windows count only
        voxels inside it (N = box(mask)); voxels outside get 0 and are left out of mean/sum.
    reduction: "mean" or "sum" over voxels that have a value, or "none" for the map in the input's shape.
    boundary: "valid" (ANTs: windows clipped to the image) or "zeros" (VoxelMorph, exactly).
    engine: "auto" (the fused kernel of the device when available) or one of ENGINES to force it.

    Returns a float32 tensor (float64 if an input is float64 or int32+), differentiable with respect to
    inputs that require grad.
    """
    f, m, mk, layout, rad, chosen = _prepare(fixed, moving, window, mask, reduction, boundary, engine)
    if chosen == "fused_cpu" and reduction != "none":
        from ._fused_cpu import fused_reduction

        # The fused kernel reduces on the fly, so no map is ever written.
        return fused_reduction(f, m, mk, rad, boundary, reduction, signed=False).to(layout.out_dtype)
    cc = _compute_map(f, m, mk, rad, boundary, chosen, signed=False)
    return reduce_map(cc, mk, reduction, layout)


def zncc_map(fixed, moving, window=9, mask=None, reduction: str = "none", boundary: str = "valid",
             engine: str = "auto") -> torch.Tensor:
    """Signed local ZNCC cross/sqrt(varF·varM) in [−1, 1], per voxel (default) or reduced."""
    f, m, mk, layout, rad, chosen = _prepare(fixed, moving, window, mask, reduction, boundary, engine)
    if chosen == "fused_cpu" and reduction != "none":
        from ._fused_cpu import fused_reduction

        return fused_reduction(f, m, mk, rad, boundary, reduction, signed=True).to(layout.out_dtype)
    return reduce_map(_compute_map(f, m, mk, rad, boundary, chosen, signed=True), mk, reduction, layout)


class LNCCLoss(nn.Module):
    """Negative mean squared LNCC, −mean(cc), as a drop-in training loss.

    cc = cross² / (varF · varM) per voxel, where over the window around it
    cross = S(F·M) − S(F)S(M)/N, varF = S(F²) − S(F)²/N and varM = S(M²) − S(M)²/N.
    ``boundary="zeros"`` is VoxelMorph's NCC exactly (zero padding, N = w^d, 1e-5 on varF·varM), so
    ``LNCCLoss(window=9, boundary="zeros")`` replaces ``voxelmorph.losses.NCC().loss``; ``"valid"``
    clips windows to the image as ANTs does. Flat windows count as cc = 0.

    Every engine of ``lncc`` can be forced with ``engine=``; they agree to float64 rounding.

    References: Avants et al., NeuroImage 2011 (ANTs CC); Balakrishnan et al., IEEE TMI 2019
    (VoxelMorph); MONAI's LocalNormalizedCrossCorrelationLoss for the argument conventions.
    """

    def __init__(self, window=9, boundary: str = "valid", reduction: str = "mean", engine: str = "auto"):
        super().__init__()
        if isinstance(window, bool) or not isinstance(window, (int, tuple, list)):
            raise TypeError(f"window must be an odd int or a tuple of odd ints, got {window!r}")
        sizes = (window,) if isinstance(window, int) else tuple(window)
        if not sizes or any(not isinstance(w, int) or w < 1 or w % 2 == 0 for w in sizes):
            raise ValueError(f"window must be odd and positive (a centred box), got {window!r}")
        self.window = window
        self.boundary = check_choice(boundary, BOUNDARIES, "boundary")
        self.reduction = check_choice(reduction, REDUCTIONS, "reduction")
        self.engine = check_choice(engine, ENGINES, "engine")

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask=None) -> torch.Tensor:
        """−cc between the prediction (the warped moving image) and the target (fixed) image."""
        return -lncc(target, pred, window=self.window, mask=mask, reduction=self.reduction,
                     boundary=self.boundary, engine=self.engine)

    def extra_repr(self) -> str:
        """Show the configuration when the module is printed."""
        return f"window={self.window}, boundary={self.boundary!r}, reduction={self.reduction!r}"



def compile_kernels() -> None:
    """Compile the fused CPU kernels for float32 and float64 inputs into numba's on-disk cache (run once at
    install: compiling takes about 10 s on the first call, while loading from the cache takes a fraction of a
    second). It runs the public functions, so exactly the specialisations a real call needs are compiled."""
    if not _fused_module("fused_cpu").available()[0]:
        return
    for dtype in (torch.float32, torch.float64):
        f = torch.rand(6, 7, 8, dtype=dtype, requires_grad=True)
        m = torch.rand(6, 7, 8, dtype=dtype)
        mask = torch.ones(6, 7, 8)
        lncc(f, m, window=3, mask=mask, engine="fused_cpu").backward()
        zncc_map(f, m, window=3, mask=mask, engine="fused_cpu").sum().backward()


__all__ = ["lncc", "zncc_map", "LNCCLoss", "compile_kernels", "FLAT_VARIANCE", "ZEROS_EPS", "ENGINES", "Layout"]
