"""The fused CPU engine: one numba kernel for the LNCC forward, one for its backward.

The autograd Function keeps forward and backward side by side. The forward saves only the two input
tensors (no moment volumes), and the backward recomputes the window sums while streaming, so
forward + backward needs the gradients it returns plus a few cache-sized ring buffers per thread.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from ._inputs import FLAT_VARIANCE, ZEROS_EPS, batch_grad, fused_backward, remember_inputs

#: Target size of one work item's ring of plane sums; small enough to stay in a core's L2 cache.
RING_BYTES = 1 << 21
#: Below this many voxels one thread is faster: waking a second one costs more than the work.
SERIAL_VOXELS = 1 << 16


def available():
    """Whether the fused CPU kernel can run here, and why not."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False, "numba is not installed (pip install 'AutoRegisterLib[fast]')"
    return True, ""


def _kernels(n_voxels: int):
    """Import (on first use, compile or load from cache) the kernels; how many threads to use."""
    import numba

    from . import _numba_kernels

    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if n_voxels < SERIAL_VOXELS:
        threads = 1
    return _numba_kernels, threads


@contextmanager
def _numba_settings(threads: int):
    """Run with torch's thread count and one-item chunks, then restore the caller's numba settings."""
    import numba

    old_threads = numba.get_num_threads()
    numba.set_num_threads(threads)
    # Hand out work items one at a time: on a shared machine a static split waits for the slowest core.
    old_chunk = numba.set_parallel_chunksize(1)
    try:
        yield
    finally:
        numba.set_parallel_chunksize(old_chunk)
        numba.set_num_threads(old_threads)


