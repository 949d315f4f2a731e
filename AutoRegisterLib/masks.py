"""User masks and the focus region: where the user says the images hold what matters.

A mask is a file (a labelmap, nonzero inside; or a Slicer segmentation, ``.seg.nrrd``, with one segment
chosen by name), an `Image`, a SimpleITK image, a numpy array on its image's grid, or, for a focus region
drawn as a box (Slicer's ROI), a `FocusBox` in LPS millimetres. `load_mask` puts it on its image's grid as a
bool array, (z,y,x) like `Image.array`, resampling by nearest neighbour when it lies on another grid, and
refuses in one line naming the file what cannot be what the user meant: an empty mask, one outside its
image, a 2D mask for a 3D image, a segment that does not exist, a file that does not read.

Slicer writes a segmentation (vtkMRMLSegmentationStorageNode::WriteBinaryLabelmapRepresentation) as one NRRD
whose voxels are label values: one scalar component per *layer* (overlapping segments go to separate layers;
a single layer is a plain 3D volume), and per segment N the header keys ``SegmentN_ID``, ``SegmentN_Name``,
``SegmentN_LabelValue``, ``SegmentN_Layer`` and ``SegmentN_Extent`` (the segment's voxel box in the file's
indices, "i0 i1 j0 j1 k0 k1"). Its reader (ReadBinaryLabelmapRepresentation) counts segments while
``SegmentN_ID`` exists and takes layer N when ``SegmentN_Layer`` is missing (here a segment without
``SegmentN_LabelValue`` is its layer's nonzero voxels); files of Slicer before 4.11 are 4D, one binary volume
per segment on the last axis.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .image import Image, from_sitk, read_sitk, resample_to_grid

#: The masks a run takes, as `load_mask` names them, and the image each lies on.
IMAGE_OF = {"fixed mask": "fixed image", "moving mask": "moving image", "focus": "fixed image"}
#: Mask voxels whose centres are checked against the image's extent (a sample of them, for large masks).
EXTENT_SAMPLE = 200_000


@dataclass(frozen=True)
class MaskSpec:
    """A mask file and, for a Slicer segmentation file, the name (or ID) of the segment to use."""

    source: object
    segment: str | None = None


@dataclass(frozen=True)
class FocusBox:
    """A box in LPS millimetres: its centre, its side lengths and (optionally) its axes as the columns of a
    rotation matrix (default: the LPS axes). Slicer's ROI becomes one (`mrml.focus_box_from_roi_node`)."""

    center_mm: tuple
    size_mm: tuple
    axes: tuple | None = None

    def __post_init__(self):
        center = tuple(float(c) for c in self.center_mm)
        size = tuple(float(s) for s in self.size_mm)
        axes = np.eye(len(center)) if self.axes is None else np.asarray(self.axes, dtype=np.float64)
        if len(center) not in (2, 3) or len(size) != len(center) or axes.shape != (len(center),) * 2:
            raise InputError(f"focus box: centre {center}, size {size} and axes {axes.shape} do not describe a box")
        if not all(np.isfinite(center + size)) or min(size) <= 0:
            raise InputError(f"focus box: every side must be positive and finite, got size {size} mm")
        if not np.allclose(axes.T @ axes, np.eye(len(center)), atol=1e-4):
            raise InputError("focus box: its axes are not orthonormal")
        object.__setattr__(self, "center_mm", center)
        object.__setattr__(self, "size_mm", size)
        object.__setattr__(self, "axes", tuple(tuple(float(v) for v in row) for row in axes))

    def describe(self) -> str:
        """How result.json names the box."""
        centre = ", ".join(f"{c:g}" for c in self.center_mm)
        size = " x ".join(f"{s:g}" for s in self.size_mm)
        turned = "" if np.allclose(self.axes, np.eye(len(self.center_mm))) else ", rotated"
        return f"box at ({centre}) mm LPS, {size} mm{turned}"

    def to_mask(self, image: Image) -> np.ndarray:
        """The voxels of `image` whose centres lie inside the box, as a bool array (z,y,x)."""
        dim = image.dimension
        if len(self.center_mm) != dim:
            raise InputError(f"focus box: {len(self.center_mm)}D box for a {dim}D image")
        # Box coordinates are linear in the voxel index: local = base + A @ index.
        axes = np.asarray(self.axes)
        matrix = image.index_to_physical_matrix()
        a = axes.T @ matrix[:dim, :dim]
        base = axes.T @ (matrix[:dim, dim] - np.asarray(self.center_mm))
        half = np.asarray(self.size_mm) / 2.0
        # Only the index block around the box's corners can hold it.
        corners = np.array(np.meshgrid(*[[-h, h] for h in half], indexing="ij")).reshape(dim, -1).T
        indices = np.linalg.solve(a, (corners - base).T).T
        size_xyz = np.asarray(image.size)
        low = np.clip(np.floor(indices.min(axis=0)).astype(int), 0, size_xyz)
        high = np.clip(np.ceil(indices.max(axis=0)).astype(int) + 1, 0, size_xyz)
        inside = np.zeros(image.array.shape, dtype=bool)
        if np.any(high <= low):
            return inside
        ranges = [np.arange(lo, hi, dtype=np.float64) for lo, hi in zip(low, high)]
        # One z slice at a time: a whole-volume box on a 512^3 grid must not allocate gigabytes.
        outer = ranges[2] if dim == 3 else [None]
        for k in outer:
            local_ok = None
            for axis in range(dim):
                value = base[axis] + a[axis, 0] * ranges[0][np.newaxis, :] + a[axis, 1] * ranges[1][:, np.newaxis]
                if dim == 3:
                    value = value + a[axis, 2] * k
                ok = np.abs(value) <= half[axis] + 1e-9
                local_ok = ok if local_ok is None else local_ok & ok
            if dim == 3:
                inside[int(k), low[1]:high[1], low[0]:high[0]] = local_ok
            else:
                inside[low[1]:high[1], low[0]:high[0]] = local_ok
        return inside


