"""Greedy backend (PICSL's fast registration, PyPI ``picsl_greedy``): rigid, affine, affine -> deformable.

Greedy runs in-process on SimpleITK images through its command-line syntax
(``Greedy3D().execute("-i fix mov ...", fix=image, ...)``); nothing is written to disk except its log.

Conventions, checked against known transforms in Testing/test_greedy.py:

- Greedy's affine matrices are 4x4 in RAS physical space (ITK-SNAP's convention) and map fixed points to
  moving points. In LPS (ITK) the same map is ``F·M·F`` with ``F = diag(-1, -1, 1, 1)``.
- Its deformable output (``-o warp`` with ``-it affine``) is a displacement field on the fixed grid with
  LPS vectors in mm, applied before the affine: moving point = ``A(x + u(x))``. As a SimpleITK transform
  that is ``CompositeTransform([affine, DisplacementFieldTransform(u)])`` (a composite applies its last
  transform first); greedy's own reslicing (``-r warp affine``) gives the same image.

Stages: rigid (``-a -dof 6``); affine = rigid, then ``-a -dof 12`` started from it (12 degrees of freedom
straight from the initial alignment diverged on a 3 mm T2 -> T1 head, and so did a dof-12 pass at the
coarsest level, which is why ``affine_iterations`` has one level fewer); deformable = affine, then greedy's
deformable mode with ``-it`` the affine.

Resolution: greedy halves the image per level (factors 2^(n-1) ... 1). For the linear stages the levels
finer than ``finest_spacing_mm`` are skipped (given 0 iterations), so a 1 mm input stops at 2 mm while a
3 mm input runs at 3 mm; the deformable stage always runs every level of ``deformable_iterations``.

Masks: every greedy command gets the fixed mask as ``-gm`` (metric gradients computed only over the mask)
and the moving mask as ``-mm`` (moving voxels outside it excluded from the metric), both as uint8 SimpleITK
images passed in memory like the images (greedy's usage text). ``-moments`` uses the whole images
(GreedyAPI.cxx, RunAlignMoments: its moments ignore the masks).

Params (all optional):

- ``initialization``: ``moments`` (centres of mass, greedy ``-moments 1``), ``image-centers`` or
  ``identity`` (the headers' physical alignment) (default moments; second-order moments flipped heads)
- ``metric``: metric of the linear stages, ``NMI``, ``MI``, ``NCC`` or ``WNCC`` (default NMI: NCC left
  5-7 mm errors on T2 -> T1 heads, where NMI reached 0.6 mm)
- ``deformable_metric``: metric of the deformable stage, same choices (default NMI: NCC diverged on
  T2 -> T1; it is the better choice for same-contrast pairs)
- ``ncc_radius_vox``: patch radius of NCC/WNCC, voxels (default 2)
- ``rigid_iterations`` / ``affine_iterations`` / ``deformable_iterations``: iterations per level,
  coarse to fine (default [100, 50, 20] / [50, 20] / [50, 50, 10])
- ``smoothing_vox``: greedy's ``-s`` sigmas of the update and of the total field, voxels (default [2.0, 2.0]:
  on four 3 mm heads with a 4 mm warp it beat [3, 1.5], [4, 2], [5, 3] and [1.5, 1.5] on head error)
- ``finest_spacing_mm``: linear stages skip levels whose voxels would be finer than this (default 1.5)
- ``random_seed``: greedy's ``-seed`` (greedy's own default, 0, is not reproducible) (default 17)
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailable, InputError
from ..image import Image, to_sitk
from .base import Backend, Preset, binary_mask, check_params, set_threads

DEFAULTS = {
    "initialization": "moments",
    "metric": "NMI",
    "deformable_metric": "NMI",
    "ncc_radius_vox": 2,
    "rigid_iterations": [100, 50, 20],
    "affine_iterations": [50, 20],
    "deformable_iterations": [50, 50, 10],
    "smoothing_vox": [2.0, 2.0],
    "finest_spacing_mm": 1.5,
    "random_seed": 17,
}
METRICS = ("NMI", "MI", "NCC", "WNCC")
CHOICES = {"initialization": ("moments", "image-centers", "identity"), "metric": METRICS,
           "deformable_metric": METRICS}
#: LPS <-> RAS for homogeneous 3D matrices (its own inverse).
RAS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])
LOG_NAME = "greedy.log"


class GreedyBackend(Backend):
    """Registration with PICSL greedy through its Python wrapping (picsl_greedy)."""

    name = "greedy"

    def check_available(self) -> None:
        """Raise BackendUnavailable when picsl_greedy cannot be imported."""
        try:
            import picsl_greedy  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailable(f"picsl_greedy is not installed ({exc}); pip install picsl_greedy") from None

    def validate(self, preset: Preset) -> dict:
        """Return the preset's params merged with the defaults, or raise InputError naming the field."""
        params = check_params(preset, DEFAULTS, CHOICES)
        where = f"preset {preset.name!r}: params"
        for key in ("rigid_iterations", "affine_iterations", "deformable_iterations"):
            if any(n < 1 for n in params[key]):
                # Greedy crashes (segfault) on an affine level of 0 iterations that is not the last.
                raise InputError(f"{where}.{key} must hold iterations of at least 1 per level")
        if len(params["smoothing_vox"]) != 2 or any(s < 0 for s in params["smoothing_vox"]):
            raise InputError(f"{where}.smoothing_vox must be two sigmas >= 0 (update, total field)")
        if params["ncc_radius_vox"] < 1:
            raise InputError(f"{where}.ncc_radius_vox must be at least 1")
        if params["finest_spacing_mm"] < 0:
            raise InputError(f"{where}.finest_spacing_mm must be >= 0")
        return params

    def estimate(self, preset: Preset, fixed: Image, moving: Image, workdir: Path, threads: int,
                 fixed_mask: Image | None = None, moving_mask: Image | None = None):
        """Run the greedy stages, masked when given; return the fixed->moving transform (LPS) in SimpleITK."""
        from picsl_greedy import Greedy3D

        params = self.validate(preset)
        if fixed.dimension != 3:
            raise InputError(f"preset {preset.name!r}: the greedy backend registers 3D images only")
        threads = set_threads(threads)
        masks = {key: to_sitk(mask) for key, mask in (
            ("fixed_mask", binary_mask(fixed_mask, fixed, "fixed mask")),
            ("moving_mask", binary_mask(moving_mask, moving, "moving mask"))) if mask is not None}
        run = _Runner(Greedy3D(), to_sitk(fixed, np.float32), to_sitk(moving, np.float32), Path(workdir),
                      threads, params["random_seed"], masks)
        skip = skipped_levels(fixed, params["finest_spacing_mm"])
        linear = metric_option(params["metric"], params["ncc_radius_vox"])
        if params["initialization"] == "moments":
            run("-moments 1 -o init", init=None)
            start = "-ia init"
        else:
            start = f"-ia-{params['initialization']}"
        run(f"-a -dof 6 -m {linear} -n {schedule(params['rigid_iterations'], skip)} {start} -o rigid", rigid=None)
        if preset.transform_type == "rigid":
            return affine_from_ras(run.greedy["rigid"])
        run(f"-a -dof 12 -m {linear} -n {schedule(params['affine_iterations'], skip)} -ia rigid -o affine",
            affine=None)
        affine = affine_from_ras(run.greedy["affine"])
        if preset.transform_type == "affine":
            return affine
        sigma_update, sigma_total = params["smoothing_vox"]
        # -wp 0: keep the field exact (greedy otherwise rounds it to 0.1 voxel for compact files).
        run(f"-m {metric_option(params['deformable_metric'], params['ncc_radius_vox'])} "
            f"-n {schedule(params['deformable_iterations'], 0)} -s {sigma_update}vox {sigma_total}vox "
            "-wp 0 -it affine -o warp", warp=None)
        return compose(affine, run.greedy["warp"])


