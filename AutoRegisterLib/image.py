"""Images with explicit geometry, and the one place that converts them.

`Image` holds a voxel array in SimpleITK order ((z,)y,x) and its geometry in ITK order (x,y(,z)):
spacing in mm, origin in mm and a direction matrix whose columns are the index axes, all in LPS.
Every other representation (SimpleITK, ITK, ANTs, numpy, files; MRML lives in `mrml.py`) goes
through the functions here, so that axis order and LPS/RAS are decided exactly once.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError

#: Voxel types the library accepts; everything else (complex, bool, object) is a user error.
SUPPORTED_DTYPES = (
    np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64, np.int64,
    np.float16, np.float32, np.float64,
)


@dataclass(frozen=True, eq=False)
class Image:
    """A scalar 2D or 3D image with LPS geometry; the array is in SimpleITK order ((z,)y,x)."""

    array: np.ndarray
    spacing_mm: tuple[float, ...]
    origin_mm: tuple[float, ...]
    direction: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self):
        arr = np.asarray(self.array)
        if arr.ndim not in (2, 3):
            raise InputError(f"expected a 2D or 3D scalar image, got an array of shape {arr.shape}")
        if arr.dtype.type not in SUPPORTED_DTYPES:
            raise InputError(f"unsupported voxel type {arr.dtype}")
        dim = arr.ndim
        spacing = tuple(float(s) for s in self.spacing_mm)
        origin = tuple(float(o) for o in self.origin_mm)
        direction = np.eye(dim) if self.direction is None else np.asarray(self.direction, dtype=np.float64)
        if len(spacing) != dim or len(origin) != dim or direction.shape != (dim, dim):
            raise InputError(
                f"geometry does not match a {dim}D image: spacing {spacing}, origin {origin}, "
                f"direction shape {direction.shape}"
            )
        if not all(np.isfinite(spacing)) or min(spacing) <= 0:
            raise InputError(f"spacing must be positive and finite, got {spacing}")
        if abs(abs(np.linalg.det(direction)) - 1.0) > 1e-3:
            raise InputError("direction matrix is not orthonormal")
        object.__setattr__(self, "array", arr)
        object.__setattr__(self, "spacing_mm", spacing)
        object.__setattr__(self, "origin_mm", origin)
        object.__setattr__(self, "direction", direction.reshape(dim, dim).copy())

    @property
    def dimension(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return self.array.ndim

    @property
    def size(self) -> tuple[int, ...]:
        """Grid size in ITK order (x, y, z)."""
        return tuple(reversed(self.array.shape))

    def with_array(self, array: np.ndarray) -> Image:
        """Return an image on the same grid with other voxel values."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match the grid {self.array.shape}")
        return Image(array, self.spacing_mm, self.origin_mm, self.direction)

    def astype(self, dtype) -> Image:
        """Return a copy with another voxel type (no rescaling)."""
        return self.with_array(self.array.astype(dtype))

    def index_to_physical_matrix(self) -> np.ndarray:
        """Homogeneous matrix mapping (x,y(,z)) continuous indices to LPS millimetres."""
        dim = self.dimension
        m = np.eye(dim + 1)
        m[:dim, :dim] = self.direction @ np.diag(self.spacing_mm)
        m[:dim, dim] = self.origin_mm
        return m

    def physical_points(self, indices_xyz: np.ndarray) -> np.ndarray:
        """Map an (n, dim) array of (x,y,z) indices to LPS points in mm."""
        m = self.index_to_physical_matrix()
        dim = self.dimension
        return np.asarray(indices_xyz, dtype=np.float64) @ m[:dim, :dim].T + m[:dim, dim]

    def same_grid(self, other: Image, tol: float = 1e-4) -> bool:
        """True when both images share size, spacing, origin and direction."""
        return (
            self.array.shape == other.array.shape
            and np.allclose(self.spacing_mm, other.spacing_mm, atol=tol)
            and np.allclose(self.origin_mm, other.origin_mm, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )


# --- SimpleITK -------------------------------------------------------------------------------

def to_sitk(image: Image, dtype=None):
    """Convert to a SimpleITK image (the array is copied)."""
    import SimpleITK as sitk

    arr = image.array if dtype is None else image.array.astype(dtype)
    out = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=False)
    out.SetSpacing(image.spacing_mm)
    out.SetOrigin(image.origin_mm)
    out.SetDirection(tuple(image.direction.ravel()))
    return out


def from_sitk(img) -> Image:
    """Convert a scalar SimpleITK image."""
    import SimpleITK as sitk

    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"expected a scalar image, got {img.GetNumberOfComponentsPerPixel()} components per voxel")
    dim = img.GetDimension()
    if dim == 4:
        raise InputError(f"4D images are not supported (size {img.GetSize()}); extract one volume first")
    arr = sitk.GetArrayFromImage(img)
    return Image(arr, img.GetSpacing(), img.GetOrigin(), np.array(img.GetDirection()).reshape(dim, dim))