@dataclass
class LoadedMask:
    """A mask on its image's grid: a bool array (z,y,x), a note when putting it there lost something, and how
    result.json names it."""

    array: np.ndarray
    note: str | None
    description: str


@dataclass
class UserMasks:
    """The run's user masks, each a `LoadedMask` or None: the fixed image's, the moving image's, and the focus
    region (on the fixed image: where the result is judged)."""

    fixed: LoadedMask | None = None
    moving: LoadedMask | None = None
    focus: LoadedMask | None = None

    def __bool__(self) -> bool:
        """True when any mask is given."""
        return any(m is not None for m in (self.fixed, self.moving, self.focus))

    def notes(self) -> list[str]:
        """One line per mask whose resampling lost something."""
        return [m.note for m in (self.fixed, self.moving, self.focus) if m is not None and m.note]

    def to_dict(self) -> dict:
        """The JSON form in result.json's inputs: what each mask was, and the notes (no voxels)."""
        return {"fixed_mask": self.fixed.description if self.fixed else None,
                "moving_mask": self.moving.description if self.moving else None,
                "focus": self.focus.description if self.focus else None,
                "notes": self.notes()}


def load_user_masks(fixed: Image, moving: Image, fixed_mask=None, moving_mask=None, focus=None) -> UserMasks:
    """Load the masks a run was given (any `load_mask` source, or None) onto their images' grids."""
    return UserMasks(
        fixed=None if fixed_mask is None else load_mask(fixed_mask, fixed, "fixed mask"),
        moving=None if moving_mask is None else load_mask(moving_mask, moving, "moving mask"),
        focus=None if focus is None else load_mask(focus, fixed, "focus"))


def load_mask(source, image: Image, what: str) -> LoadedMask:
    """Put a mask on `image`'s grid. `source` is a path, a `MaskSpec` (a file and a segment name), a
    `FocusBox`, an `Image`, a SimpleITK image, a numpy array of the image's shape (nonzero inside) or a
    `LoadedMask`; `what` ("fixed mask", "moving mask", "focus") names it in messages. Raises InputError, one
    line naming the problem and the file."""
    image_name = IMAGE_OF.get(what, "image")
    segment = None
    if isinstance(source, MaskSpec):
        source, segment = source.source, source.segment
        if segment is not None and not isinstance(source, (str, os.PathLike)):
            raise InputError(f"{what}: a segment name ({segment!r}) needs a segmentation file, "
                             f"not a {type(source).__name__}")
    if isinstance(source, LoadedMask):
        if source.array.shape != image.array.shape:
            raise InputError(f"{what}: {source.description}: shape {source.array.shape} is not the "
                             f"{image_name}'s {image.array.shape}")
        return source
    if isinstance(source, FocusBox):
        inside = source.to_mask(image)
        if not inside.any():
            raise InputError(f"{what}: {source.describe()}: holds no voxel centre of the {image_name}; "
                             f"it does not overlap it (or is thinner than a voxel)")
        return LoadedMask(inside, None, source.describe())
    if isinstance(source, (str, os.PathLike)):
        label = str(source) if segment is None else f"{source} (segment {segment!r})"
        mask = _read_mask_file(Path(source), segment, what)
        return _on_grid(mask, image, what, image_name, label)
    if isinstance(source, np.ndarray):
        return _from_array(source, image, what, image_name)
    if isinstance(source, Image):
        return _on_grid(_binary(source), image, what, image_name, "Image")
    if type(source).__module__.startswith("SimpleITK"):
        try:
            mask = from_sitk(source)
        except InputError as exc:
            raise InputError(f"{what}: SimpleITK image: {exc}") from None
        return _on_grid(_binary(mask), image, what, image_name, "SimpleITK image")
    raise InputError(f"{what}: cannot use an object of type {type(source).__name__} as a mask")


