"""User masks and the focus region as inputs (issue #13): `masks.load_mask` on every kind of source, Slicer's
segmentation files both ways, and the command line's one-line exit 2 for every bad mask, before any preset runs.

Slicer's segmentation format (Slicer/Slicer Libs/MRML/Core/vtkMRMLSegmentationStorageNode.cxx, 024b340 as stored
by the code index): WriteBinaryLabelmapRepresentation writes one NRRD whose scalar components are the *layers*
(vtkImageAppendComponents, ``kinds: list domain domain domain``; one layer is a plain 3D volume) and, per segment
N, ``SegmentN_ID``, ``SegmentN_Name``, ``SegmentN_LabelValue``, ``SegmentN_Layer`` and ``SegmentN_Extent`` (its
voxel box in the file's indices); ReadBinaryLabelmapRepresentation counts segments while ``SegmentN_ID`` exists,
takes the segment's layer from ``SegmentN_Layer`` (else N) and pads the segment with zeros outside its extent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from AutoRegisterLib.errors import InputError
from AutoRegisterLib.image import Image, to_sitk, write_image
from AutoRegisterLib.masks import (
    FocusBox,
    LoadedMask,
    MaskSpec,
    UserMasks,
    load_mask,
    load_user_masks,
    segment_names,
)

ROOT = Path(__file__).resolve().parent.parent


def grid(shape=(12, 14, 16), spacing=(2.0, 2.0, 2.0), origin=(-10.0, 4.0, 30.0), direction=None, dtype=np.float32):
    """An image of `shape` (z, y, x) with a little structure, on the given geometry."""
    values = np.arange(np.prod(shape), dtype=np.float64).reshape(shape) % 7
    return Image(values.astype(dtype), spacing, origin, direction)


def oblique():
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(0.2, -0.1, 0.3)
    return np.array(rotation.GetMatrix()).reshape(3, 3)


def write_segmentation(path, reference: Image, layers, segments):
    """A ``.seg.nrrd`` as Slicer writes it: `layers` (uint8 arrays on `reference`'s grid) are the components and
    `segments` the header entries (id, name, label value, layer, extent "i0 i1 j0 j1 k0 k1")."""
    if len(layers) == 1:
        img = sitk.GetImageFromArray(layers[0].astype(np.uint8))
    else:
        img = sitk.Compose(*[sitk.GetImageFromArray(layer.astype(np.uint8)) for layer in layers])
    img.CopyInformation(to_sitk(reference))
    img.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    img.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    img.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    for n, segment in enumerate(segments):
        for key, value in segment.items():
            img.SetMetaData(f"Segment{n}_{key}", str(value))
    sitk.WriteImage(img, str(path), True)
    return path


@pytest.fixture()
def fixed():
    return grid()


@pytest.fixture()
def liver_and_tumour(tmp_path, fixed):
    """A two-layer segmentation: Liver (label 1) and Vessels (label 2) share layer 0, Tumour overlaps the liver
    and so lies in layer 1 (as Slicer puts overlapping segments)."""
    layer0 = np.zeros(fixed.array.shape, np.uint8)
    layer0[2:8, 3:9, 4:12] = 1
    layer0[9:11, 1:3, 1:3] = 2
    layer1 = np.zeros(fixed.array.shape, np.uint8)
    layer1[4:6, 5:7, 6:9] = 1
    path = write_segmentation(tmp_path / "abdomen.seg.nrrd", fixed, [layer0, layer1], [
        {"ID": "Segment_1", "Name": "Liver", "LabelValue": 1, "Layer": 0, "Extent": "4 11 3 8 2 7"},
        {"ID": "Segment_2", "Name": "Vessels", "LabelValue": 2, "Layer": 0, "Extent": "1 2 1 2 9 10"},
        {"ID": "Segment_3", "Name": "Tumour", "LabelValue": 1, "Layer": 1, "Extent": "6 8 5 6 4 5"},
    ])
    return path, layer0, layer1


# --- load_mask: what each source means ------------------------------------------------------------

def test_a_labelmap_on_the_images_grid_is_its_nonzero_voxels(tmp_path, fixed):
    labels = np.zeros(fixed.array.shape, np.int16)
    labels[3:6, 4:9, 5:10] = 7
    labels[8, 8, 8] = -1
    path = tmp_path / "labels.nii.gz"
    write_image(fixed.with_array(labels), path)
    mask = load_mask(path, fixed, "fixed mask")
    assert mask.array.dtype == bool and mask.array.shape == fixed.array.shape
    assert np.array_equal(mask.array, labels != 0)
    assert mask.note is None and mask.description == str(path)


def test_in_memory_sources_an_image_a_simpleitk_image_and_an_array_on_the_grid(fixed):
    inside = np.zeros(fixed.array.shape, bool)
    inside[1:4, 2:5, 3:6] = True
    for source in (fixed.with_array(inside.astype(np.uint8)), to_sitk(fixed.with_array(inside.astype(np.float32))),
                   inside, inside.astype(np.uint8)):
        assert np.array_equal(load_mask(source, fixed, "moving mask").array, inside), type(source)
    loaded = load_mask(inside, fixed, "fixed mask")
    assert load_mask(loaded, fixed, "fixed mask") is loaded  # already on the grid: taken as it is


def test_a_mask_on_a_finer_grid_is_resampled_by_nearest_neighbour_with_a_note(tmp_path, fixed):
    # The same extent at 1 mm: a block of whole 2 mm voxels stays exactly that block.
    fine = grid(shape=(24, 28, 32), spacing=(1.0, 1.0, 1.0), origin=(-10.5, 3.5, 29.5))
    values = np.zeros(fine.array.shape, np.uint8)
    values[4:10, 6:12, 8:16] = 1
    path = tmp_path / "fine mask.nrrd"
    write_image(fine.with_array(values), path)
    mask = load_mask(path, fixed, "fixed mask")
    expected = np.zeros(fixed.array.shape, bool)
    expected[2:5, 3:6, 4:8] = True
    assert np.array_equal(mask.array, expected)
    assert mask.note.startswith(f"fixed mask: {path}: resampled onto the fixed image's grid")
    assert "1 x 1 x 1 mm voxels are finer than the fixed image's 2 x 2 x 2 mm" in mask.note
    assert "\n" not in mask.note


def test_a_coarser_mask_inside_the_image_is_resampled_without_a_note(tmp_path, fixed):
    coarse = grid(shape=(6, 7, 8), spacing=(4.0, 4.0, 4.0), origin=(-9.0, 5.0, 31.0))
    values = np.zeros(coarse.array.shape, np.uint8)
    values[1:3, 2:4, 2:5] = 1
    path = tmp_path / "coarse.nrrd"
    write_image(coarse.with_array(values), path)
    mask = load_mask(path, fixed, "moving mask")
    assert mask.note is None
    assert mask.array.sum() == values.sum() * 8  # each 4 mm voxel covers 2 x 2 x 2 voxels of 2 mm


def test_a_mask_partly_outside_its_image_says_how_much_is_left_out(tmp_path, fixed):
    shifted = Image(np.zeros((12, 14, 16), np.uint8), (2.0, 2.0, 2.0), (-10.0 + 16 * 2.0 - 8.0, 4.0, 30.0))
    values = np.zeros(shifted.array.shape, np.uint8)
    values[2:6, 2:6, 0:8] = 1  # x 0..7 of the mask: the first 4 inside the image, the last 4 outside
    path = tmp_path / "half out.nii.gz"
    write_image(shifted.with_array(values), path)
    mask = load_mask(path, fixed, "fixed mask")
    assert mask.array.sum() == values.sum() // 2
    assert "50% of it lies outside the fixed image and is left out" in mask.note
    assert "finer" not in mask.note


def test_a_focus_box_is_the_voxels_whose_centres_it_holds_even_when_rotated(fixed):
    box = FocusBox((0.0, 18.0, 40.0), (9.0, 7.0, 5.0))
    mask = load_mask(box, fixed, "focus")
    # Voxel centres at x = -10 + 2i: |x| <= 4.5 for i = 3..7; y = 4 + 2j: |y - 18| <= 3.5 for j = 6..8;
    # z = 30 + 2k: |z - 40| <= 2.5 for k = 4..6.
    expected = np.zeros(fixed.array.shape, bool)
    expected[4:7, 6:9, 3:8] = True
    assert np.array_equal(mask.array, expected) and mask.description.startswith("box at (0, 18, 40) mm LPS")
    turned = FocusBox((0.0, 18.0, 40.0), (12.0, 6.0, 8.0), axes=oblique())
    inside = load_mask(turned, fixed, "focus").array
    zyx = np.argwhere(np.ones(fixed.array.shape, bool))
    local = (fixed.physical_points(zyx[:, ::-1]) - np.array(turned.center_mm)) @ oblique()
    brute = np.all(np.abs(local) <= np.array(turned.size_mm) / 2, axis=1).reshape(fixed.array.shape)
    assert inside.any() and np.array_equal(inside, brute)


def test_user_masks_record_descriptions_and_notes_and_no_voxels(tmp_path, fixed):
    fine = grid(shape=(24, 28, 32), spacing=(1.0, 1.0, 1.0), origin=(-10.5, 3.5, 29.5))
    path = tmp_path / "fine.nrrd"
    write_image(fine.with_array((fine.array > 3).astype(np.uint8)), path)
    masks = load_user_masks(fixed, fixed, fixed_mask=path, focus=FocusBox((0.0, 18.0, 40.0), (9.0, 7.0, 5.0)))
    assert isinstance(masks, UserMasks) and masks and not UserMasks()
    assert masks.moving is None and len(masks.notes()) == 1
    recorded = json.loads(json.dumps(masks.to_dict()))
    assert recorded == {"fixed_mask": str(path), "moving_mask": None,
                        "focus": "box at (0, 18, 40) mm LPS, 9 x 7 x 5 mm", "notes": masks.notes()}


# --- Slicer segmentations -------------------------------------------------------------------------

def test_a_segment_is_chosen_by_name_or_id_from_its_layer_and_label_value(liver_and_tumour, fixed):
    path, layer0, layer1 = liver_and_tumour
    assert segment_names(path) == ["Liver", "Vessels", "Tumour"]
    liver = load_mask(MaskSpec(path, "Liver"), fixed, "fixed mask")
    assert np.array_equal(liver.array, layer0 == 1)
    assert liver.description == f"{path} (segment 'Liver')"
    assert np.array_equal(load_mask(MaskSpec(path, "Vessels"), fixed, "fixed mask").array, layer0 == 2)
    tumour = load_mask(MaskSpec(path, "Segment_3"), fixed, "focus")  # by ID: its own layer, overlapping the liver
    assert np.array_equal(tumour.array, layer1 == 1) and (tumour.array & liver.array).any()


def test_voxels_outside_a_segments_extent_are_not_the_segment(tmp_path, fixed):
    layer = np.zeros(fixed.array.shape, np.uint8)
    layer[2:6, 2:6, 2:6] = 1
    path = write_segmentation(tmp_path / "one.seg.nrrd", fixed, [layer], [
        {"ID": "S1", "Name": "Only", "LabelValue": 1, "Layer": 0, "Extent": "2 3 2 5 2 5"}])
    mask = load_mask(path, fixed, "moving mask")  # one segment: no name needed
    expected = np.zeros(fixed.array.shape, bool)
    expected[2:6, 2:6, 2:4] = True
    assert np.array_equal(mask.array, expected)


def test_a_segmentation_of_slicer_before_4_11_has_one_volume_per_segment(tmp_path, fixed):
    volumes = [np.zeros(fixed.array.shape, np.uint8) for _ in range(2)]
    volumes[0][1:3, 1:3, 1:3] = 1
    volumes[1][5:9, 5:9, 5:9] = 1
    img = sitk.JoinSeries([sitk.GetImageFromArray(v) for v in volumes])
    geometry = to_sitk(fixed)
    img.SetSpacing(geometry.GetSpacing() + (1.0,))
    img.SetOrigin(geometry.GetOrigin() + (0.0,))
    direction = np.eye(4)
    direction[:3, :3] = fixed.direction
    img.SetDirection(tuple(direction.ravel()))
    img.SetMetaData("Segmentation_Extent", "0 15 0 13 0 11")
    for n, name in enumerate(("Small", "Big")):
        img.SetMetaData(f"Segment{n}_ID", name)
        img.SetMetaData(f"Segment{n}_Name", name)
    path = tmp_path / "legacy.seg.nrrd"
    sitk.WriteImage(img, str(path), True)
    assert np.array_equal(load_mask(MaskSpec(path, "Big"), fixed, "fixed mask").array, volumes[1] == 1)


def test_a_segmentation_written_by_slicer_reads_back_segment_by_segment(tmp_path, slicer_segmentations):
    """Slicer's own storage node writes the file (overlapping segments: two layers), we read each segment."""
    slicer = slicer_segmentations
    from AutoRegisterLib import mrml

    reference = grid(direction=oblique())
    scene = slicer.vtkMRMLScene()
    volume = mrml.volume_node_from_image(reference, scene, "reference")
    segmentation = scene.AddNode(slicer.vtkMRMLSegmentationNode())
    expected = {}
    for name, block in (("Liver", np.s_[2:8, 3:9, 4:12]), ("Tumour", np.s_[4:6, 5:7, 6:9]), ("Kidney", np.s_[9:11, 1:4, 1:5])):
        labels = np.zeros(reference.array.shape, np.uint8)
        labels[block] = 1
        expected[name] = labels == 1
        labelmap = mrml.volume_node_from_image(reference.with_array(labels), scene, name,
                                               node=scene.AddNode(slicer.vtkMRMLLabelMapVolumeNode()))
        assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation, "")
        content = segmentation.GetSegmentation()
        content.GetSegment(content.GetNthSegmentID(content.GetNumberOfSegments() - 1)).SetName(name)
    storage = scene.AddNode(slicer.vtkMRMLSegmentationStorageNode())
    storage.SetFileName(str(tmp_path / "by slicer.seg.nrrd"))
    assert storage.WriteData(segmentation)
    assert volume is not None and segment_names(tmp_path / "by slicer.seg.nrrd") == ["Liver", "Tumour", "Kidney"]
    for name, inside in expected.items():
        mask = load_mask(MaskSpec(tmp_path / "by slicer.seg.nrrd", name), reference, "fixed mask")
        assert np.array_equal(mask.array, inside), name