def _work_items(depth: int, height: int, width: int, radii, n_quantities: int, threads: int) -> np.ndarray:
    """(z0, z1, y0, y1) blocks: a few z-chunks per thread, y-tiles sized so a ring fits in cache."""
    rz, ry, _ = radii
    ring_row_bytes = (2 * rz + 2) * n_quantities * width * 8
    tile = int(max(2 * ry + 1, 8, RING_BYTES // max(ring_row_bytes, 1)))
    tile = min(tile, height)
    n_tiles = -(-height // tile)
    # Each z-chunk recomputes 2·rz planes of halo, so chunks stay long; more items only balance load.
    n_chunks = max(1, min(depth // max(4 * rz, 1), -(-2 * threads // n_tiles)))
    z_edges = np.linspace(0, depth, n_chunks + 1).round().astype(np.int64)
    y_edges = np.linspace(0, height, n_tiles + 1).round().astype(np.int64)
    items = [
        (z_edges[i], z_edges[i + 1], y_edges[j], y_edges[j + 1])
        for i in range(n_chunks) for j in range(n_tiles)
        if z_edges[i + 1] > z_edges[i] and y_edges[j + 1] > y_edges[j]
    ]
    return np.asarray(items, dtype=np.int64).reshape(-1, 4)


class _Problem:
    """One batch of (fixed, moving) pairs as 3D float arrays, with the settings the kernels need."""

    def __init__(self, f: torch.Tensor, m: torch.Tensor, mask, rad, boundary: str):
        kern, threads = _kernels(f.shape[1:].numel())
        self.threads = threads
        dtype = torch.float64 if torch.float64 in (f.dtype, m.dtype) else torch.float32
        spatial = tuple(f.shape[1:])
        if len(spatial) == 2:
            spatial = (1,) + spatial
            rad = (0,) + tuple(rad)
        self.shape = spatial
        self.radii = np.asarray(rad, dtype=np.int64)
        self.f = f.detach().to(dtype).contiguous().reshape(-1, *spatial).numpy()
        self.m = m.detach().to(dtype).contiguous().reshape(-1, *spatial).numpy()
        self.has_mask = mask is not None
        self.mask = (
            mask.to(torch.uint8).contiguous().reshape(-1, *spatial).numpy()
            if mask is not None else np.zeros((self.f.shape[0], 1, 1, 1), np.uint8)
        )
        self.zeros_mode = boundary == "zeros"
        self.n_const = float(np.prod(2 * self.radii + 1))
        self.eps = ZEROS_EPS if self.zeros_mode else 0.0
        self.kern = kern
        weighted = self.has_mask and not self.zeros_mode
        self.items = _work_items(*spatial, tuple(rad), 6 if weighted else 5, threads)
        self.stats = np.zeros((self.f.shape[0], 4))
        for i in range(self.f.shape[0]):
            if self.zeros_mode:
                self.stats[i] = (0.0, 1.0, 0.0, 1.0)
                continue
            with _numba_settings(threads):
                fm, fs, mm, ms = kern.pair_stats(self.f[i], self.m[i], self.mask[i], self.has_mask)
            self.stats[i] = (fm, 1.0 / fs if fs > 0 else 1.0, mm, 1.0 / ms if ms > 0 else 1.0)

    def forward(self, signed: bool, out: np.ndarray | None) -> float:
        """Run the forward kernel on every pair; returns the sum of the map over voxels with a value."""
        total = 0.0
        dummy = np.zeros((1, 1, 1), self.f.dtype)
        for i in range(self.f.shape[0]):
            with _numba_settings(self.threads):
                total += self.kern.lncc_forward(
                    self.f[i], self.m[i], self.mask[i], self.has_mask, self.radii, self.stats[i], self.zeros_mode,
                    self.n_const, self.eps, FLAT_VARIANCE, signed, dummy if out is None else out[i],
                    out is not None, self.items,
                )
        return total

    def backward(self, signed: bool, grad, need_f: bool, need_m: bool):
        """Gradients (numpy, input dtype) of Σ grad·map with respect to fixed and moving, and Σ map."""
        grad_is_map = isinstance(grad, np.ndarray)
        d_f = np.empty_like(self.f) if need_f else None
        d_m = np.empty_like(self.m) if need_m else None
        dummy = np.zeros((1, 1, 1), self.f.dtype)
        dummy_g = np.zeros((1, 1, 1), np.float64 if not grad_is_map else grad.dtype)
        total = 0.0
        for i in range(self.f.shape[0]):
            with _numba_settings(self.threads):
                total += self.kern.lncc_backward(
                    self.f[i], self.m[i], self.mask[i], self.has_mask, self.radii, self.stats[i], self.zeros_mode,
                    self.n_const, self.eps, FLAT_VARIANCE, signed,
                    grad[i] if grad_is_map else dummy_g, 0.0 if grad_is_map else float(grad), grad_is_map,
                    need_f, need_m, dummy if d_f is None else d_f[i], dummy if d_m is None else d_m[i], self.items,
                )
        return d_f, d_m, total


class FusedLNCC(torch.autograd.Function):
    """LNCC (or signed ZNCC) through the fused numba kernels: forward and backward side by side."""

    @staticmethod
    def forward(ctx, f, m, mask, rad, boundary, signed, want_map):
        """The per-voxel map (want_map) or the float64 sum of the map over voxels with a value."""
        problem = _Problem(f, m, mask, rad, boundary)
        ctx.problem, ctx.signed, ctx.want_map = problem, signed, want_map
        remember_inputs(ctx, f, m)
        ctx.eager = None
        if want_map:
            out = np.empty((problem.f.shape[0],) + problem.shape, problem.f.dtype)
            problem.forward(signed, out)
            return torch.from_numpy(out).reshape(f.shape)
        if f.requires_grad or m.requires_grad:
            # A loss: the backward pass yields the value too, so run it once now and scale it later.
            d_f, d_m, total = problem.backward(signed, 1.0, f.requires_grad, m.requires_grad)
            ctx.eager = (d_f, d_m)
            return torch.tensor(total, dtype=torch.float64)
        return torch.tensor(problem.forward(signed, None), dtype=torch.float64)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        """Recompute the window sums while streaming and box the per-window coefficients."""
        return fused_backward(ctx, grad_out, _gradients)


def _gradients(ctx, grad_out, need_f: bool, need_m: bool):
    """The gradients of FusedLNCC's f and m (numpy, None when not needed), scaled by `grad_out`."""
    problem = ctx.problem
    if ctx.want_map:
        d_f, d_m, _ = problem.backward(ctx.signed, batch_grad(grad_out, problem.shape).numpy(), need_f, need_m)
        return d_f, d_m
    if ctx.eager is not None:
        # Handed out once; a repeated backward (retain_graph) recomputes, bit for bit the same.
        d_f, d_m = ctx.eager
        ctx.eager = None
    else:
        d_f, d_m, _ = problem.backward(ctx.signed, 1.0, need_f, need_m)
    for d in (d_f, d_m):
        if d is not None:
            d *= float(grad_out)  # in place: no second copy of the gradient
    return d_f, d_m


def fused_map(f, m, mask, rad, boundary: str, signed: bool) -> torch.Tensor:
    """The per-voxel cc (or signed zncc) map, shaped like f, differentiable."""
    return FusedLNCC.apply(f, m, mask, tuple(rad), boundary, signed, True)


def fused_reduction(f, m, mask, rad, boundary: str, reduction: str, signed: bool = False) -> torch.Tensor:
    """Mean or sum of cc (or signed zncc) over voxels with a value, without writing the map; differentiable."""
    total = FusedLNCC.apply(f, m, mask, tuple(rad), boundary, signed, False)
    if reduction == "mean":
        count = f.numel() if mask is None else int(mask.sum())
        total = total / max(count, 1)
    return total
