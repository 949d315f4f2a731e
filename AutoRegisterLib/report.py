"""Outputs of a run: the winner's transform and warped image, result.json, report.png, a text table.

The output folder is built under a temporary name beside its destination and renamed into place, so
it is either complete or absent. matplotlib is optional: without it everything but report.png is
written, and result.json says why it is missing (``"report": "skipped: matplotlib is not installed"``).
`results.read_outputs` reads the folder back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import InputError
from .image import coarsened, write_image
from .results import DISAGREEMENT_IMAGE, REPORT_PNG, RESULT_MARKER, WARPED_IMAGE


def check_output_dir(out_dir) -> Path:
    """Fail early, with one line, when `out_dir` cannot receive our outputs."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / RESULT_MARKER).exists():
        raise InputError(f"{out}: folder is not empty and holds no earlier AutoRegister result; choose another --out")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise InputError(f"{parent}: output parent folder does not exist")
    try:  # os.access says yes to root even on read-only mounts: try for real
        shutil.rmtree(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
    except OSError as exc:
        raise InputError(f"{parent}: output folder is not writable ({exc.strerror})") from None
    return out


def write_outputs(result, out_dir, keep_all: bool = False) -> Path:
    """Write transform, warped.nii.gz, report.png and result.json into `out_dir`, atomically."""
    from .transforms import write_transform

    out = check_output_dir(out_dir)
    parent = out.resolve().parent
    staging = parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        if result.best is not None:
            result.best.transform_path = write_transform(result.best.transform, staging).name
            output = getattr(result, "output", None)
            write_image(output if output is not None else result.best.warped, staging / WARPED_IMAGE)
            trust = getattr(result, "trust", None)
            if getattr(trust, "disagreement", None) is not None:
                write_image(trust.disagreement, staging / DISAGREEMENT_IMAGE)
        if keep_all:
            (staging / "candidates").mkdir()
            for cand in result.candidates:
                if cand.transform is not None:
                    path = write_transform(cand.transform, staging / "candidates", stem=cand.name)
                    if cand is not result.best:
                        cand.transform_path = str(path.relative_to(staging))
        summary = result.to_dict()
        summary["report"] = write_report_png(result, staging / REPORT_PNG)
        (staging / RESULT_MARKER).write_text(json.dumps(summary, indent=2, default=_json_default))
        _swap_into_place(staging, out)
    except OSError as exc:  # disk full, folder made read-only during the run: one line, nothing half-written
        shutil.rmtree(staging, ignore_errors=True)
        raise InputError(f"{out}: could not write the outputs ({exc.strerror or exc})") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _swap_into_place(staging: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return str(obj)


def _middle_slice(arr: np.ndarray) -> np.ndarray:
    return arr if arr.ndim == 2 else arr[arr.shape[0] // 2]


def _normalise(arr: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(arr, [1, 99]) if arr.size else (0.0, 1.0)
    return np.clip((arr - lo) / (hi - lo + 1e-12), 0, 1)


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    """Alternate square tiles of two 2D images of the same shape."""
    yy, xx = np.indices(a.shape)
    step = max(1, min(a.shape) // tiles)
    return np.where(((yy // step) + (xx // step)) % 2 == 0, a, b)


def write_report_png(result, path) -> str:
    """Fixed against each candidate (checkerboard of the middle axial slice) and the score bars.

    Returns the file name written, or "skipped: <why>" when matplotlib is not installed (the report is
    the only output that needs it, so a run without it still writes everything else).
    """
    try:
        import matplotlib
    except ImportError:
        return "skipped: matplotlib is not installed"

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [c for c in result.candidates if c.warped is not None]
    trust = getattr(result, "trust", None)
    disagreement = getattr(trust, "disagreement", None)
    ncols = max(1, min(4, len(shown) + (disagreement is not None)))
    panels = len(shown) + (disagreement is not None)
    nrows = 1 + (panels + ncols - 1) // ncols if panels else 1
    fig = plt.figure(figsize=(4 * ncols, 3.6 * nrows))
    fixed = _normalise(_middle_slice(result.fixed.array))
    # Candidates other than the winner stay on the scoring grid (scoring.grid_mm).
    scored_on = coarsened(result.fixed, result.table.scoring.grid_mm) if result.table is not None else result.fixed
    fixed_scored = _normalise(_middle_slice(scored_on.array))
    for i, cand in enumerate(shown):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        under = fixed if cand.warped.array.shape == result.fixed.array.shape else fixed_scored
        ax.imshow(checkerboard(under, _normalise(_middle_slice(cand.warped.array))), cmap="gray",
                  origin="lower")
        mark = " ★" if cand is result.best else ""
        ax.set_title(f"{cand.name}{mark}\nscore {cand.score:.3f} ({cand.status})", fontsize=9)
        ax.axis("off")
    if disagreement is not None:
        ax = fig.add_subplot(nrows, ncols, len(shown) + 1)
        plane = np.maximum(np.nan_to_num(disagreement.array[trust.worst_slice or 0], nan=0.0), 0.0)
        im = ax.imshow(plane, cmap="magma", origin="lower", vmin=0.0, vmax=max(2.0, float(plane.max())))
        fig.colorbar(im, ax=ax, fraction=0.046, label="mm")
        ax.set_title(f"where candidates disagree (slice {trust.worst_slice})", fontsize=9)
        ax.axis("off")
    ax = fig.add_subplot(nrows, 1, nrows)
    if trust is not None and hasattr(trust, "light"):
        colour = {"green": "tab:green", "amber": "tab:orange", "red": "tab:red"}[trust.light]
        ax.set_title(f"trust {trust.light.upper()}: estimated error {trust.estimate_mm:.1f} mm "
                     f"(90 % {trust.low_mm:.1f}-{trust.high_mm:.1f} mm)", color=colour, fontsize=10)
    names = [c.name for c in result.candidates]
    scores = [c.score or 0.0 for c in result.candidates]
    colours = ["tab:green" if c is result.best else "tab:blue" if c.status == "ok" else "tab:gray"
               for c in result.candidates]
    ax.barh(names, scores, color=colours)
    for y, c in enumerate(result.candidates):
        ax.text(scores[y], y, f" {c.status}", va="center", fontsize=8)
    ax.set_xlabel("score = LNCC² × head coverage")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path).name


def format_table(result, extra: dict[str, dict] | None = None) -> str:
    """The candidate table as text; `extra` adds columns per candidate name (e.g. true error)."""
    extra = extra or {}
    extra_keys = sorted({k for cols in extra.values() for k in cols})
    header = f"{'preset':<18}{'status':<13}{'score':>7}{'lncc':>7}{'cover':>7}{'fold%':>7}{'sec':>7}"
    header += "".join(f"{k:>10}" for k in extra_keys)
    lines = [header, "-" * len(header)]

    def num(v, fmt):
        width = int(fmt.split(".")[0])
        return format(v, fmt) if isinstance(v, (int, float)) else "-".rjust(width)

    for c in result.candidates:
        mark = "*" if c is result.best else " "
        fold = 100 * c.folding_fraction if c.folding_fraction is not None else None
        line = (f"{mark}{c.name:<17}{c.status:<13}{num(c.score, '7.4f')}{num(c.lncc, '7.3f')}"
                f"{num(c.coverage, '7.3f')}{num(fold, '7.2f')}{num(c.seconds, '7.1f')}")
        line += "".join(f"{num(extra.get(c.name, {}).get(k), '10.3f')}" for k in extra_keys)
        lines.append(line)
        if c.error and c.status != "ok":
            lines.append(f"    {c.error[:150]}")
    lines.append(f"best: {result.best.name if result.best else 'none'}   wall time {result.wall_seconds:.1f} s")
    pose = getattr(result, "pose", None) or {}
    if pose:
        start = (f"{pose['source']}, {pose['angle_deg']:.0f} degrees about the {pose['axis']} axis, "
                 f"{pose['shift_mm']:.0f} mm"
                 if pose.get("applied") else "the header")
        lines.append(f"start: {start}   (pose search {pose.get('seconds', 0.0):.1f} s)")
    return "\n".join(lines)
