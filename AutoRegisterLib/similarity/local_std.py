"""LocalStandardDeviation: the standard deviation of the clipped window around every voxel.

Forward: S1 = box(I) and S2 = box(I²) in one batched FFT correlation of the stack [I, I²] with the
shared ones kernel; v = (S2 − S1²/N)/N; std = sqrt(max(0, v) + eps). Backward: dv = g / (2·std),
dS2 = dv/N, dS1 = −2·S1·dv/N², one batched FFT correlation of [dS1, dS2] (a symmetric box is its own
adjoint), dI = box(dS1) + 2·I·box(dS2).

Fixes to the design's numerical weak spots:

* Centring and scaling. S2 − S1²/N cancels catastrophically when the local mean is large next to the
  local spread (CT bone, MR with an offset). The image is first centred and scaled by its global mean
  and std, the sums are taken in float64, and the result is scaled back: std(a·I + b) = |a|·std(I).
* eps relative to the data. An absolute eps is either invisible (CT in HU) or dominant (images scaled
  to [0, 1]); here eps = (``STD_FLOOR`` · global std)², so flat windows return ``STD_FLOOR`` times the
  image's std instead of 0, and the gradient there, 1/(2·std), stays finite.
* Negative variances from rounding are clamped to 0 (zero gradient there).

On CUDA with CuPy installed, the pointwise steps run as fused CuPy elementwise kernels (one for the
forward; one preparing dS1, dS2 and one combining dI in the backward); elsewhere they are torch ops.
"""

from __future__ import annotations

import torch

from ._inputs import as_tensor, radii, working_dtype
from .box import box_fft, window_counts
from .lncc import standardize

#: Flat windows get this fraction of the image's global standard deviation (sets the eps).
STD_FLOOR = 1e-6


class LocalStd(torch.autograd.Function):
    """Local standard deviation over clipped windows, with a hand-written FFT backward."""

    @staticmethod
    def forward(ctx, image: torch.Tensor, rad: tuple[int, ...]):
        """image (B, *spatial) → std (B, *spatial), same dtype."""
        x, _, scale = standardize(image, None)
        n = window_counts(tuple(image.shape[1:]), rad, image.device)
        sums = box_fft(torch.stack([x, x * x], dim=1), rad)
        s1, s2 = sums[:, 0], sums[:, 1]
        std = _pointwise().forward_std(s1, s2, n, STD_FLOOR**2)
        ctx.save_for_backward(x, s1, s2, n)
        ctx.rad = rad
        return (std * scale).to(image.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        """dI from one more batched FFT correlation of [dS1, dS2]."""
        x, s1, s2, n = ctx.saved_tensors
        ops = _pointwise()
        # out = scale·std(x) with x = (I − mean)/scale, so dL/dI = dL/dstd(x)·scale/scale: the scales cancel.
        d_s1, d_s2 = ops.backward_prep(grad_out.to(torch.float64), s1, s2, n, STD_FLOOR**2)
        boxed = box_fft(torch.stack([d_s1, d_s2], dim=1), ctx.rad)
        d_image = ops.combine(boxed[:, 0], boxed[:, 1], x)
        return d_image.to(grad_out.dtype), None


class _TorchPointwise:
    """The pointwise steps of LocalStd as torch ops (every device)."""

    @staticmethod
    def forward_std(s1, s2, n, eps):
        """std = sqrt(max(0, v) + eps), v = (S2 − S1²/N)/N."""
        var = (s2 - s1 * s1 / n) / n
        return (var.clamp(min=0) + eps).sqrt()

    @staticmethod
    def backward_prep(g, s1, s2, n, eps):
        """dS1, dS2 from the upstream gradient (zero where the variance was clamped)."""
        var = (s2 - s1 * s1 / n) / n
        dv = torch.where(var > 0, g / (2 * (var.clamp(min=0) + eps).sqrt()), torch.zeros_like(g))
        return -2 * s1 * dv / (n * n), dv / n

    @staticmethod
    def combine(b1, b2, x):
        """dI = box(dS1) + 2·I·box(dS2)."""
        return b1 + 2 * x * b2


def _pointwise():
    """CuPy's fused kernels on CUDA when available, torch ops otherwise."""
    from . import _fused_cuda

    if torch.cuda.is_available() and _fused_cuda.available()[0]:
        return _fused_cuda.LocalStdKernels
    return _TorchPointwise


def local_std(image, window=9) -> torch.Tensor:
    """Local standard deviation in clipped (2r+1)-wide windows, same shape as the image; differentiable."""
    t = as_tensor(image, "image")
    spatial_ndim = 2 if t.ndim in (2, 4) else 3
    rad = radii(window, spatial_ndim)
    spatial = tuple(t.shape[-spatial_ndim:])
    batched = t.to(working_dtype(t)).reshape(-1, *spatial)
    return LocalStd.apply(batched, rad).reshape(t.shape)
