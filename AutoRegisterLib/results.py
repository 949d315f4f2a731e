"""What a run produces: every candidate (one per preset) and the result that holds them, in memory and as
``result.json``; and an output folder read back (`read_outputs`, the inverse of `report.write_outputs`).

A candidate's status is an `events.Status`; ``to_dict``/``from_dict`` are the JSON form, so the command
line, the engine client and the Slicer module share one reading of ``result.json``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from .events import ExitCode, Status
from .events import exit_code as as_exit_code
from .image import Image
from .presets import Table

#: The files of an output folder that `report.write_outputs` writes and `read_outputs` reads.
RESULT_MARKER, REPORT_PNG, WARPED_IMAGE = "result.json", "report.png", "warped.nii.gz"
#: Where the candidates disagree with the winner (mm, on a coarse fixed grid): the trust verdict's map.
DISAGREEMENT_IMAGE = "disagreement.nii.gz"
#: The measures a candidate carries, in result.json's order.
MEASURES = ("score", "lncc", "zncc", "zncc_local", "mi", "coverage", "folding_fraction", "min_jacobian", "bending")
#: The modules whose versions result.json records, when the run loaded them.
VERSIONED_MODULES = ("numpy", "SimpleITK", "torch", "ants", "itk")


@dataclass
class Candidate:
    """One preset's outcome: status, timings, every measure, and its transform when it succeeded."""

    name: str
    backend: str
    transform_type: str
    status: Status = Status.PENDING
    score: float | None = None
    lncc: float | None = None
    zncc: float | None = None
    zncc_local: float | None = None
    mi: float | None = None
    coverage: float | None = None
    folding_fraction: float | None = None
    min_jacobian: float | None = None
    #: Mean bending energy of the field over the head, mm^-2 (0 for a linear transform).
    bending: float | None = None
    seconds: float | None = None
    score_seconds: float | None = None
    error: str | None = None
    transform: object = field(default=None, repr=False)
    warped: Image | None = field(default=None, repr=False)
    transform_path: str | None = None
    #: An eliminated candidate's coarse-round transform: a second opinion for the trust verdict, never an output.
    coarse_transform: object = field(default=None, repr=False)

    def to_dict(self) -> dict:
        """The JSON form written to result.json."""
        d = {"name": self.name, "backend": self.backend, "transform_type": self.transform_type,
             "status": Status(self.status).value}
        d.update({k: getattr(self, k) for k in MEASURES + ("seconds", "score_seconds", "error")})
        d["transform"] = self.transform_path
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Candidate:
        """A candidate read back from result.json: every measure and `transform_path`, no transform loaded."""
        names = {f.name for f in fields(cls)} - {"transform", "warped", "transform_path", "status", "coarse_transform"}
        return cls(**{k: v for k, v in d.items() if k in names}, status=Status(d.get("status", Status.PENDING)),
                   transform_path=d.get("transform"))


def runtime_versions() -> dict:
    """This library's and Python's versions, and those of the toolkits this process has loaded."""
    from . import __version__

    versions = {"autoregister": __version__, "python": sys.version.split()[0]}
    for mod in VERSIONED_MODULES:
        m = sys.modules.get(mod)
        if m is not None:
            versions[mod] = getattr(m, "__version__", None) or getattr(m, "Version", lambda: None)()
    return versions


