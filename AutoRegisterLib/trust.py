"""The trust verdict: how far to trust the winner, without reference data.

Several independent candidates from different toolkits are second opinions. Where they agree with the
winner within a millimetre it is probably right; where they disagree by centimetres at least one is wrong,
and the disagreement map shows where. The signals (`signals`) are mapped to an estimate of the winner's
mean error over the head, with a 90 % interval, by a calibration fitted on cases with ground truth
(``benchmarks/trust.py``; the fit is versioned data in ``resources/trust/calibration.json``). The light:

* green: the interval's upper end is at most ``green_max_mm`` (calibrated so no green case was above 2 mm)
  and a credible second opinion (one that scored at least `CREDIBLE` of the winner's score) exists;
* red: the estimate is above ``red_min_mm`` (a true error above 3 mm is likely) and rests on a credible
  second opinion; never applied silently;
* amber: anything between, and every verdict without a credible second opinion (it rests on the score, which
  neither clears nor condemns a result).

Candidates that failed or were disqualified never enter the disagreement; candidates eliminated in a
coarse round enter with their coarse transform (a second opinion at millimetre scale).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .image import Image, coarsened
from .transforms import displacement_on_grid

CALIBRATION_PATH = Path(__file__).resolve().parent / "resources" / "trust" / "calibration.json"
CALIBRATION_ENV = "AUTOREGISTER_TRUST_CALIBRATION"
#: The grid the disagreement is measured on (mm): transforms are smooth at this scale and it costs little.
GRID_MM = 5.0
LIGHTS = ("green", "amber", "red")
#: The disagreement map's value outside the head: no disagreement is negative, and NIfTI readers turn NaN into 0.
OUTSIDE_HEAD = -1.0


#: A second opinion is credible when it scored at least this share of the winner's score: one that scored far
#: lower is more likely wrong than the winner, so its disagreement says little about the winner.
CREDIBLE = 0.8
#: The version of `features`, recorded in a calibration fitted on them.
FEATURES_VERSION = 3
#: Opinions within this many mm (median over the head) of the winner agree with it.
AGREE_MM = 2.0


@dataclass
class Signals:
    """What the verdict is estimated from; every field is measured without ground truth."""

    opinions: int  # second opinions: other candidates that passed the vetoes
    backends: int  # toolkits among them other than the winner's
    nearest_mm: float | None  # the median disagreement with the candidate that agrees best
    nearest_other_mm: float | None  # the same among other toolkits only
    median_mm: float | None  # median over the second opinions of their median disagreement
    p95_mm: float | None  # 95th percentile over the head of the map (median over opinions, per voxel)
    score: float
    coverage: float
    margin: float  # winner's score minus the runner-up's, relative to the winner's
    credible: int = 0  # opinions that scored at least `CREDIBLE` of the winner's score
    credible_nearest_mm: float | None = None  # the nearest among them
    credible_median_mm: float | None = None  # their median disagreement, median over them
    agree: float = 0.0  # share of the opinions within `AGREE_MM` of the winner

    def to_dict(self) -> dict:
        """Plain-data form for result.json."""
        return {k: (None if v is None else round(float(v), 4)) for k, v in self.__dict__.items()}


@dataclass
class Verdict:
    """The winner's estimated error (mm) with a 90 % interval, the light, why, and where candidates disagree."""

    light: str
    estimate_mm: float
    low_mm: float
    high_mm: float
    reason: str
    signals: Signals
    seconds: float = 0.0
    disagreement: Image | None = field(default=None, repr=False)  # mm, on a coarse fixed grid (None: no opinion)
    worst_slice: int | None = None  # the axial slice (of `disagreement`) where it is largest

    def to_dict(self) -> dict:
        """Plain-data form for result.json."""
        return {"light": self.light, "estimate_mm": round(self.estimate_mm, 2), "low_mm": round(self.low_mm, 2),
                "high_mm": round(self.high_mm, 2), "reason": self.reason, "signals": self.signals.to_dict(),
                "seconds": round(self.seconds, 3), "worst_slice": self.worst_slice}


def second_opinions(result) -> list:
    """The candidates whose transforms may vote: every other OK candidate, and those eliminated in a coarse round."""
    from .events import Status

    out = []
    for cand in result.candidates:
        if cand is result.best:
            continue
        if cand.status == Status.OK and cand.transform is not None:
            out.append((cand, cand.transform))
        elif cand.status == Status.ELIMINATED and getattr(cand, "coarse_transform", None) is not None:
            out.append((cand, cand.coarse_transform))
    return out