def test_slicer_reads_our_segmentation_file_as_the_same_segments(liver_and_tumour, fixed, slicer_segmentations):
    """The file the tests write is Slicer's format: Slicer's own reader finds the same segments and voxels."""
    slicer = slicer_segmentations
    from AutoRegisterLib import mrml

    path, layer0, layer1 = liver_and_tumour
    scene = slicer.vtkMRMLScene()
    volume = mrml.volume_node_from_image(fixed, scene, "fixed")
    segmentation = scene.AddNode(slicer.vtkMRMLSegmentationNode())
    storage = scene.AddNode(slicer.vtkMRMLSegmentationStorageNode())
    storage.SetFileName(str(path))
    assert storage.ReadData(segmentation)
    content = segmentation.GetSegmentation()
    names = {content.GetNthSegment(i).GetName(): content.GetNthSegmentID(i) for i in range(content.GetNumberOfSegments())}
    assert set(names) == {"Liver", "Vessels", "Tumour"}
    for name in names:
        by_slicer = mrml.mask_from_node(segmentation, volume, names[name], world=True)
        ours = load_mask(MaskSpec(path, name), fixed, "fixed mask")
        assert np.array_equal(by_slicer.array != 0, ours.array), name


# --- bad input: one line, naming the problem and the file ----------------------------------------