def segment_names(path) -> list[str]:
    """The names of the segments of a Slicer segmentation file, in its order ([] for a plain labelmap)."""
    return [s.name for s in _segments(read_sitk(path))]


# --- files ---------------------------------------------------------------------------------

@dataclass
class _Segment:
    """One segment's entry in a segmentation file's header."""

    index: int
    id: str
    name: str
    label_value: int | None
    layer: int
    extent: tuple | None = None


def _segments(img) -> list[_Segment]:
    """The segments a segmentation file's header lists, read as Slicer's reader does."""
    keys = set(img.GetMetaDataKeys())

    def get(index, key):
        name = f"Segment{index}_{key}"
        return img.GetMetaData(name) if name in keys else None

    found, index = [], 0
    while get(index, "ID") is not None:
        label, layer, extent = get(index, "LabelValue"), get(index, "Layer"), get(index, "Extent")
        found.append(_Segment(
            index, get(index, "ID"), get(index, "Name") or get(index, "ID"),
            int(float(label)) if label not in (None, "") else None,
            int(float(layer)) if layer not in (None, "") else index,
            tuple(int(float(v)) for v in extent.split()) if extent and len(extent.split()) == 6 else None))
        index += 1
    return found


def _read_mask_file(path: Path, segment: str | None, what: str) -> Image:
    """The mask a file holds as a 0/1 uint8 `Image` in its own geometry."""
    import SimpleITK as sitk

    try:
        img = read_sitk(path)
    except InputError as exc:
        raise InputError(f"{what}: {exc}") from None
    segments = _segments(img)
    if segment is not None and not segments:
        raise InputError(f"{what}: {path}: holds no segments (not a Slicer segmentation); "
                         f"give it without a segment name to use its nonzero voxels")
    if not segments:
        if img.GetNumberOfComponentsPerPixel() != 1 or img.GetDimension() == 4:
            raise InputError(f"{what}: {path}: a mask holds one label per voxel, this file has "
                             f"{img.GetNumberOfComponentsPerPixel()} component(s) of size {img.GetSize()}")
        return _binary(_as_image(img, path, what))
    chosen = _choose_segment(segments, segment, path, what)
    layers = img.GetNumberOfComponentsPerPixel()
    if img.GetDimension() == 4:  # before Slicer 4.11: one volume per segment along the last axis
        size = list(img.GetSize())
        if chosen.layer >= size[3]:
            raise InputError(f"{what}: {path}: segment {chosen.name!r} is in layer {chosen.layer}, the file has "
                             f"{size[3]}")
        volume = sitk.Extract(img, size[:3] + [0], [0, 0, 0, chosen.layer])
    elif layers > 1:
        if chosen.layer >= layers:
            raise InputError(f"{what}: {path}: segment {chosen.name!r} is in layer {chosen.layer}, the file has "
                             f"{layers}")
        volume = sitk.VectorIndexSelectionCast(img, chosen.layer)
    else:
        if chosen.layer != 0:
            raise InputError(f"{what}: {path}: segment {chosen.name!r} is in layer {chosen.layer}, the file has 1")
        volume = img
    labels = _as_image(volume, path, what)
    inside = labels.array == chosen.label_value if chosen.label_value is not None else labels.array != 0
    if chosen.extent is not None:
        # Slicer pads a segment with zeros outside its extent: voxels there are not the segment's.
        box = np.zeros_like(inside)
        i0, i1, j0, j1, k0, k1 = chosen.extent
        if inside.ndim == 3:
            box[max(k0, 0):k1 + 1, max(j0, 0):j1 + 1, max(i0, 0):i1 + 1] = True
        else:
            box[max(j0, 0):j1 + 1, max(i0, 0):i1 + 1] = True
        inside &= box
    return labels.with_array(inside.astype(np.uint8))


