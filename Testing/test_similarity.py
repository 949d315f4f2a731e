"""Specification of the similarity operator: LNCC², local and global ZNCC, Mattes MI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from AutoRegisterLib.similarity import (
    FLAT_VARIANCE,
    STD_FLOOR,
    LNCCLoss,
    lncc,
    local_std,
    mutual_information,
    zncc,
    zncc_map,
)

TORCH_ENGINES = ["fft", "running_sum", "grouped_conv"]
try:
    import numba  # noqa: F401

    CPU_ENGINES = TORCH_ENGINES + ["fused_cpu", "auto"]
    FUSED_OR_FFT = "fused_cpu"
except ImportError:  # the fused CPU engine needs the [fast] extra
    CPU_ENGINES = TORCH_ENGINES + ["auto"]
    FUSED_OR_FFT = "fft"


# ----------------------------------------------------------------------------------------------------
# An independent float64 reference: scipy's correlate with a ones kernel, on centred, scaled values.
# ----------------------------------------------------------------------------------------------------
def reference_maps(fixed, moving, window=9, mask=None):
    """cc and signed zncc maps in float64 with the documented valid-boundary and flat-window rules."""
    f = np.asarray(fixed, dtype=np.float64)
    m = np.asarray(moving, dtype=np.float64)
    w = np.ones_like(f) if mask is None else np.asarray(mask, dtype=bool).astype(np.float64)
    inside = w > 0

    def standardize(x):
        mean = x[inside].mean()
        std = x[inside].std()
        return (x - mean) / (std if std > 0 else 1.0) * w

    f, m = standardize(f), standardize(m)
    ones = np.ones((window,) * f.ndim)

    def box(x):
        return ndimage.correlate(x, ones, mode="constant", cval=0.0)

    n = box(w)
    n_safe = np.where(n > 0, n, 1)
    sf, sm = box(f), box(m)
    cross = box(f * m) - sf * sm / n_safe
    vf = box(f * f) - sf * sf / n_safe
    vm = box(m * m) - sm * sm / n_safe
    ok = inside & (vf > FLAT_VARIANCE * n) & (vm > FLAT_VARIANCE * n)
    den = np.where(ok, vf * vm, 1.0)
    cc = np.clip(np.where(ok, cross**2 / den, 0.0), 0, 1)
    signed = np.clip(np.where(ok, cross / np.sqrt(den), 0.0), -1, 1)
    return cc, signed


def voxelmorph_ncc(y_true: torch.Tensor, y_pred: torch.Tensor, win: int = 9) -> torch.Tensor:
    """VoxelMorph's NCC loss (voxelmorph/torch/losses.py), five conv3d calls, re-implemented verbatim."""
    sum_filt = torch.ones([1, 1, win, win, win], dtype=y_true.dtype)
    pad = win // 2
    I, J = y_true, y_pred  # noqa: E741 -- upstream names, kept so the copy can be checked line by line
    I2, J2, IJ = I * I, J * J, I * J
    conv = torch.nn.functional.conv3d
    I_sum = conv(I, sum_filt, stride=1, padding=pad)
    J_sum = conv(J, sum_filt, stride=1, padding=pad)
    I2_sum = conv(I2, sum_filt, stride=1, padding=pad)
    J2_sum = conv(J2, sum_filt, stride=1, padding=pad)
    IJ_sum = conv(IJ, sum_filt, stride=1, padding=pad)
    win_size = win**3
    u_I = I_sum / win_size
    u_J = J_sum / win_size
    cross = IJ_sum - u_J * I_sum - u_I * J_sum + u_I * u_J * win_size
    I_var = I2_sum - 2 * u_I * I_sum + u_I * u_I * win_size
    J_var = J2_sum - 2 * u_J * J_sum + u_J * u_J * win_size
    cc = cross * cross / (I_var * J_var + 1e-5)
    return -torch.mean(cc)


