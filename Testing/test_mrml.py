"""MRML glue, headless with slicer-core: volume nodes and transform nodes against the LPS library types."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
sitk = pytest.importorskip("SimpleITK")
vtk = pytest.importorskip("vtk")

from AutoRegisterDev import data  # noqa: E402
from AutoRegisterLib import mrml  # noqa: E402
from AutoRegisterLib.backends.base import warp_with  # noqa: E402
from AutoRegisterLib.errors import InputError  # noqa: E402
from AutoRegisterLib.image import Image, resample_to_grid, to_sitk  # noqa: E402
from AutoRegisterLib.transforms import displacement_field  # noqa: E402

F = mrml.LPS_FROM_RAS


def oblique_direction(angles=(0.3, -0.2, 0.5)) -> np.ndarray:
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(*angles)
    return np.array(rotation.GetMatrix()).reshape(3, 3)


def oblique_image(dtype=np.float32, seed=0) -> Image:
    rng = np.random.default_rng(seed)
    values = rng.normal(0.0, 1000.0, size=(7, 9, 11)).astype(dtype)
    return Image(values, (0.7, 1.3, 2.1), (10.5, -20.25, 30.125), oblique_direction())


def vtk_to_numpy_matrix(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return vtk_to_numpy_matrix(matrix)


def to_lps(point_ras):
    return F @ np.asarray(point_ras)


# --- volumes -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8, np.float64])
def test_oblique_volume_round_trips_losslessly_through_a_volume_node(dtype):
    image = oblique_image(dtype)
    scene = slicer.vtkMRMLScene()
    node = mrml.volume_node_from_image(image, scene, "oblique")
    back = mrml.image_from_volume_node(node)

    assert back.array.dtype == image.array.dtype
    assert np.array_equal(back.array, image.array)
    assert np.array_equal(back.spacing_mm, image.spacing_mm)
    assert np.abs(np.subtract(back.origin_mm, image.origin_mm)).max() == 0.0
    assert np.abs(back.direction - image.direction).max() == 0.0

    # And node -> image -> node keeps Slicer's IJK-to-RAS matrix bit for bit.
    again = mrml.volume_node_from_image(back, scene, "again")
    assert np.array_equal(ijk_to_ras(again), ijk_to_ras(node))


def test_node_geometry_is_slicer_ras_of_the_lps_image():
    image = oblique_image()
    node = mrml.volume_node_from_image(image, slicer.vtkMRMLScene())
    ijk = np.array([[0, 0, 0], [10, 0, 0], [0, 8, 0], [0, 0, 6], [3, 4, 5]], dtype=float)
    ras = (ijk_to_ras(node) @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
    # A voxel (i, j, k) = SimpleITK index (x, y, z) is at the same place; only the sign of x, y flips.
    assert np.abs(ras @ F - image.physical_points(ijk)).max() < 1e-12
    # Voxel (x=3, y=4, z=5) holds array[5, 4, 3] on both sides.
    from vtk.util import numpy_support

    scalars = numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())
    nx, ny, _ = node.GetImageData().GetDimensions()
    assert scalars[3 + nx * (4 + ny * 5)] == image.array[5, 4, 3]


def test_volume_node_matches_what_slicer_writes_and_simpleitk_reads(tmp_path):
    image = oblique_image(np.int16)
    node = mrml.volume_node_from_image(image, slicer.vtkMRMLScene())
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(tmp_path / "oblique.nrrd"))
    assert storage.WriteData(node)

    written = sitk.ReadImage(str(tmp_path / "oblique.nrrd"))
    assert np.array_equal(sitk.GetArrayFromImage(written), image.array)
    assert np.allclose(written.GetSpacing(), image.spacing_mm, atol=1e-12)
    assert np.allclose(written.GetOrigin(), image.origin_mm, atol=1e-9)
    assert np.allclose(np.reshape(written.GetDirection(), (3, 3)), image.direction, atol=1e-12)


def test_world_geometry_includes_a_linear_parent_transform():
    image = oblique_image()
    scene = slicer.vtkMRMLScene()
    node = mrml.volume_node_from_image(image, scene)
    parent = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(parent)
    to_parent = np.eye(4)
    to_parent[:3, :3] = oblique_direction((0.1, 0.0, -0.3))
    to_parent[:3, 3] = (5.0, -3.0, 12.0)
    parent.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(to_parent))
    node.SetAndObserveTransformNodeID(parent.GetID())

    local = mrml.image_from_volume_node(node)
    world = mrml.image_from_volume_node(node, world=True)
    assert local.same_grid(image, tol=1e-12)
    ijk = np.array([[0, 0, 0], [4, 5, 6], [10, 8, 6]], dtype=float)
    expected_ras = (to_parent @ np.c_[(local.physical_points(ijk) @ F), np.ones(3)].T).T[:, :3]
    assert np.abs(world.physical_points(ijk) - expected_ras @ F).max() < 1e-9
    assert np.array_equal(world.array, image.array)


def test_volume_under_a_nonlinear_transform_asks_to_harden_it():
    scene = slicer.vtkMRMLScene()
    node = mrml.volume_node_from_image(oblique_image(), scene)
    grid = mrml.transform_node_from_transform(smooth_bspline(oblique_image()), scene, reference=oblique_image())
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(InputError, match="harden"):
        mrml.image_from_volume_node(node, world=True)


def test_vector_volume_is_refused_with_a_clear_message():
    node = slicer.vtkMRMLScalarVolumeNode()
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(4, 4, 4)
    image_data.AllocateScalars(vtk.VTK_FLOAT, 3)
    node.SetAndObserveImageData(image_data)
    with pytest.raises(InputError, match="3 components"):
        mrml.image_from_volume_node(node)


# --- transforms ----------------------------------------------------------------------------------

def smooth_bspline(reference: Image, amplitude_mm=2.0, seed=1):
    rng = np.random.default_rng(seed)
    bspline = sitk.BSplineTransformInitializer(to_sitk(reference, np.uint8), [3, 3, 3], 3)
    bspline.SetParameters(tuple(rng.normal(0.0, amplitude_mm, len(bspline.GetParameters()))))
    return bspline


def sample_points(reference: Image, n=200, seed=2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return reference.physical_points(rng.uniform(1.0, np.array(reference.size) - 2.0, size=(n, 3)))


def node_maps_like(node, transform, points_lps) -> float:
    """Largest |node FromParent (in RAS) - transform (in LPS)| over points, in mm."""
    errors = [np.linalg.norm(to_lps(mrml.transform_point_ras(node, to_lps(p)))
                             - np.array(transform.TransformPoint(tuple(p)))) for p in points_lps]
    return max(errors)


@pytest.mark.parametrize("make", [
    lambda: sitk.Euler3DTransform((5.0, 6.0, 7.0), 0.1, 0.2, -0.1, (3.0, -4.0, 5.0)),
    lambda: sitk.AffineTransform((1.05, 0.02, 0.0, -0.03, 0.97, 0.01, 0.0, 0.04, 1.1), (1.0, 2.0, 3.0),
                                 (-4.0, 5.0, 20.0)),
    lambda: sitk.CompositeTransform([sitk.TranslationTransform(3, (1.0, 2.0, 3.0)),
                                     sitk.VersorRigid3DTransform((0.0, 0.0, 0.1, 0.995), (2.0, 0.0, 0.0))]),
])
def test_linear_transform_node_maps_fixed_to_moving_points_like_the_sitk_transform(make, tmp_path):
    transform = make()
    scene = slicer.vtkMRMLScene()
    node = mrml.transform_node_from_transform(transform, scene, "linear")
    assert node.GetClassName() == "vtkMRMLLinearTransformNode"
    points = sample_points(oblique_image(), 100) * 10.0
    assert node_maps_like(node, transform, points) < 1e-9

    # Slicer's own reader of the ITK file agrees: the file and the node use the same direction.
    sitk.WriteTransform(transform, str(tmp_path / "t.tfm"))
    from_file = mrml.transform_node_from_file(tmp_path / "t.tfm", scene)
    assert node_maps_like(from_file, transform, points) < 1e-6


def test_grid_transform_node_maps_points_like_the_displacement_field(tmp_path):
    reference = oblique_image()
    field = displacement_field(smooth_bspline(reference), reference)
    transform = sitk.DisplacementFieldTransform(sitk.Image(field))
    scene = slicer.vtkMRMLScene()
    node = mrml.transform_node_from_transform(transform, scene, "grid")
    assert node.GetClassName() == "vtkMRMLGridTransformNode"
    points = sample_points(reference)
    # VTK evaluates the grid in single precision internally: micrometres, not nanometres.
    assert node_maps_like(node, transform, points) < 1e-4

    sitk.WriteTransform(transform, str(tmp_path / "field.h5"))
    from_file = mrml.transform_node_from_file(tmp_path / "field.h5", scene)
    assert node_maps_like(from_file, transform, points) < 1e-4


def test_other_nonlinear_transforms_are_sampled_on_the_reference_grid():
    reference = oblique_image()
    bspline = smooth_bspline(reference, amplitude_mm=0.5)
    scene = slicer.vtkMRMLScene()
    with pytest.raises(ValueError, match="reference grid"):
        mrml.transform_node_from_transform(bspline, scene)
    reference_node = mrml.volume_node_from_image(reference, scene)
    node = mrml.transform_node_from_transform(bspline, scene, reference=reference_node)
    # Exact at the grid's own voxels; between them linear interpolation of a smooth field.
    voxels = reference.physical_points(np.argwhere(np.ones(reference.array.shape))[:, ::-1][::7].astype(float))
    assert node_maps_like(node, bspline, voxels) < 1e-4
    assert node_maps_like(node, bspline, sample_points(reference)) < 0.05


def test_refilling_an_output_node_of_the_other_kind_replaces_it_in_the_scene():
    scene = slicer.vtkMRMLScene()
    reference = oblique_image()
    linear = mrml.transform_node_from_transform(sitk.TranslationTransform(3, (1.0, 2.0, 3.0)), scene, "out")
    same = mrml.transform_node_from_transform(sitk.TranslationTransform(3, (4.0, 5.0, 6.0)), scene, node=linear)
    assert same is linear
    grid = mrml.transform_node_from_transform(smooth_bspline(reference), scene, reference=reference, node=linear)
    assert grid.GetClassName() == "vtkMRMLGridTransformNode"
    assert scene.GetNodeByID(linear.GetID()) is None or scene.GetNodeByID(linear.GetID()) is grid
    assert scene.GetNumberOfNodesByClass("vtkMRMLTransformNode") == 1


def test_output_nodes_are_found_by_their_tag_and_never_confused_with_user_nodes():
    scene = slicer.vtkMRMLScene()
    moving = mrml.volume_node_from_image(oblique_image(), scene, "moving")
    other = mrml.volume_node_from_image(oblique_image(), scene, "other")
    users = mrml.transform_node_from_transform(sitk.TranslationTransform(3, (1.0, 0.0, 0.0)), scene, "user's")
    ours = mrml.mark_output_node(
        mrml.transform_node_from_transform(sitk.TranslationTransform(3, (2.0, 0.0, 0.0)), scene, "ours"),
        "transform", moving)
    assert mrml.find_output_node(scene, "transform", moving) is ours
    assert mrml.find_output_node(scene, "volume", moving) is None
    assert mrml.find_output_node(scene, "transform", other) is None
    assert mrml.is_output_node(ours) and not mrml.is_output_node(users)


# --- a real registration, end to end through MRML -------------------------------------------------

def reslice_through_parent_transform(moving_node, fixed_node) -> np.ndarray:
    """Resample the moving node onto the fixed node's voxels with VTK, the way Slicer displays it:
    fixed IJK -> RAS -> the moving node's world-to-local transform -> moving IJK."""
    from vtk.util import numpy_support

    world_to_moving = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, moving_node.GetParentTransformNode(),
                                                         world_to_moving)
    ras_to_ijk = vtk.vtkMatrix4x4()
    moving_node.GetRASToIJKMatrix(ras_to_ijk)
    ijk_to_ras_fixed = vtk.vtkMatrix4x4()
    fixed_node.GetIJKToRASMatrix(ijk_to_ras_fixed)
    chain = vtk.vtkGeneralTransform()  # PreMultiply: the last concatenated is applied first
    chain.Concatenate(ras_to_ijk)
    chain.Concatenate(world_to_moving)
    chain.Concatenate(ijk_to_ras_fixed)
    reslice = vtk.vtkImageReslice()
    reslice.SetInputData(moving_node.GetImageData())
    reslice.SetResliceTransform(chain)
    reslice.SetInterpolationModeToLinear()
    reslice.SetOutputExtent(fixed_node.GetImageData().GetExtent())
    reslice.SetOutputOrigin(0.0, 0.0, 0.0)
    reslice.SetOutputSpacing(1.0, 1.0, 1.0)
    reslice.SetOutputScalarType(vtk.VTK_FLOAT)
    reslice.SetBackgroundLevel(0.0)
    reslice.Update()
    out = reslice.GetOutput()
    nx, ny, nz = out.GetDimensions()
    return numpy_support.vtk_to_numpy(out.GetPointData().GetScalars()).reshape(nz, ny, nx)


