"""Scoring registration candidates so that the best one wins and gamed ones lose.

The design follows the measurements in ../shared/SCORING.md:

* score = mean LNCC² over (valid moving domain ∩ fixed head mask) × coverage of that head mask
  × (1 − complexity_penalty × level), level 0 for rigid, 1 for affine, 2 for deformable.
  Averaging over the intersection alone rewards a transform that pushes hard regions out of the
  moving domain; multiplying by coverage of a mask fixed by the *fixed* image removes that incentive
  (0–1 of 144 overlap-gaming fakes picked, against 66 for plain intersection LNCC²).
* Folding disqualifies: Jacobian determinant ≤ 0 over more than ``max_folding_fraction`` of the head,
  or a minimum Jacobian below ``min_jacobian``; coverage below ``min_coverage`` disqualifies too
  (LNCC² has a floor of about 0.1 for wrong alignments).
* Bending disqualifies: a deformable whose mean bending energy over the head exceeds ``max_bending`` fits
  contrast rather than anatomy (at 1 mm on real T2, a 10 mm B-spline grid scored highest at 1.6-3.1 mm
  error, its bending 4-12x the limit; benchmarks/flexibility.py).
* Global ZNCC and the signed local ZNCC mean are reported, never ranked by: they ranked failed CT runs
  and flipped alignments first. MI can give a second vote (a Borda count with the score).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass, fields

import numpy as np

from .errors import InputError
from .events import DEVICES, is_cancelled
from .image import Image, to_sitk
from .transforms import bending_energy, displacement_on_grid, jacobian_determinant


@dataclass(frozen=True)
class ScoringSettings:
    """How candidates are scored; defaults are the evidence-backed design of ../shared/SCORING.md."""

    metric: str = "lncc"  # LNCC² over (valid ∩ head) × head coverage
    window_voxels: int = 5  # in voxels of the scoring grid
    # Scores are taken on the fixed grid coarsened to voxels of at least this many mm (0: the fixed grid
    # itself), so the window is physical and a score's cost does not grow with the input's voxel count.
    grid_mm: float = 0.0
    head_mask: str = "auto"  # "auto" (threshold + largest component) or "none" (whole fixed grid)
    coverage_weight: bool = True
    min_coverage: float = 0.5
    max_folding_fraction: float = 0.01
    min_jacobian: float = -0.5
    mi_vote: bool = False
    tie_tolerance: float = 0.002
    # Each level of flexibility (rigid 0, affine 1, deformable 2) costs this fraction of the score: on
    # multi-modal pairs an MI-driven B-spline scored 0.3-4 % above the exact linear result while bending
    # anatomy (benchmarks/selection.py; 3 % is the smallest value right on all 18 measured cases).
    complexity_penalty: float = 0.03
    # A deformable whose mean bending energy over the head (mm^-2, on the scoring grid) exceeds this is
    # disqualified: it fits contrast, not anatomy (0: no limit). Every field within 0.1 mm of the best bent
    # at most 1.9e-4 and every one above 3e-4 was 0.19 mm or more off (benchmarks/flexibility.py, 1 and 3 mm).
    max_bending: float = 3e-4

    def to_dict(self) -> dict:
        """Plain-data form for result.json."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


#: Flexibility levels: simpler transforms win ties, and each level costs ``complexity_penalty`` of the score.
COMPLEXITY = {"rigid": 0, "affine": 1, "deformable": 2}


def require_torch() -> None:
    """Fail fast, before any worker starts, when torch (which every score needs) is not installed."""
    import importlib.util

    if "torch" not in sys.modules and importlib.util.find_spec("torch") is None:
        raise InputError("torch is not installed; AutoRegister needs it to score the results (pip install torch)")


def pick_device(device: str) -> str:
    """The device scores are computed on ("cpu" or "cuda") for a requested one of `events.DEVICES`."""
    if device not in DEVICES:
        raise InputError(f"device must be {', '.join(DEVICES[:-1])} or {DEVICES[-1]}, got {device!r}")
    if device == "cpu":
        return "cpu"
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if device == "cuda" and not has_cuda:
        raise InputError("device 'cuda' was requested but no CUDA device is available")
    return "cuda" if has_cuda else "cpu"