def _empty(tmp_path, fixed):
    path = tmp_path / "empty.nii.gz"
    write_image(fixed.with_array(np.zeros(fixed.array.shape, np.uint8)), path)
    return path, "is empty"


def _elsewhere(tmp_path, fixed):
    far = Image(np.ones((4, 4, 4), np.uint8), (2.0, 2.0, 2.0), (500.0, 500.0, 500.0))
    path = tmp_path / "elsewhere.nrrd"
    write_image(far, path)
    return path, "does not overlap the fixed image"


def _flat(tmp_path, fixed):
    path = tmp_path / "slice.nrrd"
    write_image(Image(np.ones((14, 16), np.uint8), (2.0, 2.0), (-10.0, 4.0)), path)
    return path, "is 2D but the fixed image is 3D"


def _missing_segment(tmp_path, fixed):
    layer = np.zeros(fixed.array.shape, np.uint8)
    layer[1:3, 1:3, 1:3] = 1
    path = write_segmentation(tmp_path / "organs.seg.nrrd", fixed, [layer], [
        {"ID": "S1", "Name": "Liver", "LabelValue": 1, "Layer": 0, "Extent": "1 2 1 2 1 2"},
        {"ID": "S2", "Name": "Spleen", "LabelValue": 2, "Layer": 0, "Extent": "0 -1 0 -1 0 -1"}])
    return MaskSpec(path, "Kidney"), "no segment named 'Kidney'; its segments: Liver, Spleen"


