"""The pose search: a race over starting poses, before the presets, so that images that start 90-180°
apart (a patient scanned the other way round) or far apart still register.

Candidate rigid poses (fixed->moving, like every registration transform):

* the header (identity) and the centres of mass;
* the principal axes of both heads, with their four proper sign choices;
* the 24 rotations of the cube about the centres of mass: every start is then within 63° of the truth,
  and a short rigid refinement on the pose grid brings the best few the rest of the way.

Each is scored on a coarse grid (``grid_mm``) by the scorer's own measure, LNCC² over the overlap times
head coverage. The best few are refined, and the best refined pose replaces the header only when it is far
from it (``min_angle_deg`` or ``min_shift_mm``) and beats the refined header by ``margin``: a moderately
misaligned case keeps starting from its header, as before.

The pose is applied by moving the moving image's header (`posed`), never its voxels, so every backend starts
from it without knowing, and the presets' transforms are composed with it afterwards (`with_pose`). The
same search on a left-right mirrored copy of the moving image tells whether the images look mirrored; a
reflection is reported, never applied.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np

from .events import is_cancelled
from .image import Image, coarsened, resample_to_grid, to_sitk

#: Fewer foreground voxels than this on the pose grid (either image) and the search is skipped.
MIN_VOXELS = 64
#: Anatomical names of the LPS axes, for messages.
AXIS_NAMES = ("left-right", "front-back", "vertical")


@dataclass(frozen=True)
class PoseSettings:
    """How the starting pose is searched; the defaults were measured by benchmarks/rescue.py."""

    enabled: bool = True
    grid_mm: float = 6.0
    window_voxels: int = 3
    refine: int = 2  # the best this many poses (and the header) are refined
    refine_iterations: int = 40
    min_angle_deg: float = 20.0  # a pose closer to the header than this (and ...)
    min_shift_mm: float = 20.0  # ... than this) is left to the presets
    margin: float = 0.25  # a far pose must beat the refined header by this fraction of its score
    mirror_margin: float = 0.10  # a mirrored pose must beat every proper one by this fraction to be reported
    warn_angle_deg: float = 45.0

    def to_dict(self) -> dict:
        """Plain-data form for result.json."""
        return dict(self.__dict__)


@dataclass
class Pose:
    """The outcome of the pose search: the pose the presets start from (None: the header) and why."""

    transform: object | None  # SimpleITK AffineTransform, fixed->moving, rigid; None keeps the header
    source: str  # which candidate won: header, centres of mass, principal axes, cube rotation
    angle_deg: float
    axis: str
    shift_mm: float
    header_score: float
    best_score: float
    mirror_score: float | None
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain-data form for result.json."""
        return {"applied": self.transform is not None, "source": self.source,
                "angle_deg": round(self.angle_deg, 1), "axis": self.axis, "shift_mm": round(self.shift_mm, 1),
                "header_score": self.header_score, "best_score": self.best_score,
                "mirror_score": self.mirror_score, "seconds": round(self.seconds, 3), "warnings": self.warnings,
                "matrix": None if self.transform is None else _matrix(self.transform).tolist()}


def _matrix(transform) -> np.ndarray:
    from .transforms import homogeneous_matrix

    return homogeneous_matrix(transform)


def rigid(rotation: np.ndarray, centre_fixed: np.ndarray, centre_moving: np.ndarray):
    """The transform p -> R (p - c_f) + c_m as a SimpleITK AffineTransform (centre c_f)."""
    import SimpleITK as sitk

    translation = np.asarray(centre_moving, float) - np.asarray(centre_fixed, float)
    return sitk.AffineTransform(tuple(np.asarray(rotation, float).ravel()), tuple(translation),
                                tuple(np.asarray(centre_fixed, float)))