def rigid_registration(fixed: Image, moving: Image):
    """A small real SimpleITK rigid registration (Mattes MI, moments initialisation): fixed->moving."""
    f, m = to_sitk(fixed, np.float32), to_sitk(moving, np.float32)
    initial = sitk.CenteredTransformInitializer(f, m, sitk.VersorRigid3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(32)
    method.SetMetricSamplingStrategy(method.NONE)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(2.0, 1e-4, 200)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1.0, 0.0])
    method.SetInitialTransform(initial, inPlace=False)
    return method.Execute(f, m)


@pytest.fixture(scope="module")
def registered_case():
    """ICBM T1 at 4 mm, a known rigid misalignment, the moving volume on an oblique grid, registered."""
    try:
        t1 = data.load_icbm("t1", 4.0)
    except InputError as exc:
        pytest.skip(str(exc))
    case = data.make_case(t1, t1, seed=3, rotation_deg=8.0, translation_mm=10.0)
    # An oblique moving grid, so that every axis convention is exercised by real data.
    oblique = Image(np.zeros((50, 56, 50), np.uint8), (4.0, 4.0, 4.0), (-5.0, 110.0, -80.0),
                    case.fixed.direction @ oblique_direction((0.15, -0.1, 0.2)))
    centre = np.array(case.fixed.physical_points(np.array([[(n - 1) / 2 for n in case.fixed.size]]))[0])
    shift = centre - oblique.physical_points(np.array([[(n - 1) / 2 for n in oblique.size]]))[0]
    oblique = Image(oblique.array, oblique.spacing_mm, tuple(np.add(oblique.origin_mm, shift)), oblique.direction)
    moving = resample_to_grid(case.moving, oblique)

    scene = slicer.vtkMRMLScene()
    fixed_node = mrml.volume_node_from_image(case.fixed, scene, "fixed")
    moving_node = mrml.volume_node_from_image(moving, scene, "moving")
    fixed_image = mrml.image_from_volume_node(fixed_node, world=True)
    moving_image = mrml.image_from_volume_node(moving_node)
    transform = rigid_registration(fixed_image, moving_image)
    return case, scene, fixed_node, moving_node, fixed_image, moving_image, transform


