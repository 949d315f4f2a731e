"""AutoRegisterLib: one-click image registration without Slicer.

Heavy modules (torch, ANTs, ITK) load on first use, so `import AutoRegisterLib` stays cheap inside
Slicer and in worker processes.
"""

__version__ = "0.1.0"

_LAZY = {
    "auto_register": ("pipeline", "auto_register"),
    "RegistrationResult": ("results", "RegistrationResult"),
    "Candidate": ("results", "Candidate"),
    "Image": ("image", "Image"),
    "read_image": ("image", "read_image"),
    "write_image": ("image", "write_image"),
    "lncc": ("similarity", "lncc"),
    "zncc": ("similarity", "zncc"),
    "LNCCLoss": ("similarity", "LNCCLoss"),
}


def __getattr__(name):
    """Import public names on first access."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