def cube_rotations() -> list[np.ndarray]:
    """The 24 proper rotations that map the coordinate axes onto themselves (signed permutations, det +1)."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            r = np.zeros((3, 3))
            for row, (col, s) in enumerate(zip(perm, signs)):
                r[row, col] = s
            if np.linalg.det(r) > 0:
                out.append(r)
    return out


def rotation_angle_axis(rotation: np.ndarray) -> tuple[float, np.ndarray]:
    """Angle (degrees) and unit axis of a 3x3 rotation matrix."""
    r = np.asarray(rotation, float)
    angle = float(np.degrees(np.arccos(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))))
    w, v = np.linalg.eig(r)
    axis = np.real(v[:, np.argmin(np.abs(w - 1.0))])
    return angle, axis / (np.linalg.norm(axis) or 1.0)


def axis_name(axis: np.ndarray) -> str:
    """The anatomical axis nearest to `axis` (LPS), or its components when none is within 30°."""
    axis = np.asarray(axis, float)
    i = int(np.argmax(np.abs(axis)))
    if abs(axis[i]) >= np.cos(np.radians(30.0)):
        return AXIS_NAMES[i]
    return "(" + ", ".join(f"{a:+.2f}" for a in axis) + ") LPS"


def posed(moving: Image, transform) -> Image:
    """`moving` with its header moved so that `transform` (rigid, fixed->moving) becomes the identity: voxel
    values untouched, so no backend sees a resampled image. Registering the result gives T_reg; the
    transform for the original moving image is `with_pose(T_reg, transform)`."""
    from .transforms import linear_map

    r, t = linear_map(transform)
    # T(O' + D' S i) = O + D S i for every index i  <=>  D' = Rᵀ D and O' = Rᵀ (O - t).
    direction = r.T @ moving.direction
    origin = r.T @ (np.asarray(moving.origin_mm) - t)
    return Image(moving.array, moving.spacing_mm, tuple(origin), direction)


def with_pose(transform, pose_transform):
    """The fixed->moving transform of the original moving image: `transform` (found on the posed image),
    then the pose. Linear chains stay one AffineTransform, so they are still written as ``.tfm``."""
    import SimpleITK as sitk

    from .transforms import downcast, linear_map

    inner = downcast(transform)
    if inner.IsLinear():
        a1, b1 = linear_map(inner)
        a2, b2 = linear_map(pose_transform)
        return sitk.AffineTransform(tuple((a2 @ a1).ravel()), tuple(a2 @ b1 + b2), (0.0, 0.0, 0.0))
    return sitk.CompositeTransform([pose_transform, inner])  # the last added applies first


def _centre_and_axes(image: Image, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre of mass (mm, LPS) of the foreground and its principal axes (columns, largest first)."""
    idx = np.argwhere(mask)[:, ::-1].astype(np.float64)  # (x, y, z) indices
    pts = image.physical_points(idx)
    centre = pts.mean(axis=0)
    cov = np.cov((pts - centre).T)
    w, v = np.linalg.eigh(cov)
    return centre, v[:, np.argsort(w)[::-1]]


#: `similarity.FLAT_VARIANCE`, repeated so that the pose search never imports torch (a test keeps them equal).
FLAT_VARIANCE = 1e-6


def lncc_squared(fixed: np.ndarray, moving: np.ndarray, mask: np.ndarray, window: int) -> float:
    """The scorer's LNCC² (`similarity.lncc` with a mask, "valid" windows, mean over the mask) in float64 with
    SciPy box filters: on the pose grid it takes milliseconds and needs no torch, whose import (1-3 s in a
    new process) then stays where the race hides it, beside the workers."""
    from scipy.ndimage import uniform_filter

    inside = np.asarray(mask, bool)
    w = inside.astype(np.float64)

    def standardized(x):
        x = np.asarray(x, np.float64)
        mean, std = x[inside].mean(), x[inside].std()
        return (x - mean) / (std if std > 0 else 1.0) * w

    f, m = standardized(fixed), standardized(moving)
    volume = float(window) ** f.ndim

    def box(x):
        return uniform_filter(x, size=window, mode="constant", cval=0.0) * volume

    n = box(w)
    n_safe = np.where(n > 0, n, 1.0)
    sf, sm = box(f), box(m)
    cross = box(f * m) - sf * sm / n_safe
    vf = box(f * f) - sf * sf / n_safe
    vm = box(m * m) - sm * sm / n_safe
    ok = inside & (vf > FLAT_VARIANCE * n) & (vm > FLAT_VARIANCE * n)
    cc = np.clip(np.where(ok, cross ** 2 / np.where(ok, vf * vm, 1.0), 0.0), 0.0, 1.0)
    return float(cc[inside].mean()) if inside.any() else 0.0