@pytest.mark.slow
def test_registration_result_as_a_parent_transform_reproduces_the_library_warp(registered_case):
    case, scene, fixed_node, moving_node, fixed_image, moving_image, transform = registered_case
    head = case.fixed.array > 0.1 * case.fixed.array.max()
    assert data.point_error_mm(case, transform, head) < 1.0  # the registration really worked

    node = mrml.transform_node_from_transform(transform, scene, "AutoRegister", reference=fixed_node)
    moving_node.SetAndObserveTransformNodeID(None)
    before = reslice_through_parent_transform(moving_node, fixed_node)
    moving_node.SetAndObserveTransformNodeID(node.GetID())
    through_mrml = reslice_through_parent_transform(moving_node, fixed_node)
    warped = warp_with(transform, fixed_image, moving_image)
    library, inside = warped.warped.array, warped.valid_mask
    scale = np.abs(library[inside]).max()
    assert np.abs(through_mrml - library)[inside].max() < 1e-4 * scale  # measured: 7e-6 of the range
    # With the parent transform in place the moving volume lies on the fixed one (measured 0.97 vs 0.63).
    overlap = inside & head
    fixed_values = case.fixed.array.astype(np.float32)[overlap]
    assert np.corrcoef(through_mrml[overlap], fixed_values)[0, 1] > 0.95
    assert np.corrcoef(before[overlap], fixed_values)[0, 1] < 0.8
    moving_node.SetAndObserveTransformNodeID(None)