# --- ITK ------------------------------------------------------------------------------------

def to_itk(image: Image):
    """Convert to an ITK image (array copied, float32 for float types)."""
    import itk

    arr = image.array
    if arr.dtype.kind == "f" and arr.dtype != np.float64:
        arr = arr.astype(np.float32)
    out = itk.image_from_array(np.ascontiguousarray(arr))
    out.SetSpacing(image.spacing_mm)
    out.SetOrigin(image.origin_mm)
    out.SetDirection(itk.matrix_from_array(np.ascontiguousarray(image.direction)))
    return out


def from_itk(img) -> Image:
    """Convert an ITK scalar image."""
    import itk

    arr = np.array(itk.array_view_from_image(img), copy=True)
    direction = np.array(itk.array_from_matrix(img.GetDirection()), dtype=np.float64)
    return Image(arr, tuple(img.GetSpacing()), tuple(img.GetOrigin()), direction)


# --- ANTs -----------------------------------------------------------------------------------

def to_ants(image: Image, dtype=np.float32):
    """Convert to an ANTsImage; ANTs arrays are (x,y,z), so the array is transposed, geometry explicit."""
    import ants

    arr = np.ascontiguousarray(image.array.astype(dtype).T)
    return ants.from_numpy(
        arr, origin=list(image.origin_mm), spacing=list(image.spacing_mm), direction=image.direction.copy()
    )


def from_ants(img) -> Image:
    """Convert an ANTsImage."""
    arr = np.ascontiguousarray(img.numpy().T)
    return Image(arr, tuple(img.spacing), tuple(img.origin), np.asarray(img.direction, dtype=np.float64))


# --- numpy ----------------------------------------------------------------------------------

def from_numpy(array_zyx, spacing_mm=None, origin_mm=None, direction=None) -> Image:
    """Wrap an array in SimpleITK order; geometry defaults to 1 mm, origin 0 and identity direction."""
    array_zyx = np.asarray(array_zyx)
    dim = array_zyx.ndim
    return Image(
        array_zyx,
        (1.0,) * dim if spacing_mm is None else spacing_mm,
        (0.0,) * dim if origin_mm is None else origin_mm,
        np.eye(dim) if direction is None else direction,
    )


# --- files ----------------------------------------------------------------------------------

def read_image(path) -> Image:
    """Read NIfTI, NRRD, MHA or a DICOM series folder; user errors raise InputError naming the file."""
    p = Path(path)
    img = read_sitk(p)
    dim = img.GetDimension()
    if dim == 4 or (dim == 3 and img.GetNumberOfComponentsPerPixel() > 1):
        raise InputError(f"{p}: 4D or multi-component images are not supported (size {img.GetSize()})")
    try:
        return from_sitk(img)
    except InputError as exc:
        raise InputError(f"{p}: {exc}") from None


def read_sitk(path):
    """Read a file or DICOM series folder as a SimpleITK image, its metadata kept (any dimension and number of
    components); user errors raise InputError naming the file."""
    import SimpleITK as sitk

    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: file not found")
    _check_nifti_complete(p)
    try:
        with _native_stderr_silenced():  # ITK, MetaIO and GDCM print to fd 2; the user gets one line
            if p.is_dir():
                reader = sitk.ImageSeriesReader()
                series = reader.GetGDCMSeriesIDs(str(p))
                if not series:
                    raise InputError(f"{p}: folder holds no DICOM series")
                reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(p), series[0]))
                img = reader.Execute()
            else:
                img = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        detail = itk_reason(str(exc))
        if "Unable to determine ImageIO reader" in detail:
            detail = "not a format SimpleITK reads: NIfTI, NRRD, MHA, DICOM, ..."
        raise InputError(f"{p}: not a readable image ({detail[:160] or 'unknown format'})") from None
    return img


def itk_reason(message: str) -> str:
    """The one informative line of an ITK/SimpleITK exception (not the source-file location line)."""
    lines = [ln.strip() for ln in str(message).strip().splitlines() if ln.strip()]
    if not lines or not lines[0].startswith("Exception thrown in SimpleITK"):
        return lines[0] if lines else ""
    for i, line in enumerate(lines):
        found = re.match(r"^(?:ITK|sitk::)\s*ERROR:\s*(.*)$", line)
        if found:
            reason = re.sub(r"\(0x[0-9a-fA-F]+\)", "", found.group(1))
            return f"{reason} {lines[-1]}" if reason.endswith(":") and i + 1 < len(lines) else reason
    return lines[-1]