def signals(result, head: np.ndarray | None = None, grid_mm: float = GRID_MM) -> tuple[Signals, Image | None]:
    """The signals of `result`'s winner and the disagreement map (mm, on the fixed grid coarsened to `grid_mm`,
    `OUTSIDE_HEAD` outside the head); `head` is the fixed head mask there (computed when None)."""
    from .scoring import head_mask

    best = result.best
    grid = coarsened(result.fixed, grid_mm)
    if head is None:
        head = head_mask(grid, result.fixed_modality)
    ranked_scores = sorted((c.score for c in result.candidates if c.score is not None and c is not best
                            and str(c.status) == "ok"), reverse=True)
    margin = (best.score - ranked_scores[0]) / best.score if ranked_scores and best.score else 1.0
    opinions = second_opinions(result)
    base = dict(score=float(best.score or 0.0), coverage=float(best.coverage or 0.0), margin=float(margin))
    if not opinions:
        return Signals(0, 0, None, None, None, None, **base), None
    winner = displacement_on_grid(best.transform, grid)[head]
    per = [(cand, np.linalg.norm(displacement_on_grid(transform, grid)[head] - winner, axis=-1))
           for cand, transform in opinions]
    medians = np.array([float(np.median(d)) for _, d in per])
    other = [float(np.median(d)) for c, d in per if c.backend != best.backend]
    stacked = np.median(np.stack([d for _, d in per]), axis=0)
    disagreement = np.full(head.shape, OUTSIDE_HEAD, np.float32)
    disagreement[head] = stacked
    credible = [m for (c, _), m in zip(per, medians)
                if best.score and (c.score or 0.0) >= CREDIBLE * best.score]
    sig = Signals(len(per), len({c.backend for c, _ in per if c.backend != best.backend}),
                  float(medians.min()), min(other) if other else None, float(np.median(medians)),
                  float(np.percentile(stacked, 95)), **base, credible=len(credible),
                  credible_nearest_mm=min(credible) if credible else None,
                  credible_median_mm=float(np.median(credible)) if credible else None,
                  agree=float(np.mean(medians <= AGREE_MM)))
    return sig, grid.with_array(disagreement)


# --- calibration ---------------------------------------------------------------------------------------


def features(sig: Signals, single: bool = False) -> np.ndarray:
    """The model's inputs: the logs of the credible opinions' disagreements (with a 0.1 mm floor) and the
    share that agrees; without a credible second opinion (`single`), the score alone."""
    if single:
        # Coverage is 1 in almost every case, so a coefficient fitted on it only extrapolates.
        return np.array([1.0, sig.score])
    return np.array([1.0, np.log(max(sig.credible_nearest_mm, 0.1)), np.log(max(sig.credible_median_mm, 0.1)),
                     sig.agree])


def has_second_opinion(sig: Signals) -> bool:
    """True when a credible second opinion exists (else the verdict rests on the score alone)."""
    return sig.credible > 0 and sig.credible_nearest_mm is not None


@dataclass
class Calibration:
    """The fitted map from signals to the winner's error: log-linear, with residual quantiles for the interval."""

    coef: list
    q_low: float
    q_high: float
    single_coef: list
    single_q_low: float
    single_q_high: float
    green_max_mm: float = 2.0
    red_min_mm: float = 3.0
    version: int = 3  # of `features`: a calibration fitted on other features is refused, not misread
    fitted: dict = field(default_factory=dict)  # what it was fitted on, and the command that refits it

    @classmethod
    def load(cls, path=None) -> Calibration:
        """Read the calibration JSON: `path`, else $AUTOREGISTER_TRUST_CALIBRATION (one refitted on a site's own
        cases), else the shipped one."""
        path = path or os.environ.get(CALIBRATION_ENV) or CALIBRATION_PATH
        cal = cls(**json.loads(Path(path).read_text(encoding="utf-8")))
        if cal.version != FEATURES_VERSION:
            raise ValueError(f"{path}: a calibration of feature version {cal.version}, this library's is "
                             f"{FEATURES_VERSION}; refit it (python benchmarks/trust.py --fit)")
        return cal

    def save(self, path=CALIBRATION_PATH) -> None:
        """Write it as JSON (versioned data in the repository)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.__dict__, indent=1) + "\n", encoding="utf-8")

    def interval(self, sig: Signals) -> tuple[float, float, float]:
        """(estimate, low, high) in mm: the 90 % interval of the winner's mean error over the head."""
        single = not has_second_opinion(sig)
        x = features(sig, single)
        coef, lo, hi = ((self.single_coef, self.single_q_low, self.single_q_high) if single
                        else (self.coef, self.q_low, self.q_high))
        log_est = float(x @ np.asarray(coef))
        return float(np.exp(log_est)), float(np.exp(log_est + lo)), float(np.exp(log_est + hi))

    def judge(self, sig: Signals) -> tuple[str, float, float, float]:
        """(light, estimate, low, high): without a credible second opinion, amber; else red when the estimate is
        above ``red_min_mm``, green when the interval ends at or below ``green_max_mm``, amber otherwise."""
        est, low, high = self.interval(sig)
        if not has_second_opinion(sig):
            # The score alone is no measure of accuracy (it depends on the modalities and the images): it
            # neither clears nor condemns a result; the interval and the reason say how little is known.
            return "amber", est, low, high
        if est > self.red_min_mm:
            return "red", est, low, high
        if high <= self.green_max_mm:
            return "green", est, low, high
        return "amber", est, low, high