@pytest.mark.slow
def test_nonlinear_result_as_a_parent_transform_reproduces_the_library_warp(registered_case):
    case, scene, fixed_node, moving_node, fixed_image, moving_image, rigid = registered_case
    deformable = sitk.CompositeTransform([rigid, smooth_bspline(fixed_image, amplitude_mm=1.5)])
    node = mrml.transform_node_from_transform(deformable, scene, "AutoRegister deformable", reference=fixed_node)
    assert node.GetClassName() == "vtkMRMLGridTransformNode"
    moving_node.SetAndObserveTransformNodeID(node.GetID())
    through_mrml = reslice_through_parent_transform(moving_node, fixed_node)
    # The library's warp through the same field (what the engine writes as transform.h5).
    field = sitk.DisplacementFieldTransform(sitk.Image(displacement_field(deformable, fixed_image)))
    warped = warp_with(field, fixed_image, moving_image)
    library, inside = warped.warped.array, warped.valid_mask
    scale = np.abs(library[inside]).max()
    assert np.abs(through_mrml - library)[inside].max() < 1e-3 * scale
    moving_node.SetAndObserveTransformNodeID(None)


# --- masks: nodes the user picks as masks or focus -----------------------------------------------
# A segment goes through Slicer's own vtkSlicerSegmentationsModuleLogic::ExportSegmentsToLabelmapNode (Slicer/Slicer
# Modules/Loadable/Segmentations/Logic/vtkSlicerSegmentationsModuleLogic.cxx, 0110286 as stored by the code index):
# the labelmap lands under the reference volume's parent transform, on its grid (EXTENT_REFERENCE_GEOMETRY), the
# segment resampled through GetTransformBetweenNodes(reference's parent, segmentation's parent). An ROI is read
# through vtkMRMLMarkupsROINode's world accessors (Modules/Loadable/Markups/MRML/vtkMRMLMarkupsROINode.h, 009333c:
# GetCenterWorld, GetSizeWorld, GetAxisWorld; "World: ... parent transform of the node").