@contextmanager
def _native_stderr_silenced():
    """Send what C++ libraries write to file descriptor 2 to /dev/null for the duration."""
    import sys

    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2 (embedded interpreters)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _check_nifti_complete(p: Path) -> None:
    """Refuse a NIfTI file cut short: SimpleITK reads one without complaint and fills the rest with garbage."""
    import gzip
    import struct
    import zlib

    name = p.name.lower()
    if p.is_dir() or not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(p, "rb") as fh:
            header = fh.read(540)
            if len(header) < 348:
                return  # too short to be NIfTI; the reader reports it
            for endian in "<>":
                sizeof_hdr = struct.unpack(endian + "i", header[:4])[0]
                if sizeof_hdr == 348 and header[344:347] == b"n+1":
                    dims = struct.unpack(endian + "8h", header[40:56])
                    bitpix = struct.unpack(endian + "h", header[72:74])[0]
                    offset = int(struct.unpack(endian + "f", header[108:112])[0])
                    break
                if sizeof_hdr == 540 and len(header) == 540 and header[4:7] == b"n+2":
                    dims = struct.unpack(endian + "8q", header[16:80])
                    bitpix = struct.unpack(endian + "h", header[14:16])[0]
                    offset = struct.unpack(endian + "q", header[168:176])[0]
                    break
            else:
                return  # not single-file NIfTI; the reader decides
            if not 1 <= dims[0] <= 7:
                return
            expected = offset + int(np.prod([max(1, d) for d in dims[1:1 + dims[0]]])) * max(bitpix, 8) // 8
            if name.endswith(".gz"):
                actual = len(header) + sum(len(chunk) for chunk in iter(lambda: fh.read(1 << 22), b""))
            else:
                actual = p.stat().st_size
    except (EOFError, OSError, struct.error, zlib.error) as exc:
        raise InputError(f"{p}: file is truncated or corrupt ({exc}); was it copied completely?") from None
    if actual < expected:
        raise InputError(f"{p}: file is truncated ({actual} of {expected} bytes); was it copied completely?")


def write_image(image: Image, path, compress: bool = True) -> None:
    """Write an image atomically: a half-written file never takes the final name."""
    import SimpleITK as sitk

    p = Path(path)
    tmp = p.with_name(f".{p.name}.partial{os.getpid()}{''.join(p.suffixes)}")
    try:
        sitk.WriteImage(to_sitk(image), str(tmp), compress)
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()


def as_image(obj, name: str = "image") -> Image:
    """Accept a path, a SimpleITK image, an ANTsImage, an ITK image or an Image."""
    if isinstance(obj, Image):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return read_image(obj)
    mod = type(obj).__module__
    if mod.startswith("SimpleITK"):
        return from_sitk(obj)
    if mod.startswith("ants"):
        return from_ants(obj)
    if mod.startswith("itk"):
        return from_itk(obj)
    raise InputError(f"{name}: cannot use an object of type {type(obj).__name__} as an image")


def resample_to_grid(image: Image, reference: Image, transform=None, interpolator: str = "linear",
                     default_value: float = 0.0) -> Image:
    """Resample `image` onto `reference`'s grid through a fixed->moving SimpleITK transform."""
    import SimpleITK as sitk

    interp = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor,
              "bspline": sitk.sitkBSpline}[interpolator]
    tx = transform if transform is not None else sitk.Transform(reference.dimension, sitk.sitkIdentity)
    src = to_sitk(image, np.float32 if interpolator != "nearest" else None)
    out = sitk.Resample(src, to_sitk(reference, np.uint8), tx, interp, default_value, src.GetPixelID())
    return from_sitk(out)