def _choose_segment(segments: list[_Segment], wanted: str | None, path: Path, what: str) -> _Segment:
    names = ", ".join(s.name for s in segments)
    if wanted is None:
        if len(segments) == 1:
            return segments[0]
        raise InputError(f"{what}: {path}: holds {len(segments)} segments ({names}); name the one to use")
    for key in ("name", "id"):
        matches = [s for s in segments if getattr(s, key) == wanted]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise InputError(f"{what}: {path}: {len(matches)} segments are named {wanted!r}; give its ID "
                             f"({', '.join(s.id for s in matches)})")
    raise InputError(f"{what}: {path}: no segment named {wanted!r}; its segments: {names}")


def _as_image(img, path: Path, what: str) -> Image:
    try:
        return from_sitk(img)
    except InputError as exc:
        raise InputError(f"{what}: {path}: {exc}") from None


def _binary(image: Image) -> Image:
    """Nonzero (and not NaN) is inside, as 0/1 uint8."""
    values = image.array
    inside = np.nan_to_num(values, nan=0.0) != 0 if values.dtype.kind == "f" else values != 0
    return image.with_array(inside.astype(np.uint8))


# --- onto the image's grid -----------------------------------------------------------------

def _from_array(array: np.ndarray, image: Image, what: str, image_name: str) -> LoadedMask:
    if array.ndim != image.dimension:
        raise InputError(f"{what}: numpy array: is {array.ndim}D but the {image_name} is {image.dimension}D")
    if array.shape != image.array.shape:
        raise InputError(f"{what}: numpy array: shape {array.shape} is not the {image_name}'s grid "
                         f"{image.array.shape} (z, y, x); give an Image to place it by its geometry")
    if array.dtype.kind not in "biuf":
        raise InputError(f"{what}: numpy array: voxel type {array.dtype} is not a mask (bool or numbers)")
    inside = np.nan_to_num(array, nan=0.0) != 0 if array.dtype.kind == "f" else array != 0
    if not inside.any():
        raise InputError(f"{what}: numpy array: is empty (no nonzero voxel)")
    return LoadedMask(np.ascontiguousarray(inside), None, "numpy array")


def _on_grid(mask: Image, image: Image, what: str, image_name: str, label: str) -> LoadedMask:
    """A 0/1 mask in its own geometry, checked and resampled (nearest neighbour) onto `image`'s grid."""
    if mask.dimension != image.dimension:
        raise InputError(f"{what}: {label}: is {mask.dimension}D but the {image_name} is {image.dimension}D")
    if not mask.array.any():
        raise InputError(f"{what}: {label}: is empty (no nonzero voxel)")
    if image.same_grid(mask):
        return LoadedMask(mask.array.astype(bool), None, label)
    inside = resample_to_grid(mask, image, interpolator="nearest").array.astype(bool)
    outside = _fraction_outside(mask, image)
    if not inside.any():
        if outside >= 1.0:
            raise InputError(f"{what}: {label}: does not overlap the {image_name}")
        raise InputError(f"{what}: {label}: is smaller than one voxel of the {image_name}; nothing is left on its grid")
    losses = []
    if _finer(mask, image):
        losses.append(f"its {_mm(mask.spacing_mm)} mm voxels are finer than the {image_name}'s "
                      f"{_mm(image.spacing_mm)} mm")
    if outside > 0.0:
        losses.append(f"{max(1, round(100 * outside))}% of it lies outside the {image_name} and is left out")
    note = None
    if losses:
        note = f"{what}: {label}: resampled onto the {image_name}'s grid; " + "; ".join(losses)
    return LoadedMask(inside, note, label)


def _finer(mask: Image, image: Image) -> bool:
    """True when the mask's voxels are smaller than the image's (nearest neighbour then drops detail)."""
    ours, theirs = np.asarray(mask.spacing_mm), np.asarray(image.spacing_mm)
    if np.allclose(np.abs(mask.direction), np.abs(image.direction), atol=1e-3):
        return bool(np.any(ours < theirs * 0.99))
    return bool(ours.min() < theirs.min() * 0.99)


def _fraction_outside(mask: Image, image: Image) -> float:
    """The fraction of the mask's voxels whose centres fall outside the image's extent (from a sample)."""
    zyx = np.argwhere(mask.array != 0)
    if len(zyx) > EXTENT_SAMPLE:
        zyx = zyx[np.random.default_rng(0).choice(len(zyx), EXTENT_SAMPLE, replace=False)]
    points = mask.physical_points(zyx[:, ::-1])
    matrix = image.index_to_physical_matrix()
    dim = image.dimension
    indices = np.linalg.solve(matrix[:dim, :dim], (points - matrix[:dim, dim]).T).T
    size = np.asarray(image.size)
    inside = np.all((indices >= -0.5) & (indices <= size - 0.5), axis=1)
    return float(1.0 - inside.mean())


def _mm(spacing) -> str:
    return " x ".join(f"{s:g}" for s in spacing)