def _segmentation_of(scene, reference: Image, block, name="Liver"):
    """A segmentation node holding one segment: `block` of `reference`'s grid; returns (node, segment ID, labels)."""
    labels = np.zeros(reference.array.shape, np.uint8)
    labels[block] = 1
    labelmap = mrml.volume_node_from_image(reference.with_array(labels), scene, f"{name} labels",
                                           node=scene.AddNode(slicer.vtkMRMLLabelMapVolumeNode()))
    segmentation = scene.AddNode(slicer.vtkMRMLSegmentationNode())
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation, "")
    segment_id = segmentation.GetSegmentation().GetNthSegmentID(0)
    segmentation.GetSegmentation().GetSegment(segment_id).SetName(name)
    scene.RemoveNode(labelmap)
    return segmentation, segment_id, labels


def _translation_node(scene, ras_mm):
    node = scene.AddNode(slicer.vtkMRMLLinearTransformNode())
    matrix = vtk.vtkMatrix4x4()
    for axis, value in enumerate(ras_mm):
        matrix.SetElement(axis, 3, value)
    node.SetMatrixTransformToParent(matrix)
    return node


def test_a_segment_is_exported_on_its_volumes_grid_where_it_shows_in_the_views(slicer_segmentations):
    reference = Image(np.zeros((10, 12, 14), np.float32), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    scene = slicer.vtkMRMLScene()
    volume = mrml.volume_node_from_image(reference, scene, "volume")
    segmentation, segment_id, labels = _segmentation_of(scene, reference, np.s_[2:5, 3:7, 4:9])
    for world in (True, False):
        mask = mrml.mask_from_node(segmentation, volume, segment_id, world=world)
        assert mask.same_grid(mrml.image_from_volume_node(volume, world=world))
        assert np.array_equal(mask.array != 0, labels == 1)
    # The volume moved 4 mm to the right (2 voxels along -x in LPS), the segmentation did not: in the volume's own
    # frame (the moving volume's) the segment sits 2 voxels further along x; in world (the fixed volume's) on the
    # volume's world grid, the same.
    volume.SetAndObserveTransformNodeID(_translation_node(scene, (4.0, 0.0, 0.0)).GetID())
    shifted = np.zeros_like(labels)
    shifted[2:5, 3:7, 6:11] = 1
    for world in (False, True):
        mask = mrml.mask_from_node(segmentation, volume, segment_id, world=world)
        assert mask.same_grid(mrml.image_from_volume_node(volume, world=world))
        assert np.array_equal(mask.array != 0, shifted == 1), world
    # Under the same transform as the volume, the segment is where it was drawn on it.
    segmentation.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
    assert np.array_equal(mrml.mask_from_node(segmentation, volume, segment_id).array != 0, labels == 1)


def test_a_labelmap_mask_is_placed_in_its_volumes_frame_by_both_parent_transforms():
    reference = oblique_image()
    scene = slicer.vtkMRMLScene()
    volume = mrml.volume_node_from_image(reference, scene, "moving")
    labels = (np.arange(reference.array.size).reshape(reference.array.shape) % 5 == 0).astype(np.uint8)
    labelmap = mrml.volume_node_from_image(reference.with_array(labels), scene, "mask",
                                           node=scene.AddNode(slicer.vtkMRMLLabelMapVolumeNode()))
    same = mrml.mask_from_node(labelmap, volume, world=False)
    assert same.same_grid(reference) and np.array_equal(same.array, labels)
    volume.SetAndObserveTransformNodeID(_translation_node(scene, (5.0, -3.0, 2.0)).GetID())
    labelmap.SetAndObserveTransformNodeID(_translation_node(scene, (1.0, 1.0, 1.0)).GetID())
    moved = mrml.mask_from_node(labelmap, volume, world=False)
    # mask frame -> world: +(1, 1, 1) RAS; world -> volume frame: -(5, -3, 2) RAS; in LPS x and y flip.
    assert np.allclose(np.subtract(moved.origin_mm, reference.origin_mm), F @ np.array([-4.0, 4.0, -1.0]))
    assert np.array_equal(moved.array, labels) and np.allclose(moved.direction, reference.direction)
    world = mrml.mask_from_node(labelmap, volume, world=True)
    assert np.allclose(np.subtract(world.origin_mm, reference.origin_mm), F @ np.array([1.0, 1.0, 1.0]))


def test_an_roi_becomes_a_box_holding_the_voxels_slicer_says_are_inside():
    reference = Image(np.zeros((12, 14, 16), np.float32), (2.0, 2.5, 3.0), (-20.0, -15.0, -25.0))
    scene = slicer.vtkMRMLScene()
    roi = scene.AddNode(slicer.vtkMRMLMarkupsROINode())
    roi.SetSize(14.0, 9.0, 20.0)
    turn = vtk.vtkTransform()
    turn.Translate(2.0, -3.0, 1.0)
    turn.RotateWXYZ(25.0, 0.3, 0.5, 0.8)
    roi.SetAndObserveObjectToNodeMatrix(turn.GetMatrix())
    parent = scene.AddNode(slicer.vtkMRMLLinearTransformNode())
    tilt = vtk.vtkTransform()
    tilt.Translate(-4.0, 2.0, 3.0)
    tilt.RotateX(15.0)
    parent.SetMatrixTransformToParent(tilt.GetMatrix())
    roi.SetAndObserveTransformNodeID(parent.GetID())

    box = mrml.mask_from_node(roi, mrml.volume_node_from_image(reference, scene), world=True)
    inside = box.to_mask(reference)
    centres_lps = reference.physical_points(np.argwhere(np.ones(reference.array.shape, bool))[:, ::-1])
    slicers = np.array([roi.IsPointInROIWorld(list(F @ p)) for p in centres_lps]).reshape(reference.array.shape)
    assert inside.sum() > 50 and np.array_equal(inside, slicers)


def test_mask_export_leaves_the_scene_as_it_was_and_refuses_what_is_no_mask(slicer_segmentations):
    reference = Image(np.zeros((10, 12, 14), np.float32), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    scene = slicer.vtkMRMLScene()
    volume = mrml.volume_node_from_image(reference, scene, "T1")
    segmentation, segment_id, _ = _segmentation_of(scene, reference, np.s_[2:5, 3:7, 4:9])
    before = [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]
    mrml.mask_from_node(segmentation, volume, segment_id, world=True)
    assert [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())] == before
    # From the console: a segment by name, or none when there is one.
    by_id = mrml.mask_from_node(segmentation, volume, segment_id).array
    assert np.array_equal(mrml.mask_from_node(segmentation, volume, "Liver").array, by_id)
    assert np.array_equal(mrml.mask_from_node(segmentation, volume, None).array, by_id)
    two, _, _ = _segmentation_of(scene, reference, np.s_[1:2, 1:2, 1:2], name="Kidney")
    labels = np.zeros(reference.array.shape, np.uint8)
    labels[5:7, 5:7, 5:7] = 1
    extra = mrml.volume_node_from_image(reference.with_array(labels), scene, "extra",
                                        node=scene.AddNode(slicer.vtkMRMLLabelMapVolumeNode()))
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(extra, two, "")
    with pytest.raises(InputError, match="choose a segment"):
        mrml.mask_from_node(two, volume, None)
    with pytest.raises(InputError, match="has no segment 'Segment_9'"):
        mrml.mask_from_node(segmentation, volume, "Segment_9")
    far = Image(np.zeros((4, 4, 4), np.float32), (2.0, 2.0, 2.0), (300.0, 300.0, 300.0))
    elsewhere, far_id, _ = _segmentation_of(scene, far, np.s_[1:3, 1:3, 1:3], name="Far")
    with pytest.raises(InputError, match="segment 'Far' of .* covers no voxel of 'T1'"):
        mrml.mask_from_node(elsewhere, volume, far_id, world=True)
    empty = mrml.volume_node_from_image(reference.with_array(np.zeros((10, 12, 14), np.uint8)), scene, "nothing",
                                        node=scene.AddNode(slicer.vtkMRMLLabelMapVolumeNode()))
    with pytest.raises(InputError, match="labelmap 'nothing' is empty"):
        mrml.mask_from_node(empty, volume)
    roi = scene.AddNode(slicer.vtkMRMLMarkupsROINode())
    roi.SetSize(5.0, 5.0, 5.0)
    with pytest.raises(InputError, match="a box is a region of the fixed volume"):
        mrml.mask_from_node(roi, volume, world=False)
    with pytest.raises(InputError, match="cannot be a mask"):
        mrml.mask_from_node(scene.AddNode(slicer.vtkMRMLModelNode()), volume)


# --- the trust verdict's disagreement map --------------------------------------------------------

def _map_image() -> Image:
    """A 5 mm map, NaN outside a block (the head), 0.5 mm inside and 7.5 mm at voxel (x=4, y=3, z=2)."""
    values = np.full((4, 5, 6), np.nan, np.float32)
    values[1:3, 1:4, 1:5] = 0.5
    values[2, 3, 4] = 7.5
    return Image(values, (5.0, 5.0, 5.0), (-10.0, 20.0, 30.0), oblique_direction())


def test_disagreement_map_is_a_heat_map_node_transparent_outside_the_head():
    """NaN (outside the head) becomes a value under the display threshold; the colour map spans a fixed
    0-5 mm, so agreeing candidates stay dark; refilling keeps the node."""
    image = _map_image()
    scene = slicer.vtkMRMLScene()
    node = mrml.disagreement_node_from_image(image, scene, "moving disagreement (mm)")
    back = mrml.image_from_volume_node(node)
    assert back.same_grid(image) and node.GetName() == "moving disagreement (mm)"
    inside = np.isfinite(image.array)
    assert np.array_equal(back.array[inside], image.array[inside])
    assert np.all(back.array[~inside] == mrml.OUTSIDE_HEAD) and mrml.OUTSIDE_HEAD < 0
    display = node.GetDisplayNode()
    assert display.GetApplyThreshold() and not display.GetAutoThreshold()
    assert 0.0 < display.GetLowerThreshold() <= 0.01 and display.GetUpperThreshold() >= 7.5
    assert not display.GetAutoWindowLevel()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, mrml.DISAGREEMENT_SCALE_MM)
    # No colour node in a bare scene: the first choice, found once Slicer's colour logic has added it.
    assert display.GetColorNodeID() == mrml.DISAGREEMENT_COLORS[0]
    again = mrml.disagreement_node_from_image(image.with_array(np.zeros_like(image.array)), scene, node=node)
    assert again is node and scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1


