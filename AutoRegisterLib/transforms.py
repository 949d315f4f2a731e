"""SimpleITK transforms, and the one place that reads, samples and writes them.

`image.py` decides image conventions once; this module does the same for transforms:

- A registration transform maps FIXED physical points (LPS, mm) to MOVING points, the resampling
  direction, so ``sitk.Resample(moving, fixed, transform)`` puts the moving image on the fixed grid.
- A linear transform is ``T(x) = A·x + b`` whatever its SimpleITK type (Euler, Versor, Similarity,
  Affine, a composite of them, or a generic ``sitk.Transform``): `linear_map` reads A and b.
- A non-linear transform is represented by its displacement field ``u(x) = T(x) − x`` with LPS
  vectors, sampled on a grid (usually the fixed image's): `sampled_field`.
- Files: ``transform.tfm`` for a linear transform, ``transform.h5`` for anything holding a field.

SimpleITK is imported inside the functions, as everywhere in the library, so importing this module
stays cheap (worker processes import it before they load a toolkit).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .image import Image, to_sitk


def downcast(transform):
    """The transform as its concrete SimpleITK type (a generic `sitk.Transform` hides GetMatrix & co.)."""
    return transform.Downcast() if hasattr(transform, "Downcast") else transform


def linear_map(transform) -> tuple[np.ndarray, np.ndarray]:
    """(A, b) with T(x) = A·x + b, for any linear SimpleITK transform of any dimension."""
    dim = transform.GetDimension()
    if hasattr(transform, "GetMatrix"):
        matrix = np.array(transform.GetMatrix(), dtype=np.float64).reshape(dim, dim)
        if hasattr(transform, "GetCenter") and hasattr(transform, "GetTranslation"):
            # T(x) = A (x - c) + c + t
            centre = np.array(transform.GetCenter(), dtype=np.float64)
            return matrix, np.array(transform.GetTranslation(), dtype=np.float64) + centre - matrix @ centre
        return matrix, np.array(transform.TransformPoint((0.0,) * dim))
    # Composites, generic Transforms and the like: read the affine map off the images of the unit vectors.
    offset = np.array(transform.TransformPoint((0.0,) * dim))
    matrix = np.column_stack([np.array(transform.TransformPoint(tuple(e))) - offset for e in np.eye(dim)])
    return matrix, offset


def homogeneous_matrix(transform) -> np.ndarray:
    """(dim+1)x(dim+1) LPS matrix of a linear transform (fixed->moving); raises ValueError for non-linear ones."""
    tx = downcast(transform)
    if not tx.IsLinear():
        raise ValueError(f"{tx.GetName()} is not linear")
    matrix, offset = linear_map(tx)
    out = np.eye(len(offset) + 1)
    out[:-1, :-1] = matrix
    out[:-1, -1] = offset
    return out


def as_affine(transform):
    """Express any linear SimpleITK transform (Euler, Versor, Similarity, Affine) as an AffineTransform."""
    import SimpleITK as sitk

    dim = transform.GetDimension()
    matrix, _ = linear_map(transform)
    center = transform.GetCenter() if hasattr(transform, "GetCenter") else (0.0,) * dim
    center = np.asarray(center, dtype=np.float64)
    # T(x) = A (x - c) + c + t  =>  t = T(c) - c
    translation = np.array(transform.TransformPoint(tuple(center))) - center
    return sitk.AffineTransform(tuple(matrix.ravel()), tuple(translation), tuple(center))


def sampled_field(transform, grid: Image):
    """The transform's displacement at every voxel of `grid`: a SimpleITK vector image (float64, LPS vectors)."""
    import SimpleITK as sitk

    ref = to_sitk(grid, np.uint8)
    return sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, ref.GetSize(), ref.GetOrigin(),
                                             ref.GetSpacing(), ref.GetDirection())


def dense_field(transform, grid: Image):
    """Any fixed->moving transform sampled on `grid` (the fixed one) as one DisplacementFieldTransform."""
    import SimpleITK as sitk

    return sitk.DisplacementFieldTransform(sampled_field(transform, grid))


def displacement_field(transform, grid: Image | None = None):
    """The displacement-field image that represents a non-linear transform: a field transform's own field
    (exact, on its own grid), any other transform sampled on `grid`."""
    import SimpleITK as sitk

    tx = downcast(transform)
    if isinstance(tx, sitk.DisplacementFieldTransform):
        return tx.GetDisplacementField()
    if grid is None:
        raise ValueError(f"a reference grid is needed to sample a {tx.GetName()} as a displacement field")
    return sampled_field(tx, grid)


def field_transform_from_image(field_image):
    """Wrap a displacement-field image (any vector pixel type, LPS vectors) as a DisplacementFieldTransform."""
    import SimpleITK as sitk

    return sitk.DisplacementFieldTransform(sitk.Cast(field_image, sitk.sitkVectorFloat64))