def smooth_pair(shape, seed=0, noise=0.4):
    """A smooth random image and a noisy, slightly different partner (float64)."""
    rng = np.random.default_rng(seed)
    f = ndimage.gaussian_filter(rng.normal(size=shape), 1.5)
    m = 0.7 * f + noise * ndimage.gaussian_filter(rng.normal(size=shape), 1.0)
    return f, m


def ct_like(shape, seed=0):
    """An int16 CT-like volume: air at −1024, soft tissue around 40 HU with noise, bone up to 3071."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    r = np.sqrt(zz**2 + yy**2 + xx**2)
    img = np.full(shape, -1024.0)
    img[r < 0.8] = 40 + 15 * rng.normal(size=int((r < 0.8).sum()))
    shell = (r > 0.62) & (r < 0.72)
    img[shell] = 1500 + 1500 * ndimage.gaussian_filter(rng.uniform(size=shape), 1)[shell]
    return np.clip(np.round(img), -1024, 3071).astype(np.int16)


# ----------------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------------
def test_identical_images_correlate_perfectly():
    f, _ = smooth_pair((12, 14, 16))
    assert float(lncc(f, f)) == pytest.approx(1.0, abs=1e-9)
    assert torch.allclose(zncc_map(f, f), torch.ones((), dtype=torch.float64), atol=1e-9)


def test_negated_image_has_cc_one_and_zncc_minus_one():
    f, _ = smooth_pair((10, 12, 14))
    assert float(lncc(f, -f)) == pytest.approx(1.0, abs=1e-9)
    assert float(zncc_map(f, -f, reduction="mean")) == pytest.approx(-1.0, abs=1e-9)
    assert float(zncc(f, -f)) == pytest.approx(-1.0, abs=1e-12)


@pytest.mark.parametrize("engine", CPU_ENGINES)
def test_every_engine_matches_the_float64_reference_map(engine):
    f, m = smooth_pair((11, 13, 15), seed=1)
    ref_cc, ref_signed = reference_maps(f, m, window=5)
    cc = lncc(f, m, window=5, reduction="none", engine=engine).numpy()
    signed = zncc_map(f, m, window=5, engine=engine).numpy()
    assert cc.shape == f.shape
    assert np.abs(cc - ref_cc).max() < 1e-9
    assert np.abs(signed - ref_signed).max() < 1e-9


@pytest.mark.parametrize("engine", CPU_ENGINES)
def test_masked_map_matches_the_reference_and_is_zero_outside(engine):
    f, m = smooth_pair((12, 12, 12), seed=2)
    mask = ndimage.binary_dilation(np.random.default_rng(3).uniform(size=f.shape) > 0.7, iterations=1)
    ref_cc, ref_signed = reference_maps(f, m, window=5, mask=mask)
    cc = lncc(f, m, window=5, mask=mask, reduction="none", engine=engine).numpy()
    assert np.abs(cc - ref_cc).max() < 1e-9
    assert np.all(cc[~mask] == 0)
    mean = float(lncc(f, m, window=5, mask=mask, engine=engine))
    assert mean == pytest.approx(ref_cc[mask].mean(), abs=1e-9)
    # The fused engine reduces the signed map on the fly: the same numbers as reducing the written map.
    signed_mean = float(zncc_map(f, m, window=5, mask=mask, reduction="mean", engine=engine))
    assert signed_mean == pytest.approx(ref_signed[mask].mean(), abs=1e-9)
    signed_sum = float(zncc_map(f, m, window=5, mask=mask, reduction="sum", engine=engine))
    assert signed_sum == pytest.approx(ref_signed[mask].sum(), abs=1e-7)


@pytest.mark.parametrize("engine", CPU_ENGINES)
def test_box_mask_gives_the_same_result_as_cropping(engine):
    f, m = smooth_pair((16, 18, 20), seed=4)
    box = (slice(3, 13), slice(2, 15), slice(5, 17))
    mask = np.zeros(f.shape, bool)
    mask[box] = True
    masked_map = lncc(f, m, window=7, mask=mask, reduction="none", engine=engine).numpy()
    cropped_map = lncc(f[box], m[box], window=7, reduction="none", engine=engine).numpy()
    np.testing.assert_allclose(masked_map[box], cropped_map, atol=1e-6)
    assert float(lncc(f, m, window=7, mask=mask, engine=engine)) == pytest.approx(
        float(lncc(f[box], m[box], window=7, engine=engine)), abs=1e-6
    )
    assert float(lncc(f, m, window=7, mask=mask, reduction="sum", engine=engine)) == pytest.approx(
        cropped_map.sum(), rel=1e-6
    )


@settings(max_examples=30, deadline=None)
@given(
    shape=st.tuples(st.integers(1, 7), st.integers(1, 8), st.integers(1, 9)),
    window=st.sampled_from([1, 3, 5, 9]),
    seed=st.integers(0, 2**31 - 1),
    masked=st.booleans(),
    offset=st.sampled_from([0.0, 1e4, -3e6]),
)
def test_fused_and_running_sum_engines_agree_on_any_small_volume(shape, window, seed, masked, offset):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=shape) * rng.uniform(0.1, 100) + offset
    m = np.round(rng.normal(size=shape) * 50) + offset  # integer steps: flat windows happen
    mask = rng.uniform(size=shape) > 0.3 if masked else None
    for boundary in ("valid", "zeros"):
        if boundary == "zeros" and offset:
            continue  # VoxelMorph's raw formula is not offset-invariant; that is its definition
        kw = dict(window=window, mask=mask, reduction="none", boundary=boundary)
        ref = lncc(f, m, engine="running_sum", **kw)
        got = lncc(f, m, engine=FUSED_OR_FFT, **kw)
        assert torch.isfinite(got).all() and got.min() >= 0 and got.max() <= 1
        assert torch.abs(got - ref).max() <= 1e-6


def test_cc_is_invariant_to_a_global_affine_change_of_intensity():
    f, m = smooth_pair((10, 12, 14), seed=5)
    base = lncc(f, m, window=5, reduction="none")
    changed = lncc(1e-3 * f + 7e3, -250.0 * m - 3e4, window=5, reduction="none")
    assert torch.abs(base.float() - changed.float()).max() < 1e-4


@pytest.mark.parametrize("engine", CPU_ENGINES)
def test_raw_int16_ct_matches_float64_to_1e_4(engine):
    ct = ct_like((24, 28, 26))
    moving = np.roll(ct, 1, axis=2)
    ref_cc, _ = reference_maps(ct, moving, window=9)
    cc = lncc(torch.from_numpy(ct), torch.from_numpy(moving), reduction="none", engine=engine)
    assert cc.dtype == torch.float32
    assert np.abs(cc.numpy() - ref_cc).max() <= 1e-4


def test_mr_with_a_large_offset_in_float32_matches_float64_to_1e_4():
    f, m = smooth_pair((20, 22, 24), seed=6)
    f32 = (300 * f + 1e5).astype(np.float32)
    m32 = (200 * m + 1e5).astype(np.float32)
    ref_cc, _ = reference_maps(f32, m32, window=9)
    cc = lncc(torch.from_numpy(f32), torch.from_numpy(m32), reduction="none")
    assert np.abs(cc.numpy() - ref_cc).max() <= 1e-4


@pytest.mark.parametrize(
    "dtype", [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float16, np.float32, np.float64]
)
def test_every_input_dtype_gives_the_float64_answer_without_overflow(dtype):
    rng = np.random.default_rng(7)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    lo, hi = (info.min, info.max) if info is not None and info.bits <= 16 else (-2000, 2000)
    base = ndimage.gaussian_filter(rng.uniform(size=(10, 11, 12)), 1.0)
    base = (base - base.min()) / np.ptp(base)
    f = (lo + base * (hi - lo)).astype(dtype)
    m = (lo + np.roll(base, 2, axis=0) * (hi - lo)).astype(dtype)
    cc = lncc(f, m, window=5, reduction="none")
    ref_cc, _ = reference_maps(f.astype(np.float64), m.astype(np.float64), window=5)
    assert torch.isfinite(cc).all()
    assert np.abs(cc.numpy().astype(np.float64) - ref_cc).max() <= 1e-4
    assert cc.dtype == (torch.float64 if dtype in (np.int32, np.float64) else torch.float32)


def test_flat_windows_get_zero_and_nothing_is_nan_or_out_of_range():
    f, m = smooth_pair((12, 12, 12), seed=8)
    f[:, :, :6] = 5.0  # a flat half
    constant = np.full_like(f, 3.0)
    cc = lncc(f, m, window=3, reduction="none").numpy()
    assert np.all(cc[:, :, :4] == 0)
    assert np.all(cc[:, :, 7:] > 0)
    for a, b in [(f, m), (constant, m), (constant, constant), (np.zeros_like(f), np.zeros_like(f))]:
        for boundary in ("valid", "zeros"):
            cc = lncc(a, b, window=3, reduction="none", boundary=boundary)
            assert torch.isfinite(cc).all() and cc.min() >= 0 and cc.max() <= 1
            z = zncc_map(a, b, window=3, boundary=boundary)
            assert torch.isfinite(z).all() and z.min() >= -1 and z.max() <= 1
    assert float(lncc(constant, m)) == 0.0
    assert float(zncc(constant, m)) == 0.0


def test_nearly_flat_noise_far_below_the_image_contrast_counts_as_flat():
    f, m = smooth_pair((12, 12, 12), seed=9)
    f[:6] = 1e-5 * np.random.default_rng(0).normal(size=f[:6].shape)  # std 1e-5 of a unit-std image
    cc = lncc(f, m, window=3, reduction="none").numpy()
    assert np.all(cc[:4] == 0)


# ----------------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------------
def test_2d_images_keep_their_shape_and_match_the_reference():
    f, m = smooth_pair((30, 34), seed=10)
    cc = lncc(f, m, window=7, reduction="none")
    assert cc.shape == (30, 34)
    ref_cc, _ = reference_maps(f, m, window=7)
    assert np.abs(cc.numpy() - ref_cc).max() < 1e-9


@pytest.mark.parametrize("spatial", [(9, 10, 11), (20, 21)])
def test_batches_are_scored_item_by_item(spatial):
    pairs = [smooth_pair(spatial, seed=s) for s in range(3)]
    fixed = torch.tensor(np.stack([p[0] for p in pairs])[:, None])
    moving = torch.tensor(np.stack([p[1] for p in pairs])[:, None])
    cc = lncc(fixed, moving, window=5, reduction="none")
    assert cc.shape == fixed.shape
    for i, (f, m) in enumerate(pairs):
        np.testing.assert_allclose(cc[i, 0].numpy(), lncc(f, m, window=5, reduction="none").numpy(), atol=1e-9)
    assert float(lncc(fixed, moving, window=5)) == pytest.approx(float(cc.mean()), abs=1e-12)


def test_a_window_larger_than_the_image_clips_to_the_whole_image():
    f, m = smooth_pair((4, 5, 6), seed=11)
    cc = lncc(f, m, window=15, reduction="none")
    assert torch.allclose(cc, (zncc(f, m) ** 2).expand_as(cc), atol=1e-9)


def test_bad_arguments_are_refused_with_clear_messages():
    f, m = smooth_pair((6, 6, 6))
    with pytest.raises(ValueError, match="odd"):
        lncc(f, m, window=4)
    with pytest.raises(ValueError, match="reduction"):
        lncc(f, m, reduction="max")
    with pytest.raises(ValueError, match="boundary"):
        lncc(f, m, boundary="reflect")
    with pytest.raises(ValueError, match="engine"):
        lncc(f, m, engine="magic")
    with pytest.raises(ValueError, match="same shape"):
        lncc(f, m[:5])
    with pytest.raises(ValueError, match="mask shape"):
        lncc(f, m, mask=np.ones((5, 6, 6)))
    with pytest.raises(TypeError, match="complex|dtype"):
        lncc(f.astype(np.complex64), m)


# ----------------------------------------------------------------------------------------------------
# VoxelMorph compatibility and the loss module
# ----------------------------------------------------------------------------------------------------
def test_zeros_boundary_matches_voxelmorph_ncc_to_1e_5():
    rng = np.random.default_rng(12)
    f = torch.tensor(ndimage.gaussian_filter(rng.uniform(size=(1, 1, 18, 20, 22)), (0, 0, 1, 1, 1)))
    m = torch.tensor(ndimage.gaussian_filter(rng.uniform(size=(1, 1, 18, 20, 22)), (0, 0, 1, 1, 1)))
    f = (f - f.min()) / (f.max() - f.min())
    m = 0.5 * f + 0.5 * (m - m.min()) / (m.max() - m.min())
    expected = voxelmorph_ncc(f.float(), m.float())
    for engine in CPU_ENGINES:
        ours = LNCCLoss(window=9, boundary="zeros", engine=engine)(m.float(), f.float())
        assert float(ours) == pytest.approx(float(expected), abs=1e-5)
        assert float(ours) == pytest.approx(float(voxelmorph_ncc(f, m)), abs=1e-7)  # float32 output


def test_lncc_loss_is_minus_the_mean_cc_and_validates_its_arguments():
    f, m = smooth_pair((8, 9, 10))
    ft, mt = torch.tensor(f)[None, None], torch.tensor(m)[None, None]
    assert float(LNCCLoss(window=5)(mt, ft)) == pytest.approx(-float(lncc(ft, mt, window=5)), abs=1e-12)
    with pytest.raises(ValueError, match="odd"):
        LNCCLoss(window=8)
    with pytest.raises(TypeError, match="window"):
        LNCCLoss(window=2.5)
    with pytest.raises(ValueError, match="reduction"):
        LNCCLoss(reduction="avg")
    with pytest.raises(ValueError, match="boundary"):
        LNCCLoss(boundary="same")
    assert "window=5" in repr(LNCCLoss(window=5))


# ----------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", [e for e in CPU_ENGINES if e in ("running_sum", "fused_cpu")])
@pytest.mark.parametrize("boundary", ["valid", "zeros"])
def test_lncc_and_zncc_map_pass_gradcheck_in_float64(boundary, engine):
    f, m = smooth_pair((4, 5, 6), seed=13)
    ft = torch.tensor(f, requires_grad=True)
    mt = torch.tensor(m, requires_grad=True)
    mask = np.ones(f.shape, bool)
    mask[0] = False
    mask[2, 3] = False
    kw = dict(window=3, boundary=boundary, engine=engine)
    assert torch.autograd.gradcheck(lambda a, b: lncc(a, b, **kw), (ft, mt))
    # fast_mode checks random projections of the full Jacobian: the same test, far fewer kernel calls.
    assert torch.autograd.gradcheck(
        lambda a, b: lncc(a, b, mask=mask, reduction="none", **kw), (ft, mt), fast_mode=True
    )
    assert torch.autograd.gradcheck(lambda a, b: zncc_map(a, b, mask=mask, reduction="sum", **kw), (ft, mt))
    assert torch.autograd.gradcheck(lambda a: lncc(a, mt.detach(), mask=mask, **kw), (ft,))


@pytest.mark.parametrize("engine", CPU_ENGINES)
def test_every_engine_has_the_float64_gradient(engine):
    f, m = smooth_pair((9, 10, 11), seed=14)
    mask = np.ones(f.shape, bool)
    mask[:, :2] = False

    def grads(eng, dtype):
        ft = torch.tensor(f, dtype=dtype, requires_grad=True)
        mt = torch.tensor(m, dtype=dtype, requires_grad=True)
        lncc(ft, mt, window=5, mask=mask, engine=eng).backward()
        return ft.grad.double(), mt.grad.double()

    ref_f, ref_m = grads("running_sum", torch.float64)
    got_f, got_m = grads(engine, torch.float32)
    assert (got_f - ref_f).norm() / ref_f.norm() < 1e-3
    assert (got_m - ref_m).norm() / ref_m.norm() < 1e-3


# ----------------------------------------------------------------------------------------------------
# Global ZNCC and mutual information
# ----------------------------------------------------------------------------------------------------
def test_global_zncc_matches_pearson_and_does_not_overflow_on_int16():
    f = ct_like((16, 16, 16), seed=1)
    m = ct_like((16, 16, 16), seed=2)
    expected = np.corrcoef(f.astype(np.float64).ravel(), m.astype(np.float64).ravel())[0, 1]
    assert float(zncc(f, m)) == pytest.approx(expected, abs=1e-12)
    big = np.full((8, 8, 8), 32767, np.int16)
    big[::2] = -32768
    assert float(zncc(big, big)) == pytest.approx(1.0, abs=1e-12)


def test_global_zncc_respects_the_mask_and_returns_one_value_per_batch_item():
    f, m = smooth_pair((8, 8, 8), seed=15)
    mask = np.zeros(f.shape, bool)
    mask[2:6] = True
    expected = np.corrcoef(f[mask], m[mask])[0, 1]
    assert float(zncc(f, m, mask=mask)) == pytest.approx(expected, abs=1e-12)
    batched = zncc(np.stack([f, -f])[:, None], np.stack([m, m])[:, None])
    assert batched.shape == (2, 1)
    assert float(batched[1, 0]) == pytest.approx(-float(zncc(f, m)), abs=1e-12)


def test_mutual_information_ranks_dependence_and_ignores_intensity_scale():
    f, m = smooth_pair((16, 16, 16), seed=16)
    independent = np.random.default_rng(1).permutation(m.ravel()).reshape(m.shape)
    mi_same = float(mutual_information(f, f))
    mi_related = float(mutual_information(f, m))
    mi_independent = float(mutual_information(f, independent))
    assert mi_same > mi_related > mi_independent >= 0
    assert float(mutual_information(f, 1000 * m + 5)) == pytest.approx(mi_related, abs=1e-9)
    assert float(mutual_information(f, -m)) == pytest.approx(mi_related, rel=0.05)
    assert float(mutual_information(f, np.ones_like(f))) == 0.0


def test_mutual_information_uses_only_voxels_inside_the_mask():
    f, m = smooth_pair((12, 12, 12), seed=17)
    noise = np.random.default_rng(2).normal(size=m.shape)
    corrupted = m.copy()
    corrupted[:6] = noise[:6]
    mask = np.zeros(f.shape, bool)
    mask[6:] = True
    assert float(mutual_information(f, corrupted, mask=mask)) == pytest.approx(
        float(mutual_information(f[6:], m[6:])), abs=1e-9
    )


# ----------------------------------------------------------------------------------------------------
# Local standard deviation
# ----------------------------------------------------------------------------------------------------
def reference_local_std(image, window):
    """Population std of every clipped window, by brute force in float64."""
    x = np.asarray(image, dtype=np.float64)
    r = window // 2
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape):
        region = x[tuple(slice(max(0, i - r), i + r + 1) for i in idx)]
        out[idx] = region.std()
    return out


def test_local_std_matches_brute_force_on_raw_int16_ct():
    ct = ct_like((10, 12, 11), seed=3)
    got = local_std(torch.from_numpy(ct), window=5)
    assert got.dtype == torch.float32 and got.shape == ct.shape
    np.testing.assert_allclose(got.numpy(), reference_local_std(ct, 5), rtol=1e-5, atol=1e-2)


def test_local_std_scales_with_the_image_and_ignores_offsets():
    f, _ = smooth_pair((8, 9, 10), seed=4)
    base = local_std(f, window=3)
    np.testing.assert_allclose(local_std(-250.0 * f + 1e6, window=3).numpy(), 250.0 * base.numpy(), rtol=1e-6)


def test_local_std_of_a_flat_region_is_the_documented_floor():
    f, _ = smooth_pair((8, 8, 8), seed=5)
    f[:, :, :4] = 7.0
    std = local_std(f, window=3).numpy()
    assert np.all(np.isfinite(std))
    np.testing.assert_allclose(std[:, :, :2], STD_FLOOR * f.std(), rtol=1e-3)


def test_local_std_keeps_2d_and_batched_shapes():
    img = np.random.default_rng(6).normal(size=(2, 1, 12, 13))
    std = local_std(torch.tensor(img), window=3)
    assert std.shape == img.shape
    np.testing.assert_allclose(std[1, 0].numpy(), reference_local_std(img[1, 0], 3), rtol=1e-9)


def test_local_std_passes_gradcheck_in_float64():
    f, _ = smooth_pair((4, 5, 6), seed=7)
    x = torch.tensor(f, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: local_std(a, window=3), (x,))
    x2 = torch.tensor(np.random.default_rng(8).normal(size=(1, 2, 6, 7)), requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: local_std(a, window=(3, 5)), (x2,))


# ----------------------------------------------------------------------------------------------------
# CUDA (skipped where there is no GPU or no CuPy)
# ----------------------------------------------------------------------------------------------------
def _cuda_ready():
    from AutoRegisterLib.similarity import _fused_cuda

    return _fused_cuda.available()


needs_cupy = pytest.mark.skipif(not _cuda_ready()[0], reason=f"CUDA engine unavailable: {_cuda_ready()[1]}")


def test_forcing_an_engine_that_cannot_run_here_says_why():
    f, m = smooth_pair((6, 6, 6))
    if not _cuda_ready()[0]:
        with pytest.raises(RuntimeError, match="cupy"):
            lncc(f, m, engine="cupy")
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CPU"):
            lncc(torch.tensor(f).cuda(), torch.tensor(m).cuda(), engine="fused_cpu")


@pytest.mark.cuda
@needs_cupy
@pytest.mark.parametrize("boundary", ["valid", "zeros"])
def test_cupy_engine_matches_the_cpu_map_and_gradients(boundary):
    f, m = smooth_pair((12, 13, 14), seed=9)
    mask = np.ones(f.shape, bool)
    mask[:, :3] = False
    cpu = lncc(f, m, window=5, mask=mask, reduction="none", boundary=boundary, engine="running_sum")
    ft = torch.tensor(f, device="cuda", requires_grad=True)
    mt = torch.tensor(m, device="cuda", requires_grad=True)
    gpu = lncc(ft, mt, window=5, mask=torch.tensor(mask, device="cuda"), reduction="none", boundary=boundary,
               engine="cupy")
    assert torch.abs(gpu.cpu() - cpu).max() < 1e-9
    gpu.sum().backward()
    fc = torch.tensor(f, requires_grad=True)
    mc = torch.tensor(m, requires_grad=True)
    lncc(fc, mc, window=5, mask=mask, reduction="none", boundary=boundary, engine="running_sum").sum().backward()
    assert torch.allclose(ft.grad.cpu(), fc.grad, atol=1e-9)
    assert torch.allclose(mt.grad.cpu(), mc.grad, atol=1e-9)


@pytest.mark.cuda
@needs_cupy
def test_local_std_on_cuda_matches_cpu_and_passes_gradcheck():
    f, _ = smooth_pair((4, 5, 6), seed=10)
    x = torch.tensor(f, device="cuda", requires_grad=True)
    assert torch.allclose(local_std(x, window=3).cpu(), local_std(f, window=3), atol=1e-12)
    assert torch.autograd.gradcheck(lambda a: local_std(a, window=3), (x,))


@pytest.mark.skipif(FUSED_OR_FFT != "fused_cpu", reason="the fused CPU engine needs numba")
def test_the_fused_engine_leaves_numba_thread_settings_as_it_found_them():
    import numba

    before = numba.get_num_threads()
    f, m = smooth_pair((40, 40, 48), seed=11)  # large enough to run in parallel
    mt = torch.tensor(m, requires_grad=True)
    lncc(f, mt, engine="fused_cpu").backward()
    assert numba.get_num_threads() == before
    assert numba.get_parallel_chunksize() == 0