def _unreadable(tmp_path, fixed):
    path = tmp_path / "notes.nrrd"
    path.write_text("this is not an image")
    return path, "not a readable image"


def _not_there(tmp_path, fixed):
    return tmp_path / "nowhere.nii.gz", "file not found"


def _segment_of_a_labelmap(tmp_path, fixed):
    path = tmp_path / "plain.nii.gz"
    write_image(fixed.with_array(np.ones(fixed.array.shape, np.uint8)), path)
    return MaskSpec(path, "Liver"), "holds no segments (not a Slicer segmentation)"


def _which_segment(tmp_path, fixed):
    spec, _ = _missing_segment(tmp_path, fixed)
    return spec.source, "holds 2 segments (Liver, Spleen); name the one to use"


def _empty_segment(tmp_path, fixed):
    spec, _ = _missing_segment(tmp_path, fixed)
    return MaskSpec(spec.source, "Spleen"), "is empty"


BAD_MASKS = [_empty, _elsewhere, _flat, _missing_segment, _unreadable, _not_there, _segment_of_a_labelmap,
             _which_segment, _empty_segment]


@pytest.mark.parametrize("make", BAD_MASKS, ids=[m.__name__.strip("_") for m in BAD_MASKS])
def test_a_bad_mask_is_one_line_naming_the_problem_and_the_file(tmp_path, fixed, make):
    source, problem = make(tmp_path, fixed)
    with pytest.raises(InputError) as caught:
        load_mask(source, fixed, "fixed mask")
    message = str(caught.value)
    path = source.source if isinstance(source, MaskSpec) else source
    assert message.startswith("fixed mask: ") and str(path) in message and problem in message, message
    assert "\n" not in message


