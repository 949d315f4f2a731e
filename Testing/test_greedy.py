"""Greedy backend: its RAS matrices and its warp are read in the right direction, checked against known
transforms on small real heads (ICBM152 at 4 mm) and against greedy's own reslicing."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import SimpleITK as sitk

from AutoRegisterDev.data import initial_error_mm, make_case, point_error_mm
from AutoRegisterLib.backends import BACKEND_NAMES, Preset, get_backend, warp_with
from AutoRegisterLib.backends.greedy import RAS_FLIP, affine_from_ras, schedule, skipped_levels
from AutoRegisterLib.errors import InputError
from AutoRegisterLib.image import Image, resample_to_grid, to_sitk
from AutoRegisterLib.presets import load_catalog
from AutoRegisterLib.scoring import head_mask
from AutoRegisterLib.transforms import homogeneous_matrix

OK, REASON = get_backend("greedy").availability()
needs_greedy = pytest.mark.skipif(not OK, reason=f"greedy backend unavailable: {REASON}")
CATALOG = load_catalog()


def run(name: str, case, tmp_path, **params):
    """Run a catalog preset (with params overridden) on a case; the backend's output."""
    preset = CATALOG[name]
    preset = Preset(preset.name, preset.backend, preset.transform_type, {**preset.params, **params})
    return get_backend("greedy").run(preset, case.fixed, case.moving, tmp_path / "work", threads=1)


def test_greedy_is_registered_and_its_presets_are_in_the_catalog_but_in_no_table():
    from AutoRegisterLib.presets import list_tables

    assert "greedy" in BACKEND_NAMES
    names = {"greedy-rigid", "greedy-affine", "greedy-deformable"}
    assert names <= set(CATALOG)
    assert {CATALOG[n].transform_type for n in names} == {"rigid", "affine", "deformable"}
    assert not names & {p.name for t in list_tables() for p in t.presets}


@pytest.mark.parametrize("params, field", [
    ({"metric": "CC"}, "metric"),
    ({"deformable_metric": "SSD"}, "deformable_metric"),
    ({"initialization": "moments2"}, "initialization"),
    ({"rigid_iterations": "100x50"}, "rigid_iterations"),
    ({"affine_iterations": [50, 0]}, "affine_iterations"),
    ({"smoothing_vox": [2.0]}, "smoothing_vox"),
    ({"ncc_radius_vox": 0}, "ncc_radius_vox"),
    ({"finest_spacing_mm": -1.0}, "finest_spacing_mm"),
    ({"iterations": [10]}, "iterations"),
])
def test_bad_params_raise_a_user_error_naming_the_field(params, field):
    with pytest.raises(InputError, match=rf"params\.{field}\b"):
        get_backend("greedy").validate(Preset("mine", "greedy", "deformable", params))


def test_linear_levels_finer_than_the_limit_are_skipped():
    def grid(spacing):
        return Image(np.zeros((4, 4, 4), np.float32), spacing, (0.0,) * 3)

    assert skipped_levels(grid((3.0, 3.0, 3.0)), 1.5) == 0
    assert skipped_levels(grid((1.5, 1.5, 1.5)), 1.5) == 0
    assert skipped_levels(grid((1.0, 1.0, 3.0)), 1.5) == 1
    assert skipped_levels(grid((0.5, 0.5, 0.5)), 1.5) == 2
    assert schedule([100, 50, 20], 1) == "100x50x20x0"


def test_a_ras_matrix_becomes_the_same_map_in_lps():
    # +10 mm towards Right in RAS is -10 mm in L of LPS; a rotation about the S axis keeps its sense.
    c, s = np.cos(0.3), np.sin(0.3)
    ras = np.array([[c, -s, 0, 10.0], [s, c, 0, 0], [0, 0, 1, -5.0], [0, 0, 0, 1]])
    tx = affine_from_ras(ras)
    p_lps = np.array([20.0, -30.0, 40.0])
    p_ras = p_lps * [-1, -1, 1]
    expected_ras = ras[:3, :3] @ p_ras + ras[:3, 3]
    assert np.allclose(np.array(tx.TransformPoint(tuple(p_lps))) * [-1, -1, 1], expected_ras)


@needs_greedy
def test_rigid_recovers_a_known_misalignment_and_the_raw_ras_matrix_would_not(rigid_case4, tmp_path):
    out = run("greedy-rigid", rigid_case4, tmp_path)
    mask = head_mask(rigid_case4.fixed, "T1")
    assert initial_error_mm(rigid_case4, mask) > 6.0
    assert point_error_mm(rigid_case4, out.transform, mask) < 1.0
    # Proof of the RAS reading: the same matrix taken as LPS (no flip) is far off.
    lps = homogeneous_matrix(out.transform)
    unflipped = affine_from_ras(lps)  # flips what is already LPS, i.e. reads greedy's matrix unconverted
    assert point_error_mm(rigid_case4, unflipped, mask) > 5.0
    assert (tmp_path / "work" / "greedy.log").stat().st_size > 0  # greedy's traces go to the log


