"""Registration backends, one module each, behind the interface in `base.py`.

Importing this package imports no registration toolkit: each backend module imports its toolkit
(antspyx, itk-elastix, picsl_greedy) inside its functions, so a missing toolkit only makes its presets unavailable.
"""

from __future__ import annotations

import importlib

from ..errors import InputError
from .base import Backend, Preset, RegistrationOutput, warp_with

#: Backend name -> (module, class); the module is imported on first use.
_REGISTRY = {
    "ants": ("ants", "AntsBackend"),
    "elastix": ("elastix", "ElastixBackend"),
    "brainsfit": ("brainsfit", "BrainsFitBackend"),
    "sitk": ("simpleitk", "SimpleITKBackend"),
    "greedy": ("greedy", "GreedyBackend"),
}
BACKEND_NAMES = tuple(_REGISTRY)

__all__ = ["BACKEND_NAMES", "Backend", "Preset", "RegistrationOutput", "availability_report", "get_backend",
           "warp_with"]


def get_backend(name: str) -> Backend:
    """Return a fresh backend instance by name (ants, elastix, brainsfit, sitk, greedy)."""
    if name not in _REGISTRY:
        raise InputError(f"unknown backend {name!r}; known backends: {', '.join(BACKEND_NAMES)}")
    module_name, class_name = _REGISTRY[name]
    module = importlib.import_module(f".{module_name}", __name__)
    return getattr(module, class_name)()


def availability_report() -> dict:
    """Map each backend name to (ok, reason); reason is empty when the backend can run here."""
    return {name: get_backend(name).availability() for name in BACKEND_NAMES}