class _Runner:
    """Runs greedy commands on one fixed/moving pair, its output going to a log file in the work folder."""

    def __init__(self, greedy, fixed, moving, workdir: Path, threads: int, seed: int, masks: dict | None = None):
        self.greedy, self.fixed, self.moving = greedy, fixed, moving
        self.masks = dict(masks or {})  # "fixed_mask" / "moving_mask" -> SimpleITK image
        self.log = workdir / LOG_NAME
        options = {"fixed_mask": "-gm", "moving_mask": "-mm"}
        self.common = " ".join([f"-threads {threads} -seed {seed}"] + [f"{options[k]} {k}" for k in self.masks])

    def __call__(self, command: str, **outputs) -> None:
        import io

        text = io.StringIO()
        with _native_output_to(self.log):
            try:
                self.greedy.execute(f"-i fixed moving {command} {self.common}", out=text, err=text,
                                    fixed=self.fixed, moving=self.moving, **self.masks, **outputs)
            except RuntimeError as exc:
                raise RuntimeError(f"greedy failed ({exc}) running: greedy {command}") from None
            finally:
                with open(self.log, "a") as fh:
                    fh.write(text.getvalue())


@contextlib.contextmanager
def _native_output_to(path: Path):
    """Send what greedy's C++ code prints to file descriptors 1 and 2 (optimizer traces) into `path`."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    try:
        saved = (os.dup(1), os.dup(2))
    except OSError:  # no usable descriptors (embedded interpreters): leave the output where it goes
        yield
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for d in (*saved, fd):
            os.close(d)


def metric_option(metric: str, radius_vox: int) -> str:
    """Greedy's ``-m`` argument: NCC and WNCC take a patch radius per axis."""
    return f"{metric} {'x'.join([str(radius_vox)] * 3)}" if metric in ("NCC", "WNCC") else metric


def skipped_levels(image: Image, finest_spacing_mm: float) -> int:
    """How many of the finest halvings to skip so the finest level's voxels are at least `finest_spacing_mm`."""
    finest = min(image.spacing_mm)
    if finest <= 0 or finest >= finest_spacing_mm:
        return 0
    return math.ceil(math.log2(finest_spacing_mm / finest) - 1e-9)


def schedule(iterations: list, skip: int) -> str:
    """Greedy's ``-n`` argument: the levels, then `skip` finer levels of 0 iterations (run as no-ops)."""
    return "x".join(str(n) for n in list(iterations) + [0] * skip)


def affine_from_ras(matrix) -> object:
    """SimpleITK AffineTransform (LPS, fixed->moving) from greedy's 4x4 RAS fixed->moving matrix."""
    import SimpleITK as sitk

    lps = RAS_FLIP @ np.asarray(matrix, dtype=np.float64) @ RAS_FLIP
    return sitk.AffineTransform(tuple(lps[:3, :3].ravel()), tuple(lps[:3, 3]), (0.0, 0.0, 0.0))


def compose(affine, warp):
    """Greedy's deformable result: x -> A(x + u(x)), u its LPS displacement field on the fixed grid."""
    import SimpleITK as sitk

    field = sitk.DisplacementFieldTransform(sitk.Cast(warp, sitk.sitkVectorFloat64))
    return sitk.CompositeTransform([affine, field])
