"""Properties of the similarity operator that must hold for every image, found by hypothesis.

LNCC² and the local/global ZNCC are defined up to a global affine change of intensity; they are
symmetric in their two images; they are bounded; a box mask gives the same answer as cropping to the
box; and every box-filter engine computes the same numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from AutoRegisterLib.similarity import lncc, zncc, zncc_map

ENGINES = ("fft", "running_sum", "grouped_conv", "fused_cpu")
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def image_pairs(draw, min_side=4, max_side=9):
    """A small 2D or 3D fixed image and a moving image correlated with it to a random degree."""
    ndim = draw(st.sampled_from([2, 3]))
    shape = tuple(draw(st.integers(min_side, max_side if ndim == 3 else 2 * max_side)) for _ in range(ndim))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    fixed = rng.normal(size=shape)
    mix = draw(st.floats(-1.0, 1.0))
    moving = mix * fixed + (1 - abs(mix)) * rng.normal(size=shape)
    window = draw(st.sampled_from([3, 5, 7]))
    return fixed, moving, window


def unit_range(image) -> np.ndarray:
    """`image` as float64 scaled to [0, 1] (a constant image becomes 0)."""
    x = np.asarray(image, dtype=np.float64)
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def maps(fixed, moving, window, **kw):
    """The LNCC² and signed local ZNCC maps as numpy arrays."""
    cc = lncc(fixed, moving, window=window, reduction="none", **kw)
    z = zncc_map(fixed, moving, window=window, reduction="none", **kw)
    return np.asarray(cc, dtype=np.float64), np.asarray(z, dtype=np.float64)


@PROPERTY
@given(image_pairs(), st.floats(1e-3, 1e3), st.booleans(), st.floats(-1e4, 1e4))
def test_a_global_affine_change_of_intensity_changes_nothing_but_the_sign(pair, scale, negative, offset):
    fixed, moving, window = pair
    a = -scale if negative else scale
    cc, z = maps(fixed, moving, window)
    cc2, z2 = maps(fixed, a * moving + offset, window)
    np.testing.assert_allclose(cc2, cc, atol=1e-6)
    np.testing.assert_allclose(z2, np.sign(a) * z, atol=1e-6)
    assert float(zncc(fixed, a * moving + offset)) == pytest.approx(np.sign(a) * float(zncc(fixed, moving)), abs=1e-9)
    # and on the fixed side too
    cc3, z3 = maps(a * fixed + offset, moving, window)
    np.testing.assert_allclose(cc3, cc, atol=1e-6)
    np.testing.assert_allclose(z3, np.sign(a) * z, atol=1e-6)


@PROPERTY
@given(image_pairs())
def test_swapping_the_two_images_gives_the_same_maps(pair):
    fixed, moving, window = pair
    cc, z = maps(fixed, moving, window)
    cc_swapped, z_swapped = maps(moving, fixed, window)
    np.testing.assert_allclose(cc_swapped, cc, atol=1e-12)
    np.testing.assert_allclose(z_swapped, z, atol=1e-12)
    assert float(zncc(moving, fixed)) == pytest.approx(float(zncc(fixed, moving)), abs=1e-12)


@st.composite
def wild_pairs(draw):
    """Images with the value ranges hospitals produce: CT integers, uint8, huge offsets, near-flat areas."""
    fixed, moving, window = draw(image_pairs())
    kind = draw(st.sampled_from(["ct_int16", "uint8", "offset_float32", "flat_patch", "float64"]))
    if kind == "ct_int16":
        fixed = np.clip(fixed * 800 - 200, -1024, 3071).astype(np.int16)
        moving = np.clip(moving * 800 - 200, -1024, 3071).astype(np.int16)
    elif kind == "uint8":
        fixed = np.clip(fixed * 40 + 128, 0, 255).astype(np.uint8)
        moving = np.clip(moving * 40 + 128, 0, 255).astype(np.uint8)
    elif kind == "offset_float32":
        fixed = (fixed + 1e5).astype(np.float32)
        moving = (moving * 1e-3 + 7e4).astype(np.float32)
    elif kind == "flat_patch":
        fixed = fixed.copy()
        fixed[tuple(slice(0, max(1, n // 2)) for n in fixed.shape)] = 5.0
    mask = draw(st.one_of(st.none(), st.just("random")))
    if mask == "random":
        mask = np.random.default_rng(draw(st.integers(0, 1000))).random(fixed.shape) > 0.3
    return fixed, moving, window, mask


@PROPERTY
@given(wild_pairs())
def test_lncc_lies_in_0_1_and_zncc_in_minus_1_1_for_any_input(case):
    fixed, moving, window, mask = case
    cc, z = maps(fixed, moving, window, mask=mask)
    assert np.isfinite(cc).all() and np.isfinite(z).all()
    assert cc.min() >= 0.0 and cc.max() <= 1.0
    assert z.min() >= -1.0 and z.max() <= 1.0
    np.testing.assert_allclose(z * z, cc, atol=1e-6)  # the square of the signed map is LNCC²
    g = float(zncc(fixed, moving, mask=mask))
    assert -1.0 <= g <= 1.0
    assert 0.0 <= float(lncc(fixed, moving, window=window, mask=mask)) <= 1.0


@PROPERTY
@given(image_pairs(min_side=6, max_side=10), st.data())
def test_a_box_mask_gives_the_same_values_as_cropping_to_the_box(pair, data):
    fixed, moving, window = pair
    box = []
    for n in fixed.shape:
        lo = data.draw(st.integers(0, n - 3))
        box.append(slice(lo, data.draw(st.integers(lo + 3, n))))
    box = tuple(box)
    mask = np.zeros(fixed.shape, bool)
    mask[box] = True
    cc_masked, z_masked = maps(fixed, moving, window, mask=mask)
    cc_crop, z_crop = maps(fixed[box], moving[box], window)
    np.testing.assert_allclose(cc_masked[box], cc_crop, atol=1e-9)
    np.testing.assert_allclose(z_masked[box], z_crop, atol=1e-9)
    assert not cc_masked[~mask].any() and not z_masked[~mask].any()  # outside the mask: no value
    assert float(lncc(fixed, moving, window=window, mask=mask)) == pytest.approx(
        float(lncc(fixed[box], moving[box], window=window)), abs=1e-9)
    assert float(zncc(fixed, moving, mask=mask)) == pytest.approx(float(zncc(fixed[box], moving[box])), abs=1e-9)


@PROPERTY
@given(wild_pairs(), st.sampled_from(["valid", "zeros"]))
def test_every_engine_computes_the_same_maps_and_means(case, boundary):
    fixed, moving, window, mask = case
    if boundary == "zeros":
        # VoxelMorph's definition has no mask, and works on raw values with an absolute 1e-5: it is only
        # well conditioned on intensities scaled to [0, 1], as VoxelMorph's inputs are (see lncc's docstring).
        mask = None
        fixed, moving = unit_range(fixed), unit_range(moving)
    reference = None
    for engine in ENGINES:
        cc, z = maps(fixed, moving, window, mask=mask, boundary=boundary, engine=engine)
        mean = float(lncc(fixed, moving, window=window, mask=mask, boundary=boundary, engine=engine))
        if reference is None:
            reference = (engine, cc, z, mean)
            continue
        name, cc0, z0, mean0 = reference
        np.testing.assert_allclose(cc, cc0, atol=1e-5, err_msg=f"{engine} vs {name} (lncc)")
        np.testing.assert_allclose(z, z0, atol=1e-5, err_msg=f"{engine} vs {name} (zncc_map)")
        assert mean == pytest.approx(mean0, abs=1e-6), f"{engine} vs {name} (mean)"


def test_the_engines_under_test_can_all_run_here():
    fixed = torch.randn(6, 7, 8, dtype=torch.float64)
    for engine in ENGINES:
        assert lncc(fixed, fixed, window=3, engine=engine) == pytest.approx(1.0, abs=1e-9)