class _Scorer:
    """LNCC² over (valid ∩ head) × head coverage of a pose, on the pose grid."""

    def __init__(self, fixed: Image, head: np.ndarray, window: int):
        self.fixed, self.head, self.window = fixed, head, window
        self.f = np.asarray(fixed.array, np.float64)
        self.head_voxels = max(1, int(head.sum()))

    def __call__(self, moving: Image, transform) -> float:
        warped = resample_to_grid(moving, self.fixed, transform, "linear", float("nan")).array
        valid = np.isfinite(warped) & self.head
        if valid.sum() < 27:
            return 0.0
        similarity = lncc_squared(self.f, np.where(valid, warped, 0.0), valid, self.window)
        return similarity * float(valid.sum()) / self.head_voxels


def _refined(fixed: Image, moving: Image, head: np.ndarray, start, iterations: int, multimodal: bool):
    """A short rigid optimisation from `start` on the pose grid (Mattes MI across modalities, else correlation)."""
    import SimpleITK as sitk

    from .transforms import linear_map

    a, _ = linear_map(start)
    centre = np.asarray(start.GetCenter())
    euler = sitk.Euler3DTransform()
    euler.SetCenter(tuple(centre))
    euler.SetMatrix(tuple(a.ravel()), 1e-4)
    euler.SetTranslation(tuple(np.asarray(start.TransformPoint(tuple(centre))) - centre))
    reg = sitk.ImageRegistrationMethod()
    if multimodal:
        reg.SetMetricAsMattesMutualInformation(24)
    else:
        reg.SetMetricAsCorrelation()
    # Only where the moving image reaches from this start: a slab's samples elsewhere would pull it off.
    from .image import reach_mask

    region = head & reach_mask(posed(moving, start), fixed, 0.0)
    mask = to_sitk(fixed.with_array((region if region.sum() > 64 else head).astype(np.uint8)))
    reg.SetMetricFixedMask(mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(2.0, 0.01, iterations, relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetInitialTransform(euler, inPlace=False)
    try:
        out = reg.Execute(to_sitk(fixed, np.float32), to_sitk(moving, np.float32))
    except RuntimeError:  # e.g. every sample left the moving image: the start stands
        return start
    from .transforms import as_affine

    return as_affine(out)


def _search(fixed: Image, moving: Image, head: np.ndarray, moving_fg: np.ndarray, score: _Scorer,
            settings: PoseSettings, multimodal: bool, cancel, refine: int,
            header: bool = True) -> tuple[list[tuple[float, str, object]], float]:
    """Every candidate pose scored, the best `refine` (and the header, when `header`) refined; (refined results
    best first, the refined header's score)."""
    import SimpleITK as sitk

    c_f, axes_f = _centre_and_axes(fixed, head)
    c_m, axes_m = _centre_and_axes(moving, moving_fg)
    candidates = [("header", sitk.AffineTransform(3)), ("centres of mass", rigid(np.eye(3), c_f, c_m))]
    for signs in itertools.product((1.0, -1.0), repeat=3):
        r = axes_m @ np.diag(signs) @ axes_f.T
        if np.linalg.det(r) > 0:
            candidates.append(("principal axes", rigid(r, c_f, c_m)))
    candidates += [("cube rotation", rigid(r, c_f, c_m)) for r in cube_rotations() if not np.allclose(r, np.eye(3))]
    scored = []
    for name, tx in candidates:
        if is_cancelled(cancel):
            from .errors import Cancelled

            raise Cancelled("registration cancelled")
        scored.append((score(moving, tx), name, tx))
    scored.sort(key=lambda s: -s[0])
    chosen = [s for s in scored if s[1] != "header"][:refine] + [s for s in scored if header and s[1] == "header"]
    refined = []
    header_score = 0.0
    for start_score, name, tx in chosen:
        better = _refined(fixed, moving, head, tx, settings.refine_iterations, multimodal)
        value = score(moving, better)
        if value < start_score:  # a refinement that went astray: the start stands
            value, better = start_score, tx
        refined.append((value, name, better))
        if name == "header":
            header_score = value
    refined.sort(key=lambda s: -s[0])
    return refined, header_score


def search_pose(fixed: Image, moving: Image, fixed_modality: str | None = None, moving_modality: str | None = None,
                settings: PoseSettings | None = None, cancel=None) -> Pose:
    """Race starting poses on the `grid_mm` grid and return the one the presets should start from (the header
    unless a far pose scores clearly better), with warnings for far poses and mirrored-looking images."""
    from .scoring import head_mask

    settings = settings or PoseSettings()
    t0 = time.perf_counter()
    f = coarsened(fixed, settings.grid_mm)
    m = coarsened(moving, settings.grid_mm)
    head = head_mask(f, fixed_modality)
    moving_fg = head_mask(m, moving_modality)
    if min(f.size + m.size) < 4 or min(int(head.sum()), int(moving_fg.sum())) < MIN_VOXELS:
        # Too small on the pose grid for centres, axes or a local score to mean anything: the header stands.
        return Pose(None, "header", 0.0, "", 0.0, 0.0, 0.0, None, time.perf_counter() - t0)
    score = _Scorer(f, head, settings.window_voxels)
    multimodal = (fixed_modality or "") != (moving_modality or "")
    refined, header_score = _search(f, m, head, moving_fg, score, settings, multimodal, cancel, settings.refine)
    best_score, source, best = refined[0]

    # The same race on a left-right mirror image of the moving one, its best start refined: only to report
    # a reflection, so the header need not be refined again.
    mirrored = m.with_array(np.ascontiguousarray(m.array[:, :, ::-1]))
    mirror_refined, _ = _search(f, mirrored, head, moving_fg[:, :, ::-1], score, settings, multimodal, cancel,
                                refine=1, header=False)
    mirror_score = mirror_refined[0][0]

    from .transforms import linear_map

    r, b = linear_map(best)
    angle, axis = rotation_angle_axis(r)
    c_f = np.asarray(best.GetCenter())
    shift = float(np.linalg.norm(np.asarray(best.TransformPoint(tuple(c_f))) - c_f))
    far = angle >= settings.min_angle_deg or shift >= settings.min_shift_mm
    applied = far and best_score > header_score * (1.0 + settings.margin)
    warnings = []
    if applied and angle >= settings.warn_angle_deg:
        # ASCII only: the command line prints warnings, and a terminal may not be UTF-8.
        warnings.append(f"the moving image looks rotated {angle:.0f} degrees about the {axis_name(axis)} axis "
                        f"(relative to its header); the presets started from that pose")
    if mirror_score > max(best_score, header_score) * (1.0 + settings.mirror_margin):
        warnings.append("the moving image looks left-right mirrored: check its header "
                        "(a reflection is never applied)")
    if not applied:
        source, angle, shift, axis = "header", 0.0, 0.0, np.array([0.0, 0.0, 1.0])
    return Pose(transform=best if applied else None, source=source, angle_deg=angle,
                axis=axis_name(axis) if applied else "", shift_mm=shift, header_score=header_score,
                best_score=best_score, mirror_score=mirror_score, seconds=time.perf_counter() - t0,
                warnings=warnings)