def warm_up(device: str = "auto", stop=None) -> str | None:
    """Load the scorer (torch, the compiled LNCC kernels from numba's cache); return the device it scores on.

    `stop` (an Event or a callable) is checked after each step that cannot be interrupted, so a run that is
    ending skips the rest: None when it stopped before the device was picked.
    """
    import torch

    if is_cancelled(stop):
        return None
    from .similarity import lncc

    picked = pick_device(device)
    if is_cancelled(stop):
        return picked
    tiny = torch.rand(8, 8, 8)
    lncc(tiny, tiny, window=3, mask=torch.ones(8, 8, 8))  # the first call loads the kernels
    return picked


@contextmanager
def thread_limit(threads: int):
    """Score on at most `threads` threads (torch, the numba kernels, which follow torch, and ITK); restored after."""
    import SimpleITK as sitk
    import torch

    threads = max(1, int(threads))
    old_torch, old_itk = torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old_torch)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(old_itk)


def combined_score(similarity: float, coverage: float, transform_type: str | None, settings: ScoringSettings) -> float:
    """The number candidates are ranked by: similarity × head coverage × (1 − penalty × complexity level)."""
    score = similarity * coverage if settings.coverage_weight else similarity
    return score * (1.0 - settings.complexity_penalty * COMPLEXITY.get(transform_type, 0))


