"""The image type and every conversion keep voxels, voxel types and LPS geometry, oblique included."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from AutoRegisterLib.errors import InputError
from AutoRegisterLib.image import (
    Image,
    from_ants,
    from_itk,
    from_numpy,
    from_sitk,
    read_image,
    to_ants,
    to_itk,
    to_sitk,
    write_image,
)


def oblique_direction(dim: int) -> np.ndarray:
    """A rotation that is not axis-aligned (about 20°, 10° and 30°), with a flip to make it LPS-like."""
    if dim == 2:
        a = np.deg2rad(25.0)
        return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]) @ np.diag([-1.0, 1.0])
    euler = sitk.Euler3DTransform()
    euler.SetRotation(*np.deg2rad([20.0, 10.0, 30.0]))
    return np.array(euler.GetMatrix()).reshape(3, 3) @ np.diag([-1.0, -1.0, 1.0])


def oblique_image(dtype=np.int16, dim: int = 3) -> Image:
    """A small anisotropic image with distinct values per voxel and an oblique direction."""
    shape = (5, 6, 7)[-dim:] if dim == 3 else (6, 7)
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    if info is not None:
        lo, hi = max(info.min, -3000), min(info.max, 3000)
        arr = rng.integers(lo, hi, size=shape).astype(dtype)
    else:
        arr = rng.normal(size=shape).astype(dtype)
    spacing = (0.9, 1.3, 2.5)[:dim]
    origin = (-12.5, 40.25, 7.0)[:dim]
    return Image(arr, spacing, origin, oblique_direction(dim))


def assert_same_image(a: Image, b: Image, check_dtype: bool = True, atol: float = 1e-5):
    """Equal voxels (and type) and equal geometry."""
    assert a.array.shape == b.array.shape
    if check_dtype:
        assert a.array.dtype == b.array.dtype
    np.testing.assert_allclose(a.array.astype(np.float64), b.array.astype(np.float64), atol=1e-4)
    np.testing.assert_allclose(a.spacing_mm, b.spacing_mm, atol=atol)
    np.testing.assert_allclose(a.origin_mm, b.origin_mm, atol=atol)
    np.testing.assert_allclose(a.direction, b.direction, atol=atol)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("dim", [2, 3])
def test_simpleitk_round_trip_keeps_voxels_type_and_oblique_geometry(dtype, dim):
    img = oblique_image(dtype, dim)
    assert_same_image(from_sitk(to_sitk(img)), img)


def test_simpleitk_image_places_each_voxel_where_the_image_type_says():
    img = oblique_image(np.int16)
    s = to_sitk(img)
    index_xyz = (3, 1, 4)
    assert np.allclose(s.TransformIndexToPhysicalPoint(index_xyz), img.physical_points(np.array([index_xyz]))[0])
    # The array is in (z, y, x) order: index (x, y, z) is array[z, y, x].
    assert s[index_xyz] == img.array[4, 1, 3]


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
@pytest.mark.parametrize("dim", [2, 3])
def test_itk_round_trip_keeps_voxels_type_and_oblique_geometry(dtype, dim):
    img = oblique_image(dtype, dim)
    assert_same_image(from_itk(to_itk(img)), img)


@pytest.mark.parametrize("dim", [2, 3])
def test_ants_round_trip_keeps_voxels_and_oblique_geometry(dim):
    img = oblique_image(np.float32, dim)
    assert_same_image(from_ants(to_ants(img)), img)


def test_ants_image_puts_each_voxel_at_the_same_physical_point():
    import ants

    img = oblique_image(np.float32)
    a = to_ants(img)
    index_xyz = (3, 1, 4)
    point = ants.transform_index_to_physical_point(a, index_xyz)
    assert np.allclose(point, img.physical_points(np.array([index_xyz]))[0], atol=1e-4)
    # antspyx arrays are (x, y, z): the same voxel, transposed.
    assert a.numpy()[3, 1, 4] == pytest.approx(float(img.array[4, 1, 3]))


def test_ants_conversion_of_an_integer_image_is_exact_in_float():
    img = oblique_image(np.int16)
    back = from_ants(to_ants(img))
    assert back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array.astype(np.int16), img.array)


def test_numpy_wrap_defaults_to_unit_spacing_zero_origin_and_identity():
    arr = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    img = from_numpy(arr)
    assert img.spacing_mm == (1.0, 1.0, 1.0) and img.origin_mm == (0.0, 0.0, 0.0)
    assert np.array_equal(img.direction, np.eye(3)) and img.array.dtype == np.int16
    assert img.size == (4, 3, 2)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_file_round_trip_keeps_voxels_type_and_oblique_geometry(tmp_path, suffix, dtype):
    img = oblique_image(dtype)
    path = tmp_path / f"img{suffix}"
    write_image(img, path)
    # NIfTI stores the direction as a float32 quaternion: close, not bit-exact.
    assert_same_image(read_image(path), img, atol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_file_round_trip_of_a_2d_image(tmp_path):
    img = oblique_image(np.uint16, dim=2)
    path = tmp_path / "slice.mha"
    write_image(img, path)
    assert_same_image(read_image(path), img)


def test_dicom_series_written_slice_by_slice_reads_back_as_one_volume(tmp_path):
    img = Image(oblique_image(np.int16).array, (0.8, 0.8, 2.0), (-10.0, 20.0, 30.0), np.eye(3))
    vol = to_sitk(img)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(vol.GetDepth()):
        sl = vol[:, :, z]
        sl.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1")  # one series
        sl.SetMetaData("0020|0032", "\\".join(f"{v:.4f}" for v in vol.TransformIndexToPhysicalPoint((0, 0, z))))
        sl.SetMetaData("0020|0013", str(z + 1))
        sl.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        sl.SetMetaData("0008|0060", "MR")
        writer.SetFileName(str(tmp_path / f"slice{z:03d}.dcm"))
        writer.Execute(sl)
    back = read_image(tmp_path)
    np.testing.assert_array_equal(back.array, img.array)
    np.testing.assert_allclose(back.spacing_mm, img.spacing_mm, atol=1e-3)
    np.testing.assert_allclose(back.origin_mm, img.origin_mm, atol=1e-3)


def test_reading_a_missing_file_names_it(tmp_path):
    path = tmp_path / "nothere.nii.gz"
    with pytest.raises(InputError, match="nothere.nii.gz"):
        read_image(path)


def test_reading_a_file_that_is_not_an_image_names_it(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("not an image")
    with pytest.raises(InputError, match="notes.nii.gz"):
        read_image(path)


def test_reading_a_folder_without_dicom_names_it(tmp_path):
    with pytest.raises(InputError, match=str(tmp_path.name)):
        read_image(tmp_path)


def test_image_rejects_geometry_that_does_not_fit_the_array():
    with pytest.raises(InputError, match="geometry"):
        Image(np.zeros((2, 3, 4), np.float32), (1.0, 1.0), (0.0, 0.0, 0.0))
    with pytest.raises(InputError, match="spacing"):
        Image(np.zeros((2, 3, 4), np.float32), (1.0, 0.0, 1.0), (0.0, 0.0, 0.0))
    with pytest.raises(InputError, match="voxel type"):
        Image(np.zeros((2, 3, 4), np.complex64), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))


def test_covering_grid_keeps_the_whole_moving_extent_and_the_fixed_voxels():
    """The "union" output grid: the fixed grid grown by whole voxels until every moving point fits."""
    import SimpleITK as sitk

    from AutoRegisterLib.image import Image, covering_grid

    fixed = Image(np.zeros((10, 20, 30), np.float32), (2.0, 2.0, 3.0), (5.0, -7.0, 11.0), np.eye(3))
    inside = Image(np.ones((5, 5, 5), np.float32), (2.0, 2.0, 2.0), (20.0, 0.0, 20.0), np.eye(3))
    assert covering_grid(fixed, inside, sitk.Transform(3, sitk.sitkIdentity)).same_grid(fixed)
    # A moving image 40 mm longer than the fixed one along x, shifted 40 mm: it reaches 40 mm below the fixed one.
    wide = Image(np.ones((10, 20, 50), np.float32), (2.0, 2.0, 3.0), (5.0, -7.0, 11.0), np.eye(3))
    shift = sitk.TranslationTransform(3, (40.0, 0.0, 0.0))  # fixed point p shows moving point p + 40
    grid = covering_grid(fixed, wide, shift)
    lo = np.array(grid.origin_mm)
    hi = grid.physical_points(np.array([np.array(grid.size) - 1]))[0]
    assert 5.0 - 40.0 - 8.0 <= lo[0] <= 5.0 - 40.0  # the moving image's first voxel, within the probe's step
    assert hi[0] >= 5.0 + 29 * 2.0  # still holds the whole fixed grid
    # Fixed voxel centres stay voxel centres of the grown grid.
    offset = (np.array(fixed.origin_mm) - lo) / np.array(fixed.spacing_mm)
    assert np.allclose(offset, np.round(offset))
    assert grid.spacing_mm == fixed.spacing_mm


def test_reach_mask_is_the_moving_box_grown_by_the_margin():
    from AutoRegisterLib.image import Image, reach_mask

    fixed = Image(np.zeros((40, 40, 40), np.float32), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0), np.eye(3))
    # A slab 20 mm thick (z 30..50 mm, voxel faces 29..51) over the whole x-y extent.
    slab = Image(np.ones((11, 40, 40), np.float32), (2.0, 2.0, 2.0), (0.0, 0.0, 30.0), np.eye(3))
    z = np.arange(40) * 2.0
    tight = reach_mask(slab, fixed, margin_mm=0.0)
    assert np.array_equal(tight.any(axis=(1, 2)), (z >= 29.0) & (z <= 51.0))
    grown = reach_mask(slab, fixed, margin_mm=10.0)
    assert np.array_equal(grown.any(axis=(1, 2)), (z >= 19.0) & (z <= 61.0))
    assert grown[:, 0, 0].sum() == grown[:, 20, 20].sum()  # whole planes: the slab spans x and y
    assert reach_mask(fixed, fixed, 5.0).all()
