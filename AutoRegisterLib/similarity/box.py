"""Box filters: the sum of a centred (2r+1)-wide window around every voxel, with zero padding.

Zero padding makes the box sum over a window clipped to the image, which is exactly what ANTs' "valid"
neighbourhoods need, and a box with a symmetric window is its own adjoint. Every engine here is a
differentiable torch function of tensors shaped (..., *spatial); callers run them in float64, because
local variances are small differences of large sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf

#: Engines that filter with torch operations (the fused engines live in their own modules).
TORCH_ENGINES = ("fft", "running_sum", "grouped_conv")


def box_running_sum(x: torch.Tensor, radii: tuple[int, ...]) -> torch.Tensor:
    """Separable box sum from prefix sums along each axis (exact to rounding in float64)."""
    k = len(radii)
    for axis, r in zip(range(x.ndim - k, x.ndim), radii):
        if r == 0:
            continue
        n = x.shape[axis]
        pad_shape = list(x.shape)
        pad_shape[axis] = 1
        c = torch.cat([x.new_zeros(pad_shape), torch.cumsum(x, dim=axis)], dim=axis)
        idx = torch.arange(n, device=x.device)
        hi = (idx + r + 1).clamp(max=n)
        lo = (idx - r).clamp(min=0)
        x = c.index_select(axis, hi) - c.index_select(axis, lo)
    return x


def _fast_size(n: int) -> int:
    """The smallest 2·3·5-smooth integer >= n (FFT sizes that pocketfft and cuFFT handle fastest)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def box_fft(x: torch.Tensor, radii: tuple[int, ...]) -> torch.Tensor:
    """Box sum as one batched FFT correlation of all leading slices with a shared ones kernel."""
    k = len(radii)
    spatial = x.shape[-k:]
    sizes = [_fast_size(n + 2 * r) for n, r in zip(spatial, radii)]
    dims = tuple(range(-k, 0))
    kernel = x.new_zeros(sizes)
    kernel[tuple(slice(0, 2 * r + 1) for r in radii)] = 1.0
    spectrum = torch.fft.rfftn(x, s=sizes, dim=dims) * torch.fft.rfftn(kernel, s=sizes, dim=dims)
    full = torch.fft.irfftn(spectrum, s=sizes, dim=dims)
    # The linear convolution of a ones box starting at 0 is centred on voxel i at index i + r.
    return full[(...,) + tuple(slice(r, r + n) for n, r in zip(spatial, radii))]


def box_grouped_conv(x: torch.Tensor, radii: tuple[int, ...]) -> torch.Tensor:
    """FastLNCC's box: one grouped convolution over all leading slices stacked as channels."""
    k = len(radii)
    spatial = x.shape[-k:]
    lead = x.shape[:-k]
    channels = 1
    for s in lead:
        channels *= s
    conv = {1: nnf.conv1d, 2: nnf.conv2d, 3: nnf.conv3d}[k]
    weight = x.new_ones((channels, 1) + tuple(2 * r + 1 for r in radii))
    y = conv(x.reshape(1, channels, *spatial), weight, padding=tuple(radii), groups=channels)
    return y.reshape(*lead, *spatial)


_BOXES = {"fft": box_fft, "running_sum": box_running_sum, "grouped_conv": box_grouped_conv}


def box_filter(x: torch.Tensor, radii: tuple[int, ...], engine: str = "running_sum") -> torch.Tensor:
    """Zero-padded box sum over the last len(radii) axes of `x` with the named torch engine."""
    try:
        return _BOXES[engine](x, tuple(radii))
    except KeyError:
        raise ValueError(f"unknown box engine {engine!r}; choose one of {', '.join(TORCH_ENGINES)}") from None


def window_counts(spatial: tuple[int, ...], radii: tuple[int, ...], device, dtype=torch.float64) -> torch.Tensor:
    """How many in-image voxels each clipped window holds (an outer product of 1D counts)."""
    n = None
    for axis, (size, r) in enumerate(zip(spatial, radii)):
        idx = torch.arange(size, device=device)
        c = ((idx + r).clamp(max=size - 1) - (idx - r).clamp(min=0) + 1).to(dtype)
        shape = [1] * len(spatial)
        shape[axis] = size
        c = c.reshape(shape)
        n = c if n is None else n * c
    return n