@needs_greedy
def test_affine_recovers_a_known_scaled_and_sheared_misalignment(icbm4, tmp_path):
    case = make_case(icbm4["t1"], icbm4["t1"], seed=1, rotation_deg=10.0, translation_mm=10.0, scale=0.1)
    mask = head_mask(case.fixed, "T1")
    out = run("greedy-affine", case, tmp_path)
    assert out.transform.GetName() == "AffineTransform"
    assert initial_error_mm(case, mask) > 6.0
    assert point_error_mm(case, out.transform, mask) < 1.0


@needs_greedy
def test_deformable_warp_is_read_as_greedy_reslices_it_and_recovers_a_known_warp(icbm4, tmp_path):
    from picsl_greedy import Greedy3D

    case = make_case(icbm4["t1"], icbm4["t1"], seed=5, rotation_deg=8.0, translation_mm=8.0, warp_mm=3.0)
    mask = head_mask(case.fixed, "T1")
    out = run("greedy-deformable", case, tmp_path)
    composite = sitk.CompositeTransform(out.transform)
    affine, field = composite.GetNthTransform(0).Downcast(), composite.GetNthTransform(1).Downcast()
    assert affine.GetName() == "AffineTransform" and field.GetName() == "DisplacementFieldTransform"
    warp = field.GetDisplacementField()
    assert warp.GetSize() == case.fixed.size and np.allclose(warp.GetOrigin(), case.fixed.origin_mm)

    # Greedy's own reslicing of the moving image through the same warp and (RAS) matrix ...
    g = Greedy3D()
    fixed, moving = to_sitk(case.fixed, np.float32), to_sitk(case.moving, np.float32)
    # This picsl_greedy takes neither vector images nor NumPy matrices as inputs: files, then.
    warp_path, matrix_path = tmp_path / "warp.nii.gz", tmp_path / "affine.mat"
    sitk.WriteImage(warp, str(warp_path))
    np.savetxt(matrix_path, RAS_FLIP @ homogeneous_matrix(affine) @ RAS_FLIP)
    g.execute(f"-rf fix -rm mov resliced -r {warp_path} {matrix_path}", fix=fixed, mov=moving, resliced=None)
    greedy_resliced = sitk.GetArrayFromImage(g["resliced"])
    # ... is what warp_with gives through the SimpleITK transform: moving point = A(x + u(x)).
    ours = warp_with(out.transform, case.fixed, case.moving)
    # One voxel in from the moving image's edge: there greedy interpolates with the background, ITK does not.
    inside = ndi.binary_erosion(ours.valid_mask) & mask
    assert np.abs(ours.warped.array - greedy_resliced)[inside].max() < 1e-3 * np.abs(greedy_resliced).max()
    # The other order (x + u(A x)) is measurably different, so the check above can tell them apart.
    swapped = warp_with(sitk.CompositeTransform([field, affine]), case.fixed, case.moving)
    assert np.abs(swapped.warped.array - greedy_resliced)[inside].mean() > 10 * np.abs(
        ours.warped.array - greedy_resliced)[inside].mean()

    # Against the truth too, with a warp that does move points (else the checks above prove little).
    assert np.linalg.norm(sitk.GetArrayFromImage(warp), axis=-1)[mask].mean() > 0.5
    assert initial_error_mm(case, mask) > 6.0
    assert point_error_mm(case, out.transform, mask) < 2.0
    path = tmp_path / "transform.h5"
    sitk.WriteTransform(out.transform, str(path))
    back = sitk.ReadTransform(str(path))
    for p in case.fixed.physical_points(np.array([[5, 7, 9], [24, 28, 24]])):
        assert np.allclose(back.TransformPoint(tuple(p)), out.transform.TransformPoint(tuple(p)), atol=1e-4)


def oblique_anisotropic(image: Image) -> Image:
    """`image` resampled on a grid tilted 20° about S and 10° about L, with 3.5 x 4 x 5 mm voxels."""
    rot = sitk.Euler3DTransform()
    rot.SetRotation(np.deg2rad(10.0), 0.0, np.deg2rad(20.0))
    direction = np.array(rot.GetMatrix()).reshape(3, 3)
    spacing = np.array([3.5, 4.0, 5.0])
    extent = np.array(image.size) * np.array(image.spacing_mm)
    size = np.ceil(extent / spacing).astype(int)
    centre = image.physical_points(np.array([[(n - 1) / 2 for n in image.size]]))[0]
    origin = centre - direction @ ((size - 1) / 2 * spacing)
    grid = Image(np.zeros(tuple(reversed(size)), np.float32), tuple(spacing), tuple(origin), direction)
    return resample_to_grid(image, grid)


@needs_greedy
def test_oblique_anisotropic_grids_are_registered_in_physical_space(icbm4, tmp_path):
    fixed = oblique_anisotropic(icbm4["t1"])
    case = make_case(icbm4["t2"], fixed, seed=3, rotation_deg=8.0, translation_mm=8.0)
    mask = head_mask(case.fixed, "T1")
    out = run("greedy-rigid", case, tmp_path)
    assert initial_error_mm(case, mask) > 6.0
    assert point_error_mm(case, out.transform, mask) < 1.5
