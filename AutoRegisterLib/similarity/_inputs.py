"""Turn the many accepted input forms into one: a float tensor shaped (B, *spatial), plus a way back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: Integer types are exact in float32 up to 2**24; wider ones go to float64 so that nothing rounds.
_EXACT_IN_FLOAT32 = (torch.uint8, torch.int8, torch.int16, torch.uint16, torch.float16, torch.bfloat16, torch.float32)
_ACCEPTED = _EXACT_IN_FLOAT32 + (torch.int32, torch.uint32, torch.int64, torch.float64, torch.bool)

BOUNDARIES = ("valid", "zeros")
REDUCTIONS = ("mean", "sum", "none")

# The two numeric constants every engine shares (see lncc.py for what they mean); they live here,
# below lncc.py and the fused engines, so that the engines need not import lncc.py, which runs them.
#: Local variance (per voxel, relative to the image's global variance) below which a window is flat.
FLAT_VARIANCE = 1e-6
#: VoxelMorph's stabiliser, added to varF·varM in ``boundary="zeros"``.
ZEROS_EPS = 1e-5


@dataclass(frozen=True)
class Layout:
    """How the caller's array was shaped, so that a per-voxel map can be returned in the same shape."""

    shape: tuple[int, ...]
    spatial_ndim: int
    out_dtype: torch.dtype

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The (N, C) part of the caller's shape; empty for a bare (D,H,W) or (H,W) image."""
        return self.shape[: len(self.shape) - self.spatial_ndim]


def as_tensor(x, name: str) -> torch.Tensor:
    """Wrap a numpy array or tensor as a tensor without copying when possible."""
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray) or np.isscalar(x) or isinstance(x, (list, tuple)):
        a = np.asarray(x)
        if a.dtype.byteorder not in ("=", "|"):
            a = a.astype(a.dtype.newbyteorder("="))
        if a.dtype == np.uint32:
            a = a.astype(np.int64)
        t = torch.from_numpy(np.ascontiguousarray(a))
    else:
        raise TypeError(f"{name} must be a torch tensor or a numpy array, got {type(x).__name__}")
    if t.dtype not in _ACCEPTED:
        raise TypeError(f"{name} has unsupported dtype {t.dtype}")
    if t.ndim not in (2, 3, 4, 5):
        raise ValueError(
            f"{name} must be shaped (H,W), (D,H,W), (N,C,H,W) or (N,C,D,H,W); got shape {tuple(t.shape)}"
        )
    return t


def working_dtype(t: torch.Tensor) -> torch.dtype:
    """The float type that holds every value of `t` exactly (float32 or float64)."""
    return torch.float32 if t.dtype in _EXACT_IN_FLOAT32 or t.dtype == torch.bool else torch.float64


def to_batch(fixed, moving, mask=None):
    """Return fixed, moving as (B, *spatial) float tensors, the mask as (B, *spatial) bool or None, and the layout."""
    f = as_tensor(fixed, "fixed")
    m = as_tensor(moving, "moving")
    if f.shape != m.shape:
        raise ValueError(f"fixed and moving must have the same shape, got {tuple(f.shape)} and {tuple(m.shape)}")
    if f.device != m.device:
        raise ValueError(f"fixed and moving are on different devices ({f.device}, {m.device})")
    spatial_ndim = 2 if f.ndim in (2, 4) else 3
    spatial = tuple(f.shape[-spatial_ndim:])
    if min(spatial) < 1:
        raise ValueError(f"images must not be empty, got shape {tuple(f.shape)}")
    out_dtype = torch.float64 if torch.float64 in (f.dtype, m.dtype) or (
        working_dtype(f) == torch.float64 or working_dtype(m) == torch.float64
    ) else torch.float32
    layout = Layout(tuple(f.shape), spatial_ndim, out_dtype)
    fb = f.to(working_dtype(f)).reshape(-1, *spatial)
    mb = m.to(working_dtype(m)).reshape(-1, *spatial)
    return fb, mb, batch_mask(mask, layout, f.device), layout


