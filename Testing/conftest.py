"""Shared fixtures: small real images built once per session from the installed ICBM152 data."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parent.parent / "AutoRegister"


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


@pytest.fixture(scope="session")
def slicer_segmentations():
    """slicer-core's `slicer` with the segmentation conversion rules registered, as Slicer's Segmentations module
    does when it starts (qSlicerSegmentationsModule::setup); without them a segmentation cannot even hold a
    binary labelmap segment."""
    slicer = pytest.importorskip("slicer")
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    registered = {type(rule).__name__ for rule in factory.GetConverterRules()}
    for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule, slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        if rule.__name__ not in registered:
            factory.RegisterConverterRule(rule())
    return slicer


class _Inert(types.ModuleType):
    """ctk without a display: every attribute is a harmless class."""

    def __getattr__(self, name):
        return type(name, (), {"__init__": lambda self, *a, **k: None})


class _ModuleBase:
    """What the module uses of Slicer's ScriptedLoadableModule* bases."""

    def __init__(self, parent=None, *args, **kwargs):
        self.parent = parent if parent is not None else types.SimpleNamespace(isEntered=True)
        self.layout = types.SimpleNamespace(addWidget=lambda widget: None)

    def setup(self):
        """ScriptedLoadableModuleWidget.setup builds the reload buttons; nothing to do here."""

    def resourcePath(self, relative):
        return str(MODULE_DIR / "Resources" / relative)

    def getParameterNode(self):
        raise NotImplementedError("no parameter node without the Slicer application")

    def getDefaultModuleDocumentationLink(self):
        return ""

    def delayDisplay(self, message, *args):
        pass


@pytest.fixture()
def slicer_module(monkeypatch):
    """AutoRegister.py imported as Slicer would, with the real MRML of slicer-core and, for the parts
    slicer-core lacks, stand-ins that keep Slicer's rules: `@parameterNodeWrapper` and its validators come
    from slicer_rules (binding by Slicer's connector rules), qt from fake_qt (widgets built from the .ui),
    ctk is inert and the ScriptedLoadableModule bases give only what the module uses."""
    pytest.importorskip("slicer")
    import fake_qt
    import slicer_rules

    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    slm.ScriptedLoadableModule = slm.ScriptedLoadableModuleWidget = slm.ScriptedLoadableModuleTest = _ModuleBase
    slm.ScriptedLoadableModuleLogic = _ModuleBase
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = slicer_rules.parameter_node_wrapper
    pnw.Choice, pnw.WithinRange, pnw.Default = slicer_rules.Choice, slicer_rules.WithinRange, slicer_rules.Default
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    for name, stand_in in {"qt": fake_qt.qt_module(), "ctk": _Inert("ctk"), "slicer.ScriptedLoadableModule": slm,
                           "slicer.parameterNodeWrapper": pnw, "slicer.i18n": i18n}.items():
        monkeypatch.setitem(sys.modules, name, stand_in)
    monkeypatch.syspath_prepend(str(MODULE_DIR))
    monkeypatch.delitem(sys.modules, "AutoRegister", raising=False)
    import AutoRegister

    yield AutoRegister
    sys.modules.pop("AutoRegister", None)
