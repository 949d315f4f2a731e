"""Whole-image similarities: global ZNCC and Mattes-style mutual information.

The scorer reports both, but ranks by neither alone: global ZNCC prefers folded warps and mis-ranks
CT→MR, while MI is a useful second vote beside LNCC² (see SCORING.md).
"""

from __future__ import annotations

import numpy as np
import torch

from ._inputs import to_batch

#: A whole image is flat when its variance, relative to its mean square, is at the rounding level of
#: its values: float32 (and integers held in it) resolve about 1e-7, so 1e-12; float64 about 1e-16.
GLOBAL_FLAT = 1e-12
GLOBAL_FLAT_FLOAT64 = 1e-28


def zncc(fixed, moving, mask=None) -> torch.Tensor:
    """Global zero-normalized cross-correlation in [−1, 1] (float64); scalar, or (N, C) for batched input.

    Computed on centred values in float64 (no cancellation, no overflow); 0 when either image is flat
    inside the mask. Differentiable when the inputs are tensors that require grad.
    """
    f, m, mk, layout = to_batch(fixed, moving, mask)
    dims = tuple(range(1, f.ndim))
    w = torch.ones_like(f, dtype=torch.float64) if mk is None else mk.to(torch.float64)
    count = w.sum(dims, keepdim=True).clamp(min=1)
    f64, m64 = f.to(torch.float64), m.to(torch.float64)
    fc = (f64 - (f64 * w).sum(dims, keepdim=True) / count) * w
    mc = (m64 - (m64 * w).sum(dims, keepdim=True) / count) * w
    sff, smm, sfm = fc.square().sum(dims), mc.square().sum(dims), (fc * mc).sum(dims)
    # Relative to the raw values' mean square, so the test is scale-free and catches rounding residue.
    n = count.reshape(-1)
    flat_f, flat_m = (GLOBAL_FLAT_FLOAT64 if t.dtype == torch.float64 else GLOBAL_FLAT for t in (f, m))
    ok = (sff > flat_f * (f64.square() * w).sum(dims)) & (smm > flat_m * (m64.square() * w).sum(dims))
    ok = ok & (n > 1)
    den = torch.where(ok, sff * smm, torch.ones_like(sff)).sqrt()
    value = torch.where(ok, sfm / den, torch.zeros_like(sfm)).clamp(-1.0, 1.0)
    return value.reshape(layout.batch_shape) if layout.batch_shape else value.reshape(())


def _cubic_bspline(t: np.ndarray) -> np.ndarray:
    """The cubic B-spline kernel (Mattes' Parzen window for the moving image)."""
    a = np.abs(t)
    out = np.where(a < 1, (4 - 6 * a**2 + 3 * a**3) / 6, 0.0)
    return np.where((a >= 1) & (a < 2), (2 - a) ** 3 / 6, out)


def mutual_information(fixed, moving, mask=None, bins: int = 32) -> torch.Tensor:
    """Mattes mutual information (nats, float64 scalar tensor) from a Parzen-windowed joint histogram.

    As in Mattes et al. (IEEE TMI 2003) and ITK's MattesMutualInformation: each image is binned over
    its own range inside the mask, the fixed image with a zero-order (box) window and the moving
    image with a cubic B-spline window; two padding bins on each side hold the spline's support.
    Larger is better; 0 for a flat image.
    """
    if not isinstance(bins, (int, np.integer)) or bins < 8:
        raise ValueError(f"bins must be an int >= 8, got {bins!r}")
    f, m, mk, _ = to_batch(fixed, moving, mask)
    fv = f.detach().cpu().numpy().astype(np.float64).ravel()
    mv = m.detach().cpu().numpy().astype(np.float64).ravel()
    if mk is not None:
        keep = mk.cpu().numpy().ravel()
        fv, mv = fv[keep], mv[keep]
    keep = np.isfinite(fv) & np.isfinite(mv)
    fv, mv = fv[keep], mv[keep]
    if fv.size == 0 or np.ptp(fv) == 0 or np.ptp(mv) == 0:
        return torch.zeros((), dtype=torch.float64)
    pad = 2
    inner = bins - 2 * pad
    tf = (fv - fv.min()) / np.ptp(fv) * inner
    tm = (mv - mv.min()) / np.ptp(mv) * inner
    fbin = np.clip(np.floor(tf).astype(np.int64), 0, inner - 1) + pad
    tm = tm + pad
    base = np.floor(tm).astype(np.int64)
    joint = np.zeros(bins * bins)
    for offset in (-1, 0, 1, 2):
        mbin = base + offset
        weight = _cubic_bspline(tm - mbin)
        ok = (mbin >= 0) & (mbin < bins) & (weight > 0)
        joint += np.bincount(fbin[ok] * bins + mbin[ok], weights=weight[ok], minlength=bins * bins)
    joint = joint.reshape(bins, bins)
    joint /= joint.sum()
    pf = joint.sum(axis=1, keepdims=True)
    pm = joint.sum(axis=0, keepdims=True)
    nz = joint > 0
    mi = float(np.sum(joint[nz] * np.log(joint[nz] / (pf @ pm)[nz])))
    return torch.tensor(max(mi, 0.0), dtype=torch.float64)