def covering_grid(reference: Image, moving: Image, transform, step_mm: float = 4.0) -> Image:
    """`reference`'s grid (same spacing and axes) grown to hold every point that `transform` (fixed->moving)
    maps into `moving`: the output grid that keeps the whole moving extent instead of cutting it to the fixed one.

    Found by sampling, so any transform works (a displacement field is zero outside its own grid): the moving
    domain is resampled onto a padded `step_mm` grid and the box of its samples joins the reference's box.
    """
    ref_box = reference.physical_points(np.array(list(np.ndindex(*(2,) * reference.dimension)))
                                        * (np.array(reference.size) - 1))
    mov_box = moving.physical_points(np.array(list(np.ndindex(*(2,) * moving.dimension)))
                                     * (np.array(moving.size) - 1))
    # In the reference's axes: a search box padded by the moving image's diagonal on each side.
    axes = reference.direction
    local = lambda pts: (pts - np.asarray(reference.origin_mm)) @ axes  # noqa: E731
    ref_local = local(ref_box)
    pad = float(np.linalg.norm(mov_box.max(0) - mov_box.min(0)))
    lo, hi = ref_local.min(0) - pad, ref_local.max(0) + pad
    size = np.maximum(2, np.ceil((hi - lo) / step_mm).astype(int) + 1)
    probe = Image(np.zeros(tuple(reversed(size.tolist())), np.uint8), (step_mm,) * reference.dimension,
                  tuple(np.asarray(reference.origin_mm) + axes @ lo), axes)
    inside = resample_to_grid(moving.with_array(np.ones(moving.array.shape, np.float32)), probe, transform,
                              "nearest", 0.0).array > 0
    if inside.any():
        idx = np.argwhere(inside)[:, ::-1]
        found = local(probe.physical_points(np.vstack([idx.min(0) - 1, idx.max(0) + 1])))
        lo, hi = np.minimum(ref_local.min(0), found.min(0)), np.maximum(ref_local.max(0), found.max(0))
    else:
        lo, hi = ref_local.min(0), ref_local.max(0)
    spacing = np.asarray(reference.spacing_mm)
    # Whole reference voxels on either side, so the reference's own voxels keep their positions.
    before = np.ceil(np.maximum(0.0, ref_local.min(0) - lo) / spacing)
    after = np.ceil(np.maximum(0.0, hi - ref_local.max(0)) / spacing)
    size = (np.array(reference.size) + before + after).astype(int)
    origin = np.asarray(reference.origin_mm) - axes @ (before * spacing)
    return Image(np.zeros(tuple(reversed(size.tolist())), np.uint8), reference.spacing_mm, tuple(origin), axes)


def reach_mask(moving: Image, reference: Image, margin_mm: float = 10.0) -> np.ndarray:
    """The voxels of `reference`'s grid that lie inside `moving`'s box (grown by `margin_mm`), as the headers
    place them: where a registration can find moving data at all."""
    import SimpleITK as sitk

    extent = np.array(moving.size) * np.array(moving.spacing_mm) + 2.0 * margin_mm
    # A 2-voxel image spanning the grown box: nearest-neighbour sampling is 1 inside it and 0 outside.
    spacing = extent / 2.0
    corner = np.asarray(moving.origin_mm) - moving.direction @ (np.array(moving.spacing_mm) / 2.0 + margin_mm)
    box = Image(np.ones((2,) * moving.dimension, np.uint8), tuple(spacing),
                tuple(corner + moving.direction @ (spacing / 2.0)), moving.direction)
    inside = sitk.Resample(to_sitk(box), to_sitk(reference, np.uint8), sitk.Transform(), sitk.sitkNearestNeighbor,
                           0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(inside).astype(bool)


def shrink(image: Image, factor: int) -> Image:
    """Average `factor`^dim blocks into one voxel (geometry kept consistent); for coarse racing rounds."""
    import SimpleITK as sitk

    if factor <= 1:
        return image
    factors = [min(factor, n) for n in image.size]
    return from_sitk(sitk.BinShrink(to_sitk(image, np.float32), factors))


def coarsened(image: Image, spacing_mm) -> Image:
    """`image` on a grid whose voxels are at least `spacing_mm` (a number, or one per axis x, y(, z)) along
    each axis, over the same extent (axes already that coarse are kept), smoothed first so it is not aliased."""
    import SimpleITK as sitk

    old = np.asarray(image.spacing_mm)
    new = np.maximum(old, np.asarray(spacing_mm, dtype=np.float64))
    if np.allclose(new, old):
        return image
    size = np.maximum(1, np.round(np.asarray(image.size) * old / new)).astype(int)
    # The same physical extent: the first voxel's outer face stays where it was.
    origin = np.asarray(image.origin_mm) + image.direction @ ((new - old) / 2.0)
    img = to_sitk(image, np.float32)
    # An axis of fewer than 4 voxels cannot be smoothed by ITK's recursive Gaussian (nor needs it: a single slice).
    for axis in np.flatnonzero((new > old * (1 + 1e-6)) & (np.asarray(image.size) >= 4)):
        # The Gaussian that takes the old voxel's blur to about half the new voxel (sigma in mm).
        img = sitk.RecursiveGaussian(img, float(0.5 * np.sqrt(new[axis] ** 2 - old[axis] ** 2)), direction=int(axis))
    grid = Image(np.zeros(tuple(reversed(size.tolist())), np.uint8), tuple(new), tuple(origin), image.direction)
    return resample_to_grid(from_sitk(img), grid)


def prepare_input(image: Image, name: str) -> Image:
    """Float32 copy with NaN/Inf replaced by the lowest finite value (inputs themselves are never touched)."""
    arr = np.array(image.array, dtype=np.float32, copy=True)
    bad = ~np.isfinite(arr)
    if bad.all():
        raise InputError(f"{name}: every voxel is NaN or infinite")
    if bad.any():
        arr[bad] = np.min(arr[~bad])
    if arr.min() == arr.max():
        raise InputError(f"{name}: every voxel is {arr.flat[0]:g}; a constant image holds nothing to register")
    return image.with_array(arr)