def test_bad_in_memory_masks_say_what_is_wrong(fixed):
    for source, problem in ((np.zeros((3, 4), bool), "is 2D but the fixed image is 3D"),
                            (np.ones((12, 14, 15), bool), "shape (12, 14, 15) is not the fixed image's grid"),
                            (np.zeros(fixed.array.shape, bool), "is empty"),
                            (MaskSpec(fixed, "Liver"), "needs a segmentation file"),
                            (FocusBox((900.0, 0.0, 0.0), (5.0, 5.0, 5.0)), "does not overlap"),
                            (object(), "cannot use an object of type object")):
        with pytest.raises(InputError) as caught:
            load_mask(source, fixed, "focus" if isinstance(source, FocusBox) else "fixed mask")
        assert problem in str(caught.value), str(caught.value)
    with pytest.raises(InputError, match="every side must be positive"):
        FocusBox((0.0, 0.0, 0.0), (5.0, 0.0, 5.0))
    with pytest.raises(InputError, match="shape"):
        load_mask(LoadedMask(np.ones((2, 2, 2), bool), None, "x"), fixed, "fixed mask")


# --- the command line: exit 2, one line, before any preset runs -----------------------------------

def run_cli(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "AutoRegisterLib", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture()
def pair(tmp_path, fixed):
    paths = tmp_path / "fixed image.nrrd", tmp_path / "moving.nrrd"
    write_image(fixed, paths[0])
    write_image(fixed.with_array(fixed.array[:, :, ::-1].copy()), paths[1])
    return paths


CLI_CASES = [_empty, _elsewhere, _flat, _missing_segment, _unreadable]


@pytest.mark.parametrize("make", CLI_CASES, ids=[m.__name__.strip("_") for m in CLI_CASES])
def test_the_command_line_refuses_a_bad_mask_with_exit_2_before_any_preset_runs(tmp_path, fixed, pair, make):
    source, problem = make(tmp_path, fixed)
    path, segment = (source.source, source.segment) if isinstance(source, MaskSpec) else (source, None)
    args = [*pair, "--out", tmp_path / "out", "--presets", "sitk-rigid", "--progress-json", "--fixed-mask", path]
    proc = run_cli(*args, *(["--fixed-mask-segment", segment] if segment else []))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoregister: error: fixed mask: "), proc.stderr
    assert str(path) in lines[0] and problem in lines[0] and "Traceback" not in proc.stderr
    events = [json.loads(line)["event"] for line in proc.stdout.splitlines()]
    assert events == ["hello", "done"]  # no worker started
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--fixed-mask-segment", "--moving-mask-segment", "--focus-segment"])
def test_a_segment_option_without_its_mask_is_a_usage_error(tmp_path, pair, flag):
    proc = run_cli(*pair, "--out", tmp_path / "out", flag, "Liver")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    mask_flag = flag[: -len("-segment")]
    assert len(lines) == 1 and f"{flag} needs {mask_flag}" in lines[0], proc.stderr


def test_engine_command_passes_masks_and_segments_as_options_the_parser_reads(tmp_path):
    from AutoRegisterLib.cli import build_parser, engine_command

    argv = engine_command("f.nrrd", "m.nrrd", tmp_path, fixed_mask="-odd name.seg.nrrd", fixed_mask_segment="Liver",
                          moving_mask="m mask.nii.gz", focus="box.nrrd")
    args = build_parser().parse_args(argv[argv.index("-m") + 2:])
    assert (args.fixed_mask, args.fixed_mask_segment) == ("-odd name.seg.nrrd", "Liver")
    assert (args.moving_mask, args.moving_mask_segment, args.focus, args.focus_segment) == (
        "m mask.nii.gz", None, "box.nrrd", None)
    with pytest.raises(ValueError, match="focus_segment needs focus"):
        engine_command("f.nrrd", "m.nrrd", tmp_path, focus_segment="Liver")


# --- auto_register: the masks reach the race and result.json --------------------------------------

def test_auto_register_loads_masks_first_records_them_and_hands_them_to_the_race(fixed, tmp_path, monkeypatch):
    from AutoRegisterLib import pipeline

    raced = {}

    def fake_race(*args, **kwargs):
        raced.update(kwargs)
        return "cpu", 0.0

    monkeypatch.setattr(pipeline, "run_race", fake_race)
    inside = np.zeros(fixed.array.shape, bool)
    inside[2:6, 2:6, 2:6] = True
    box = FocusBox((0.0, 18.0, 40.0), (9.0, 7.0, 5.0))
    result = pipeline.auto_register(fixed, fixed, fixed_modality="T1", moving_modality="T1", presets=["sitk-rigid"],
                                    fixed_mask=inside, focus=box)
    masks = raced["masks"]  # the race's masks (race.race_masks): 0/1 images on their images' grids
    assert np.array_equal(masks["user fixed"].array > 0, inside) and np.array_equal(masks["fixed"].array > 0, inside)
    assert "moving" not in masks and (masks["focus"].array > 0).any()
    assert [c.name for c in result.candidates] == ["sitk-rigid", "focus-rigid"]  # the focus's own candidate
    assert result.inputs["masks"] == {"fixed_mask": "numpy array", "moving_mask": None, "focus": box.describe(),
                                      "notes": []}
    raced.clear()
    with pytest.raises(InputError, match="moving mask: numpy array: is empty"):
        pipeline.auto_register(fixed, fixed, fixed_modality="T1", moving_modality="T1", presets=["sitk-rigid"],
                               moving_mask=np.zeros(fixed.array.shape, bool))
    assert raced == {}  # refused before the race


@pytest.mark.slow
def test_a_run_with_masks_prints_the_note_first_and_records_the_masks(rigid_case4, tmp_path):
    fixed_path, moving_path = tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz"
    write_image(rigid_case4.fixed, fixed_path)
    write_image(rigid_case4.moving, moving_path)
    # A head mask at twice the resolution: resampled onto the 4 mm grid, with a note.
    head = rigid_case4.fixed
    fine = Image(np.repeat(np.repeat(np.repeat((head.array > np.percentile(head.array, 60)).astype(np.uint8), 2, 0),
                                     2, 1), 2, 2),
                 tuple(s / 2 for s in head.spacing_mm),
                 tuple(np.asarray(head.origin_mm) - head.direction @ (np.asarray(head.spacing_mm) / 4)), head.direction)
    mask_path = tmp_path / "head mask.nrrd"
    write_image(fine, mask_path)
    out = tmp_path / "out"
    proc = run_cli(fixed_path, moving_path, "--out", out, "--presets", "sitk-rigid", "--quiet",
                   "--fixed-mask", mask_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if line.startswith("autoregister: note: ")]
    assert len(notes) == 1 and f"fixed mask: {mask_path}: resampled" in notes[0] and "finer" in notes[0]
    recorded = json.loads((out / "result.json").read_text())["inputs"]["masks"]
    assert recorded["fixed_mask"] == str(mask_path) and recorded["moving_mask"] is None
    assert recorded["notes"] == [notes[0][len("autoregister: note: "):]]