def test_disagreement_map_takes_the_first_colour_map_the_scene_holds():
    """slicer-core's colour logic adds the built-in maps but not Slicer's colour files (Inferno): the heat map
    then; with Inferno present (the colour logic gives a file's node the ID 'vtkMRMLColorTableNodeFile<name>'),
    Inferno."""
    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)
    assert scene.GetNodeByID(mrml.DISAGREEMENT_COLORS[0]) is None
    node = mrml.disagreement_node_from_image(_map_image(), scene, "map")
    assert node.GetDisplayNode().GetColorNodeID() == mrml.DISAGREEMENT_COLORS[1]
    assert scene.GetNodeByID(mrml.DISAGREEMENT_COLORS[1]) is not None
    assert slicer.vtkMRMLColorLogic.GetFileColorNodeID("Inferno.txt") == mrml.DISAGREEMENT_COLORS[0]
    inferno = slicer.vtkMRMLColorTableNode()
    inferno.SetSingletonTag("FileInferno.txt")
    scene.AddNode(inferno)
    assert inferno.GetID() == mrml.DISAGREEMENT_COLORS[0]
    node = mrml.disagreement_node_from_image(_map_image(), scene, node=node)
    assert node.GetDisplayNode().GetColorNodeID() == mrml.DISAGREEMENT_COLORS[0]