def head_mask(fixed: Image, modality: str | None = None) -> np.ndarray:
    """Foreground of the fixed image: threshold (Otsu, or −500 HU for CT), largest component, holes filled."""
    import SimpleITK as sitk

    arr = np.nan_to_num(np.asarray(fixed.array, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    img = to_sitk(fixed.with_array(arr))
    if modality == "CT":
        fg = sitk.BinaryThreshold(img, -500.0, 1e30, 1, 0)
    else:
        # Otsu splits dark background from tissue; with foreground = above the threshold.
        fg = sitk.OtsuThreshold(img, 0, 1, 128)
    fg = sitk.Cast(fg, sitk.sitkUInt8)
    if sitk.GetArrayViewFromImage(fg).any():
        cc = sitk.RelabelComponent(sitk.ConnectedComponent(fg), sortByObjectSize=True)
        fg = sitk.Cast(cc == 1, sitk.sitkUInt8)
        radius = [2] * fixed.dimension
        fg = sitk.BinaryMorphologicalClosing(fg, radius, sitk.sitkBall, 1)
        fg = sitk.BinaryFillhole(fg, fullyConnected=False, foregroundValue=1)
    mask = sitk.GetArrayFromImage(fg).astype(bool)
    if mask.sum() < 0.01 * mask.size:
        # A threshold that finds (almost) nothing is no mask at all: judge the whole grid instead.
        mask = np.ones_like(mask)
    return mask


#: A moving image whose foreground is smaller than this share of the fixed head is a partial field of view.
PARTIAL_FOV = 0.8


def coverable_fraction(fixed: Image, head: np.ndarray, moving: Image, moving_modality: str | None = None) -> float:
    """The share of the fixed head the moving image could cover at best: its foreground's volume over the
    head's (1.0 unless below `PARTIAL_FOV`, so whole heads are judged as before).

    Coverage is judged against it, so a slab or a limited-FOV CT that lies inside the head is not refused,
    while a transform that slides part of it off the head still loses coverage. Volumes do not depend on
    the pose, so no transform can change this number.
    """
    head_ml = float(head.sum()) * float(np.prod(fixed.spacing_mm))
    moving_ml = float(head_mask(moving, moving_modality).sum()) * float(np.prod(moving.spacing_mm))
    share = moving_ml / head_ml if head_ml else 1.0
    return 1.0 if share >= PARTIAL_FOV else max(share, 1e-3)


def score_candidate(fixed: Image, warped: Image, valid: np.ndarray, head: np.ndarray,
                    settings: ScoringSettings, transform=None, device: str = "cpu",
                    transform_type: str | None = None, coverable: float = 1.0) -> dict:
    """All measures of one candidate, and why it is disqualified (None when it is not).

    `transform_type` (rigid, affine, deformable) sets the complexity penalty; None means no penalty.
    `coverable` is the share of the head the moving image could cover (`coverable_fraction`): the reported
    coverage, and the minimum-coverage veto, are the covered share of that.
    """
    from .similarity import lncc, mutual_information, zncc, zncc_map

    f = np.asarray(fixed.array, dtype=np.float32)
    m = np.asarray(warped.array, dtype=np.float32)
    finite = np.isfinite(f) & np.isfinite(m)
    head = head & np.isfinite(f)
    region = valid & head & finite
    head_voxels = int(head.sum())
    covered = float(region.sum()) / head_voxels if head_voxels else 0.0
    # Ranked by the covered share of the head itself (dividing by a constant would change no ranking, and
    # capping it would let a transform that blanks part of a slab go unpunished); vetoed and reported as the
    # share of what the moving image could cover.
    coverage = min(1.0, covered / coverable)
    out = {"coverage": coverage, "lncc": 0.0, "zncc": 0.0, "zncc_local": 0.0, "mi": 0.0,
           "folding_fraction": 0.0, "min_jacobian": 1.0, "bending": 0.0, "score": 0.0, "disqualified": None}
    if region.sum() < 8:
        out["disqualified"] = f"no overlap with the fixed head (coverage {coverage:.3f})"
        return out
    f = np.where(finite, f, 0.0)
    m = np.where(finite, m, 0.0)
    import torch

    mask = torch.from_numpy(region.astype(np.float32)).to(device)
    f, m = torch.from_numpy(f).to(device), torch.from_numpy(m).to(device)
    w = settings.window_voxels
    out["lncc"] = float(lncc(f, m, window=w, mask=mask, reduction="mean"))
    out["zncc_local"] = float(zncc_map(f, m, window=w, mask=mask, reduction="mean"))
    out["zncc"] = float(zncc(f, m, mask=mask))
    out["mi"] = float(mutual_information(f.cpu().numpy(), m.cpu().numpy(), mask=region))
    out["score"] = combined_score(out["lncc"] if settings.metric == "lncc" else out["mi"], covered,
                                  transform_type, settings)
    # One displacement field serves the Jacobian and the bending energy.
    field = displacement_on_grid(transform, fixed) if transform is not None and not transform.IsLinear() else None
    det = jacobian_determinant(transform, fixed, head, field) if transform is not None else np.ones(1)
    out["folding_fraction"] = float((det <= 0).mean()) if det.size else 0.0
    out["min_jacobian"] = float(det.min()) if det.size else 1.0
    out["bending"] = bending_energy(transform, fixed, head, field) if field is not None else 0.0
    if out["folding_fraction"] > settings.max_folding_fraction:
        out["disqualified"] = (f"folds {100 * out['folding_fraction']:.1f}% of the head "
                               f"(limit {100 * settings.max_folding_fraction:.1f}%)")
    elif out["min_jacobian"] < settings.min_jacobian:
        out["disqualified"] = f"minimum Jacobian {out['min_jacobian']:.2f} is below {settings.min_jacobian}"
    elif settings.max_bending and out["bending"] > settings.max_bending:
        out["disqualified"] = (f"bends more than anatomy does: mean bending energy {out['bending']:.1e} mm^-2 "
                               f"over the head (limit {settings.max_bending:.1e}); it fits contrast")
    elif coverage < settings.min_coverage:
        out["disqualified"] = f"covers {100 * coverage:.0f}% of the head (minimum {100 * settings.min_coverage:.0f}%)"
    return out


def choose_best(entries: list[dict], settings: ScoringSettings) -> int | None:
    """Index of the winner among scored entries (dicts with score, mi, coverage, transform_type).

    With ``mi_vote`` the ranking is a Borda count of the score and coverage-weighted MI, the score
    breaking ties. Entries within ``tie_tolerance`` of the top score go to the simplest transform.
    """
    if not entries:
        return None
    scores = np.array([e["score"] for e in entries], dtype=np.float64)
    if settings.mi_vote and len(entries) > 1:
        mi = np.array([e["mi"] * (e["coverage"] if settings.coverage_weight else 1.0) for e in entries])
        borda = np.argsort(np.argsort(scores)) + np.argsort(np.argsort(mi))
        top = int(borda.max())
        contenders = [i for i in range(len(entries)) if borda[i] == top]
        return max(contenders, key=lambda i: scores[i])
    best = scores.max()
    contenders = [i for i in range(len(entries)) if scores[i] >= best - settings.tie_tolerance]
    return min(contenders, key=lambda i: (COMPLEXITY.get(entries[i]["transform_type"], 3), -scores[i]))