def affine_from_field(field, max_residual_mm: float = 0.05):
    """Fit the AffineTransform whose displacement is `field` (a linear chain sampled on a grid)."""
    import SimpleITK as sitk

    disp = sitk.GetArrayFromImage(field).reshape(-1, field.GetDimension()).astype(np.float64)
    dim = field.GetDimension()
    size = field.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in reversed(size)], indexing="ij"), -1)
    idx = idx.reshape(-1, dim)[:, ::-1].astype(np.float64)  # (x, y, z) order, matching the flattened array
    m = np.array(field.GetDirection()).reshape(dim, dim) @ np.diag(field.GetSpacing())
    points = idx @ m.T + np.array(field.GetOrigin())
    # Centre the fit on the grid centre: better conditioned, and the centre is kept for the .tfm file.
    center = points.mean(axis=0)
    design = np.hstack([points - center, np.ones((len(points), 1))])
    target = points + disp
    coef, *_ = np.linalg.lstsq(design, target, rcond=None)
    residual = np.abs(design @ coef - target).max()
    if residual > max_residual_mm:
        raise RuntimeError(f"elastix's linear chain is not affine on the grid (residual {residual:.3f} mm)")
    matrix = coef[:dim].T
    # T(x) = A (x - c) + b  =>  with centre c, translation = b - c
    translation = coef[dim] - center
    return sitk.AffineTransform(tuple(matrix.ravel()), tuple(translation), tuple(center))


def jacobian_determinant(transform, grid: Image, region: np.ndarray | None = None,
                         displacement: np.ndarray | None = None) -> np.ndarray:
    """Jacobian determinant of a fixed->moving transform at the grid's voxels (inside `region` if given);
    `displacement` is the transform's `displacement_on_grid`, when the caller has it already."""
    dim = grid.dimension
    n = int(region.sum()) if region is not None else grid.array.size
    if transform is None or transform.IsLinear():
        det = 1.0 if transform is None else float(np.linalg.det(linear_map(transform)[0]))
        return np.full(n, det)
    # (z,y,x,dim) physical displacement components (x,y,z)
    u = displacement_on_grid(transform, grid) if displacement is None else displacement
    spacing_zyx = tuple(reversed(grid.spacing_mm))
    # du/d(index·spacing) along array axes (z,y,x), kept only inside the region: the head is about
    # half the grid, and a batched det over every voxel cost more than the rest of the scoring.
    keep = region if region is not None else np.ones(u.shape[:-1], bool)
    g = [[None] * dim for _ in range(dim)]  # g[i][j] = du_i/d(k_j s_j), j in ITK index order (x,y,z)
    for i in range(dim):
        for axis, grad in enumerate(np.gradient(u[..., i], *spacing_zyx)):
            g[i][dim - 1 - axis] = grad[keep]
    # x = origin + D·diag(s)·k  ⇒  du/dx = du/d(k·s) · Dᵀ
    d = grid.direction
    jac = [[sum(g[i][k] * d[j, k] for k in range(dim) if d[j, k] != 0.0) + (i == j) for j in range(dim)]
           for i in range(dim)]
    return _det(jac)


def bending_energy(transform, grid: Image, region: np.ndarray | None = None,
                   displacement: np.ndarray | None = None) -> float:
    """Mean bending energy of the transform's displacement over `region` (mm^-2): the summed squares of
    every second derivative of every component. Zero for a linear transform; a field that fits contrast
    instead of anatomy is rough, one that follows a smooth anatomical change is not."""
    if transform is None or transform.IsLinear():
        return 0.0
    u = displacement_on_grid(transform, grid) if displacement is None else displacement
    spacing_zyx = tuple(reversed(grid.spacing_mm))
    keep = region if region is not None else np.ones(u.shape[:-1], bool)
    if not keep.any():
        return 0.0
    total = np.zeros(int(keep.sum()))
    dim = grid.dimension
    for c in range(dim):
        first = np.gradient(u[..., c], *spacing_zyx)
        for a in range(dim):
            # The Hessian is symmetric: each mixed derivative is taken once and counted twice.
            for b in range(a, dim):
                second = np.gradient(first[a], spacing_zyx[b], axis=b)
                total += (1.0 if a == b else 2.0) * second[keep] ** 2
    return float(total.mean())


def displacement_on_grid(transform, grid: Image) -> np.ndarray:
    """The transform's displacement at the grid's voxels, (z,y,x,dim); a field already on the grid is read as is."""
    import SimpleITK as sitk

    if isinstance(transform, sitk.DisplacementFieldTransform):
        field = transform.GetDisplacementField()
        same = (field.GetSize() == grid.size and np.allclose(field.GetSpacing(), grid.spacing_mm)
                and np.allclose(field.GetOrigin(), grid.origin_mm)
                and np.allclose(field.GetDirection(), grid.direction.ravel()))
        if same:
            return sitk.GetArrayFromImage(field)
    return sitk.GetArrayFromImage(sampled_field(transform, grid))


def _det(m) -> np.ndarray:
    """Determinants of 2x2 or 3x3 matrices given as nested lists of per-voxel arrays, written out
    (several times faster than np.linalg.det on a stack)."""
    if len(m) == 2:
        return m[0][0] * m[1][1] - m[0][1] * m[1][0]
    return (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))


def transform_filename(transform) -> str:
    """`transform.tfm` for a linear transform, `transform.h5` for anything holding a field."""
    return "transform.tfm" if transform.IsLinear() else "transform.h5"


def write_transform(transform, folder: Path, stem: str = "transform") -> Path:
    """Write a SimpleITK transform atomically into `folder`; return its path."""
    import SimpleITK as sitk

    name = transform_filename(transform).replace("transform", stem, 1)
    final = Path(folder) / name
    tmp = final.with_name(f".{final.stem}.partial{final.suffix}")
    sitk.WriteTransform(transform, str(tmp))
    os.replace(tmp, final)
    return final