@dataclass
class RegistrationResult:
    """Every candidate, the winner (or None), and the settings that produced them."""

    candidates: list[Candidate]
    best: Candidate | None
    fixed: Image | None  # the prepared inputs (None when read back from result.json)
    moving: Image | None
    fixed_modality: str
    moving_modality: str
    table: Table
    wall_seconds: float = 0.0
    inputs: dict = field(default_factory=dict)
    #: Loading the scorer (torch, kernels) and the head masks, on a thread beside the workers.
    scorer_setup_seconds: float = 0.0
    #: Taken when the run ends (the toolkits it loaded are loaded by then).
    versions: dict = field(default_factory=runtime_versions)
    #: The winner's warped image when it is not on the fixed grid (``output_grid="union"``); else best.warped.
    output: Image | None = field(default=None, repr=False)
    #: The pose search's outcome (`pose.Pose.to_dict`): {} when it did not run.
    pose: dict = field(default_factory=dict)
    #: The trust verdict on the winner (`trust.Verdict`; a dict when read back from result.json; None: none).
    trust: object = field(default=None, repr=False)
    #: What the user should know about this result, one sentence each (a far pose, a mirror image, ...).
    warnings: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """The JSON form written to result.json."""
        return {
            "best": self.best.name if self.best else None,
            "candidates": [c.to_dict() for c in self.candidates],
            "inputs": self.inputs,
            "fixed_modality": self.fixed_modality,
            "moving_modality": self.moving_modality,
            "table": {"name": self.table.name, "source": self.table.source,
                      "presets": [p.name for p in self.table.presets]},
            "scoring": self.table.scoring.to_dict(),
            "wall_seconds": self.wall_seconds,
            "scorer_setup_seconds": self.scorer_setup_seconds,
            "versions": self.versions,
            "pose": self.pose,
            "trust": self.trust.to_dict() if hasattr(self.trust, "to_dict") else self.trust,
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_dict(cls, d: dict) -> RegistrationResult:
        """A result read back from result.json: its candidates (transforms not loaded), no images, and the
        table as result.json records it (name, source, scoring, and its presets without their params)."""
        from .backends.base import Preset
        from .scoring import ScoringSettings

        candidates = [Candidate.from_dict(entry) for entry in d.get("candidates", [])]
        known = {f.name for f in fields(ScoringSettings)}
        scoring = ScoringSettings(**{k: v for k, v in (d.get("scoring") or {}).items() if k in known})
        recorded = d.get("table") or {}
        table = Table(name=recorded.get("name", ""), fixed_modality=d.get("fixed_modality", ""),
                      moving_modality=d.get("moving_modality", ""),
                      presets=tuple(Preset(c.name, c.backend, c.transform_type) for c in candidates),
                      scoring=scoring, source=recorded.get("source", ""))
        return cls(candidates=candidates, best=next((c for c in candidates if c.name == d.get("best")), None),
                   fixed=None, moving=None, fixed_modality=d.get("fixed_modality", ""),
                   moving_modality=d.get("moving_modality", ""), table=table,
                   wall_seconds=d.get("wall_seconds", 0.0), inputs=dict(d.get("inputs") or {}),
                   scorer_setup_seconds=d.get("scorer_setup_seconds", 0.0), versions=dict(d.get("versions") or {}),
                   pose=dict(d.get("pose") or {}), warnings=list(d.get("warnings") or []), trust=d.get("trust"))


@dataclass
class EngineOutputs:
    """What the engine wrote: every candidate (transforms not loaded), the best, the exit code, result.json."""

    out_dir: Path
    exit_code: ExitCode | int | None
    candidates: list[Candidate] = field(default_factory=list)  # each with transform_path only
    best: Candidate | None = None
    summary: dict = field(default_factory=dict)  # result.json as written ({} when there is none)
    message: str | None = None
    result: RegistrationResult | None = None  # result.json read back (None when there is none)

    @property
    def ok(self) -> bool:
        """True when a result was kept."""
        return self.best is not None

    def candidate(self, name: str) -> Candidate:
        """The candidate called `name`."""
        for cand in self.candidates:
            if cand.name == name:
                return cand
        raise KeyError(f"no candidate named {name!r} (have {', '.join(c.name for c in self.candidates)})")

    def transform_path(self, name: str | None = None) -> Path | None:
        """The transform file of candidate `name` (default: the best), or None when none was written."""
        cand = self.best if name is None else self.candidate(name)
        if cand is None or not cand.transform_path:
            return None
        return self.out_dir / cand.transform_path

    def read_transform(self, name: str | None = None):
        """Read candidate `name`'s transform (default: the best's) as a SimpleITK transform; only now, as a
        deformable one can be hundreds of MB."""
        path = self.transform_path(name)
        if path is None:
            which = name or "the best candidate"
            raise ValueError(f"{which} has no transform file (run with keep_all to keep every candidate's)")
        import SimpleITK as sitk

        return sitk.ReadTransform(str(path))

    @property
    def warnings(self) -> list[str]:
        """What result.json warns the user of (its ``warnings``), e.g. a moving image that looks turned around."""
        return [str(w) for w in self.summary.get("warnings") or []]

    @property
    def mask_notes(self) -> list[str]:
        """What putting the user's masks on their images' grids lost (result.json's ``inputs.masks.notes``)."""
        masks = (self.summary.get("inputs") or {}).get("masks") or {}
        return [str(n) for n in masks.get("notes") or []]

    @property
    def report_path(self) -> Path | None:
        """report.png, or None when it was not written (e.g. matplotlib missing; `summary["report"]` says)."""
        path = self.out_dir / REPORT_PNG
        return path if path.is_file() else None

    @property
    def trust(self) -> dict:
        """The trust verdict as result.json holds it ({} when there is none)."""
        return dict(self.summary.get("trust") or {})

    @property
    def disagreement_path(self) -> Path | None:
        """The trust verdict's disagreement map (mm), or None."""
        path = self.out_dir / DISAGREEMENT_IMAGE
        return path if path.is_file() else None

    @property
    def warped_path(self) -> Path | None:
        """The winner's warped moving image on the fixed grid, or None."""
        path = self.out_dir / WARPED_IMAGE
        return path if path.is_file() else None


def read_outputs(out_dir, exit_code: int | None = None, message: str | None = None) -> EngineOutputs:
    """Read an output folder written by `report.write_outputs` (the inverse): typed candidates, the best
    and result.json. A folder without result.json (usage error, cancel, crash) gives no candidates."""
    out = Path(out_dir)
    summary: dict = {}
    path = out / RESULT_MARKER
    if path.is_file():
        summary = json.loads(path.read_text(encoding="utf-8"))
    result = RegistrationResult.from_dict(summary) if summary else None
    candidates = result.candidates if result else []
    best = result.best if result else None
    return EngineOutputs(out, as_exit_code(exit_code), candidates, best, summary, message, result)