def batch_mask(mask, layout: Layout, device) -> torch.Tensor | None:
    """A (B, *spatial) bool mask from a spatial-shaped or full-shaped mask (nonzero means inside)."""
    if mask is None:
        return None
    mk = as_tensor(mask, "mask").to(device)
    spatial = layout.shape[-layout.spatial_ndim:]
    n_batch = int(np.prod(layout.batch_shape)) if layout.batch_shape else 1
    if tuple(mk.shape) == spatial:
        mk = mk.reshape(1, *spatial).expand(n_batch, *spatial)
    elif tuple(mk.shape) == layout.shape:
        mk = mk.reshape(n_batch, *spatial)
    else:
        raise ValueError(f"mask shape {tuple(mk.shape)} matches neither the image {layout.shape} nor its grid {spatial}")
    return (mk != 0).contiguous()


def radii(window, spatial_ndim: int) -> tuple[int, ...]:
    """Half-widths per axis from an odd window size (an int, or one int per spatial axis)."""
    if isinstance(window, (int, np.integer)) and not isinstance(window, bool):
        ws = (int(window),) * spatial_ndim
    else:
        try:
            ws = tuple(int(w) for w in window)
        except TypeError:
            raise TypeError(f"window must be an odd int or a sequence of odd ints, got {window!r}") from None
        if len(ws) != spatial_ndim:
            raise ValueError(f"window {window!r} needs {spatial_ndim} sizes for {spatial_ndim}D images")
    for w in ws:
        if w < 1 or w % 2 == 0:
            raise ValueError(f"window sizes must be odd and positive (a centred box), got {window!r}")
    return tuple(w // 2 for w in ws)


def check_choice(value, choices, name: str) -> str:
    """Raise a clear error unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def reduce_map(cc: torch.Tensor, mask: torch.Tensor | None, reduction: str, layout: Layout) -> torch.Tensor:
    """Apply mean/sum over voxels that have a value, or return the map in the caller's shape."""
    if reduction == "none":
        return cc.reshape(layout.shape).to(layout.out_dtype)
    total = cc.sum(dtype=torch.float64)
    if reduction == "mean":
        count = cc.numel() if mask is None else int(mask.sum())
        total = total / max(count, 1)
    return total.to(layout.out_dtype)


# --- the fused engines' autograd Functions (forward(ctx, f, m, ...)): one backward prologue and epilogue ---

def remember_inputs(ctx, f: torch.Tensor, m: torch.Tensor) -> None:
    """Keep the shapes and dtypes of `f` and `m` on `ctx`, so the gradients can be handed back in them."""
    ctx.input_forms = ((f.shape, f.dtype), (m.shape, m.dtype))


def fused_backward(ctx, grad_out: torch.Tensor, grads) -> tuple:
    """A fused Function's backward: `grads(ctx, grad_out, need_f, need_m)` gives the gradients of f and m
    (None for one not needed), handed back in their inputs' form; the other inputs get None."""
    need_f, need_m = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    others = (None,) * (len(ctx.needs_input_grad) - 2)
    if not (need_f or need_m):
        return (None, None) + others
    return input_grads(ctx, *grads(ctx, grad_out, need_f, need_m)) + others


def batch_grad(grad_out: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """The incoming gradient of a per-voxel map as contiguous float64 shaped (B, *spatial), the kernels' form."""
    return grad_out.detach().to(torch.float64).reshape((-1,) + tuple(spatial)).contiguous()


def input_grads(ctx, d_f, d_m) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of f and m (tensors or numpy arrays, None when not needed) in their inputs' shapes and
    dtypes (see `remember_inputs`)."""
    return tuple(None if d is None else torch.as_tensor(d).reshape(shape).to(dtype)
                 for d, (shape, dtype) in zip((d_f, d_m), ctx.input_forms))
