"""Shared fixtures: small real images built once per session from the installed ICBM152 data."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def icbm4():
    """ICBM152 T1, T2 and CerebrA labels at 4 mm (about 48x57x48 voxels)."""
    from AutoRegisterDev.data import load_icbm

    return {name: load_icbm(name, 4.0) for name in ("t1", "t2", "labels")}


@pytest.fixture(scope="session")
def rigid_case4(icbm4):
    """A T2 -> T1 case at 4 mm with a known 8 degree / 8 mm rigid misalignment."""
    from AutoRegisterDev.data import make_case

    return make_case(icbm4["t2"], icbm4["t1"], seed=3, fixed_labels=icbm4["labels"], rotation_deg=8.0,
                     translation_mm=8.0)
