"""Imaging modalities: the names tables and the command line accept, and the guess when none is given."""

from __future__ import annotations

import numpy as np

from .errors import InputError

#: The modalities a table, the command line and the Slicer module name; MR stands for any MR contrast.
MODALITIES = ("T1", "T2", "FLAIR", "PD", "CT", "MR")


def guess_modality(image) -> str:
    """Guess 'CT' from a Hounsfield range (air near -1000, bone above +300), else 'MR'."""
    arr = np.asarray(image.array)
    finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
    if finite.size == 0:
        return "MR"
    lo, hi = np.percentile(finite, [1, 99.9])
    if lo < -500 and hi > 300:
        return "CT"
    return "MR"


def modality_or_guess(modality: str | None, image, label: str) -> str:
    """The given modality (upper-cased, checked against MODALITIES) or, when none is given, the guess."""
    value = (modality or guess_modality(image)).upper()
    if value not in MODALITIES:
        raise InputError(f"{label} must be one of {', '.join(MODALITIES)}, got {value!r}")
    return value