def fit(sigs: list[Signals], errors_mm: list[float], coverage: float = 0.9, **thresholds) -> Calibration:
    """Least squares of log(error) on `features`; the interval from the residuals' quantiles."""
    err = np.log(np.maximum(np.asarray(errors_mm, float), 0.05))
    q = ((1 - coverage) / 2, (1 + coverage) / 2)

    def one(rows: list[int], single: bool):
        x = np.stack([features(sigs[i], single) for i in rows])
        coef, *_ = np.linalg.lstsq(x, err[rows], rcond=None)
        res = np.sort(err[rows] - x @ coef)
        # Split-conformal order statistics: the k-th residual from each end, k = ceil((n + 1) * tail), so
        # that a few cases do not give an interval narrower than the evidence allows.
        k = max(1, int(np.ceil((len(res) + 1) * q[0])))
        k = min(k, len(res))
        return coef.tolist(), float(res[k - 1]), float(res[len(res) - k])

    coef, lo, hi = one([i for i, s in enumerate(sigs) if has_second_opinion(s)], False)
    # Without a second opinion: the score and coverage alone, fitted on every case (their intervals are wide).
    single_coef, single_lo, single_hi = one(list(range(len(sigs))), True)
    return Calibration(coef, lo, hi, single_coef, single_lo, single_hi, **thresholds)


# --- the verdict ----------------------------------------------------------------------------------------

def headline(trust: dict) -> str:
    """A verdict read back from result.json in one line: "GREEN: estimated error 0.6 mm (90 %: 0.3-1.1 mm)"
    ("" when there is none)."""
    if not trust or not trust.get("light"):
        return ""
    return (f"{str(trust['light']).upper()}: estimated error {float(trust['estimate_mm']):.1f} mm "
            f"(90 %: {float(trust['low_mm']):.1f}-{float(trust['high_mm']):.1f} mm)")


def _where(disagreement: Image, head_centre_mm: np.ndarray) -> str:
    """Where the disagreement is largest, in words (left/right, front/back, upper/lower part of the head)."""
    arr = np.maximum(np.nan_to_num(disagreement.array, nan=0.0), 0.0)
    top = arr >= np.quantile(arr[arr > 0], 0.95) if (arr > 0).any() else arr > 0
    if not top.any():
        return "over the head"
    centre = disagreement.physical_points(np.argwhere(top)[:, ::-1].mean(0)[None])[0] - head_centre_mm
    words = []
    for value, (pos, neg), cut in zip(centre, (("left", "right"), ("back", "front"), ("upper", "lower")),
                                      (20.0, 25.0, 20.0)):
        if abs(value) > cut:
            words.append(pos if value > 0 else neg)  # LPS: +x left, +y back (posterior), +z up
    return f"in the {' '.join(words)} part of the head" if words else "in the middle of the head"


def verdict(result, calibration: Calibration | None = None) -> Verdict:
    """The verdict on `result`'s winner (raises ValueError when there is none)."""
    from .scoring import head_mask

    if result.best is None:
        raise ValueError("no winner to judge")
    t0 = time.perf_counter()
    calibration = calibration or Calibration.load()
    grid = coarsened(result.fixed, GRID_MM)
    head = head_mask(grid, result.fixed_modality)
    sig, disagreement = signals(result, head)
    light, est, low, high = calibration.judge(sig)
    worst, where = None, ""
    if disagreement is not None:
        centre = grid.physical_points(np.argwhere(head)[:, ::-1].mean(0)[None])[0]
        where = _where(disagreement, centre)
        arr = np.maximum(np.nan_to_num(disagreement.array, nan=0.0), 0.0)
        worst = int(np.argmax(arr.reshape(arr.shape[0], -1).max(axis=1)))
    if disagreement is None:
        reason = ("only one candidate passed: no second opinion, so the estimate rests on the score alone "
                  "and its interval is wide")
    elif not has_second_opinion(sig):
        reason = (f"every other candidate scored far below the winner (none within {100 * (1 - CREDIBLE):.0f} % of "
                  f"its score) and they disagree with it by {sig.median_mm:.1f} mm {where}: no credible second "
                  "opinion, so the estimate rests on the score alone")
    elif sig.credible_nearest_mm < 1.0:
        reason = (f"{sig.credible} other candidate{'s' if sig.credible > 1 else ''} scored close to the winner; the "
                  f"closest agrees within {sig.credible_nearest_mm:.1f} mm; they differ most "
                  f"({sig.p95_mm:.1f} mm) {where}")
    else:
        reason = (f"candidates disagree by {sig.credible_median_mm:.1f} mm (up to {sig.p95_mm:.1f} mm {where}); "
                  f"the closest is {sig.credible_nearest_mm:.1f} mm away")
    return Verdict(light, est, low, high, reason, sig, time.perf_counter() - t0, disagreement, worst)