def test_the_hottest_point_of_a_map_is_its_largest_voxel_in_the_worst_slice():
    image = _map_image()
    node = mrml.disagreement_node_from_image(image, slicer.vtkMRMLScene(), "map")
    expected = to_lps(image.physical_points(np.array([[4.0, 3.0, 2.0]]))[0])  # LPS -> RAS: the same flip
    assert np.allclose(mrml.hottest_point_ras(node, 2), expected)
    assert np.allclose(mrml.hottest_point_ras(node), expected)
    below = mrml.hottest_point_ras(node, 1)  # slice 1 holds only 0.5 mm: its first such voxel
    assert below is not None and np.allclose(below, to_lps(image.physical_points(np.array([[1.0, 1.0, 1.0]]))[0]))
    assert mrml.hottest_point_ras(node, 0) is None  # all outside the head


def test_a_map_read_back_from_nifti_has_0_outside_the_head_and_that_is_transparent_too(tmp_path):
    """ITK's NIfTI reader (here through SimpleITK) reads disagreement.nii.gz's NaN as 0: the node must still
    leave the outside of the head transparent and find its hottest point inside."""
    from AutoRegisterLib.image import read_image, write_image

    image = _map_image()
    write_image(image, tmp_path / "disagreement.nii.gz")
    read = read_image(tmp_path / "disagreement.nii.gz")
    outside = ~np.isfinite(image.array)
    assert not np.isnan(read.array).any() and np.all(read.array[outside] == 0.0)
    scene = slicer.vtkMRMLScene()  # kept: the display node lives in it
    node = mrml.disagreement_node_from_image(read, scene, "map")
    assert node.GetDisplayNode().GetLowerThreshold() > 0.0  # 0 is below it: transparent
    assert np.allclose(mrml.hottest_point_ras(node, 2), to_lps(image.physical_points(np.array([[4.0, 3.0, 2.0]]))[0]))
    assert mrml.hottest_point_ras(node, 0) is None
