"""The module against Slicer's own rules (Testing/slicer_rules.py cites the Slicer source of each).

Each test here fails where Slicer 5.8 or 5.10 would fail: the parameter binding, the in-Slicer self-test's
error measure, Python 3.9 (Slicer 5.8), MRML on the main thread only, and the engine's environment.
"""

from __future__ import annotations

import ast
import glob
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

import pytest
import slicer_rules

ROOT = Path(__file__).resolve().parent.parent
MODULE_DIR = ROOT / "AutoRegister"
SCRIPT = MODULE_DIR / "AutoRegister.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "AutoRegister.ui"
#: Everything the extension ships and Slicer's interpreter runs: the module and the library.
SHIPPED = sorted([*MODULE_DIR.rglob("*.py"), *(ROOT / "AutoRegisterLib").rglob("*.py")])


# --- parameter node <-> .ui (Slicer: parameterNodeWrapper/wrapper.py, guiConnectors.py) -------------------

def test_every_bound_widget_gets_a_connector_that_slicer_accepts(slicer_module):
    """connectGui runs in setup() and every enter(); one refused widget and the panel never binds (B1)."""
    connectors = slicer_rules.connect_gui(slicer_module.AutoRegisterParameterNode, UI_FILE)
    assert {"fixedVolume", "movingVolume", "fixedModality", "movingModality"} <= set(connectors)


def test_rules_refuse_what_slicer_refuses():
    """The rules are not a rubber stamp: a str on a QComboBox without Choice, an unbounded slider, a float on
    a QSpinBox and a default outside its choices all fail, as they do in Slicer."""
    with pytest.raises(RuntimeError, match="Choice"):
        slicer_rules.connector_for("QComboBox", str)
    with pytest.raises(RuntimeError):
        slicer_rules.connector_for("ctkSliderWidget", float)
    with pytest.raises(RuntimeError):
        slicer_rules.connector_for("QSpinBox", float)
    assert slicer_rules.connector_for("QComboBox", Annotated[str, slicer_rules.Choice(["a", "b"])])[1] == ("a", "b")

    class Node:
        mode: Annotated[str, slicer_rules.Choice(["a", "b"])] = "c"

    with pytest.raises(ValueError):
        slicer_rules.validate(Node, "mode", Node.mode)


def test_mask_parameters_are_node_unions_with_none_bound_to_combo_boxes_that_list_those_nodes(slicer_module):
    """The masks and the focus are optional nodes of two classes each: a Union that lists None (the wrapper
    writes None when the node is made, and UnionSerializer refuses None otherwise), bound to a qMRMLNodeComboBox
    whose nodeTypes Slicer sets from that Union (qMRMLNodeComboBoxToNodeConnector.__init__); the .ui lists the
    same classes, so Designer shows what Slicer will."""
    cls = slicer_module.AutoRegisterParameterNode
    connectors = slicer_rules.connect_gui(cls, UI_FILE)
    bound = slicer_rules.bound_widgets(UI_FILE)
    expected = {"fixedMask": ("vtkMRMLLabelMapVolumeNode", "vtkMRMLSegmentationNode"),
                "movingMask": ("vtkMRMLLabelMapVolumeNode", "vtkMRMLSegmentationNode"),
                "focus": ("vtkMRMLSegmentationNode", "vtkMRMLMarkupsROINode")}
    for name, classes in expected.items():
        assert connectors[name][0] == "qMRMLNodeComboBoxToNode"
        types_ = slicer_rules.parameter_types(cls)[name]
        assert slicer_rules.node_types(types_) == classes
        assert bound[name][2]["nodeTypes"] == classes and bound[name][2]["noneEnabled"] == "true"
        assert slicer_rules.defaults(cls)[name] is None
        slicer_rules.validate(cls, name, None)
    # A segment is remembered by ID in an unbound str: no connector takes a qMRMLSegmentSelectorWidget.
    for role in expected:
        assert slicer_rules.parameter_types(cls)[f"{role}SegmentID"] is str
        assert f"{role}SegmentID" not in bound


def test_rules_refuse_a_node_union_without_none_and_a_node_of_another_class():
    """UnionSerializer._findBestSerializer: None fits no node serializer (canSerialize(NoneType) is False), and a
    node fits only a member it is an instance of (validators.IsInstance)."""
    slicer = pytest.importorskip("slicer")
    from typing import Union

    # typing.Union, as the module writes it: util.isNodeOrUnionOfNodes tests get_origin(type) == typing.Union,
    # which an `X | Y` (types.UnionType) fails. Evaluated here, not postponed: the classes are local names.
    labelmap, segmentation = slicer.vtkMRMLLabelMapVolumeNode, slicer.vtkMRMLSegmentationNode
    Node = type("Node", (), {"__annotations__": {"strict": Union[labelmap, segmentation],  # noqa: UP007
                                                 "optional": Union[labelmap, segmentation, None]}})  # noqa: UP007

    with pytest.raises(TypeError, match="None"):
        slicer_rules.validate(Node, "strict", None)
    slicer_rules.validate(Node, "optional", None)
    slicer_rules.validate(Node, "optional", slicer.vtkMRMLSegmentationNode())
    with pytest.raises(TypeError):
        slicer_rules.validate(Node, "optional", slicer.vtkMRMLScalarVolumeNode())  # a labelmap's parent class


def test_every_mrml_widget_gets_the_scene_from_the_ui(slicer_module):
    """A qMRMLNodeComboBox (and the one inside a qMRMLSegmentSelectorWidget) lists the nodes of its scene only;
    loadUI gives the top widget the scene and each child gets it through a mrmlSceneChanged -> setMRMLScene
    connection of the .ui (the template's pattern), or not at all."""
    needs_scene = {name for cls, name, _ in slicer_rules.ui_widgets(UI_FILE)
                   if cls in ("qMRMLNodeComboBox", "qMRMLSegmentSelectorWidget")}
    connected = {receiver for sender, signal, receiver, slot in slicer_rules.ui_connections(UI_FILE)
                 if sender == "AutoRegister" and signal == "mrmlSceneChanged(vtkMRMLScene*)"
                 and slot == "setMRMLScene(vtkMRMLScene*)"}
    assert {"fixedMaskSegmentSelector", "focusSelector"} <= needs_scene
    assert needs_scene - connected == set()


def test_combo_boxes_with_dynamic_entries_are_not_bound(slicer_module):
    """A QComboBox bound through Choice is cleared and refilled from the choices, and writing a saved value
    no longer listed raises (guiConnectors.py QComboBoxToStringableConnector.write): the table list, which
    changes with the user's tables, must stay unbound and be synced by the module."""
    bound = slicer_rules.bound_widgets(UI_FILE)
    assert "tableName" not in bound
    widget_names = {name for _, name, _ in bound.values()}
    assert "tableComboBox" not in widget_names


def test_scoring_window_default_means_the_tables_own_window(slicer_module):
    """WithinRange overrides the spin box's .ui range; 0 must be allowed and be the default, so the GUI does
    not override every table's window, and any value the GUI passes on is odd (M10)."""
    cls = slicer_module.AutoRegisterParameterNode
    _, _, within = slicer_rules.connect_gui(cls, UI_FILE)["scoringWindowVoxels"]
    assert within.minimum == 0 and slicer_rules.defaults(cls)["scoringWindowVoxels"] == 0
    logic_cls = slicer_module.AutoRegisterLogic
    assert logic_cls.scoringWindow(0) is None
    assert [logic_cls.scoringWindow(v) for v in (3, 4, 5, 6, 15)] == [3, 5, 5, 7, 15]


# --- asking the user: slicer.util.confirmYesNoDisplay ---------------------------------------------------

def test_the_confirm_stand_in_takes_slicers_arguments_and_answers_as_slicers_own_in_testing_mode(monkeypatch):
    """slicer-core ships Slicer's Base/Python/slicer/util.py: run its confirmYesNoDisplay in testing mode (qt and
    slicer.app stood in) and it shows no box and returns False, though its docstring says True ("Yes"), because
    it compares _messageDisplay's testingReturnValue True with qt.QMessageBox.Yes. The stand-in does the same;
    the module therefore decides testing mode itself (AutoRegisterLogic.askToApplyUntrusted)."""
    import inspect
    import types

    import fake_qt

    slicer = pytest.importorskip("slicer")
    real = slicer.util.confirmYesNoDisplay
    stand_in = slicer_rules.ConfirmYesNoDisplay(answer=True, testing=True)
    assert inspect.signature(stand_in) == inspect.signature(real)
    monkeypatch.setitem(sys.modules, "qt", fake_qt.qt_module())
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(testingEnabled=lambda: True, applicationName="Slicer"),
                        raising=False)
    shown = []
    monkeypatch.setattr(slicer.util, "messageBox", lambda *args, **kwargs: shown.append(args))
    assert real("Apply it anyway?", windowTitle="check") is False and shown == []
    assert stand_in("Apply it anyway?", windowTitle="check") is False and stand_in.questions == []
    asked = slicer_rules.ConfirmYesNoDisplay(answer=True)
    assert asked("Apply it anyway?", windowTitle="check") is True and asked.questions == [("check", "Apply it anyway?")]


# --- the in-Slicer self-test's error measure (B2) -----------------------------------------------------

def test_self_test_error_measure_is_zero_for_the_exact_inverse_and_large_for_the_transform(slicer_module):
    """moving(x) = fixed(truth(x)), so a perfect fixed->moving estimate is truth's inverse (the library's own
    convention); the measure must give ~0 for it and a large error for truth itself."""
    import SimpleITK as sitk

    from AutoRegisterLib import mrml

    slicer = pytest.importorskip("slicer")
    fixed = slicer_module.AutoRegisterTest.makeHeadPhantom(size=24, spacing=4.0)
    scene = slicer.vtkMRMLScene()
    truth = slicer_module.AutoRegisterTest.knownTransform(fixed)
    test = slicer_module.AutoRegisterTest()
    exact = mrml.transform_node_from_transform(truth.GetInverse(), scene, "exact")
    wrong = mrml.transform_node_from_transform(truth, scene, "truth itself")
    assert test.meanErrorMm(exact, fixed, truth) < 0.01
    assert test.meanErrorMm(wrong, fixed, truth) > 5.0
    assert isinstance(truth, sitk.Transform)


# --- Python 3.9 (Slicer 5.8: CMakeLists.txt:220 builds Python 3.9.10) --------------------------------

def test_every_shipped_file_parses_as_python_3_9():
    for path in SHIPPED:
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path), feature_version=(3, 9))


def _uses_310_only_api(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            keywords = {k.arg for k in node.keywords}
            if name == "zip" and "strict" in keywords:
                found.append(f"zip(strict=) at line {node.lineno}")
            if name == "dataclass" and keywords & {"slots", "kw_only", "match_args"}:
                found.append(f"dataclass({keywords}) at line {node.lineno}")
            if name in ("pairwise", "aiter", "anext"):
                found.append(f"{name}() at line {node.lineno}")
    return found


def test_no_python_3_10_only_api_and_pep_604_only_under_future_annotations():
    problems = {}
    for path in SHIPPED:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        found = _uses_310_only_api(tree)
        # `X | Y` in an annotation is evaluated at definition time on 3.9 unless annotations are postponed.
        if "from __future__ import annotations" not in text:
            for node in ast.walk(tree):
                annotation = getattr(node, "annotation", None) or getattr(node, "returns", None)
                if annotation is not None and any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr)
                                                  for n in ast.walk(annotation)):
                    found.append(f"PEP 604 annotation at line {node.lineno}")
        if found:
            problems[str(path.relative_to(ROOT))] = found
    assert problems == {}


def test_project_declares_python_3_9():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'requires-python\s*=\s*">=3\.9"', text)
    assert re.search(r'target-version\s*=\s*"py39"', text)
    assert "5.8" in (ROOT / "README.md").read_text(encoding="utf-8")


def _python39():
    """A Python 3.9 interpreter that runs: on PATH, or one of pyenv's versions."""
    found = [shutil.which("python3.9")] + sorted(glob.glob(str(Path.home() / ".pyenv/versions/3.9*/bin/python3.9")))
    for candidate in filter(None, found):
        probe = subprocess.run([candidate, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                               text=True)
        if probe.returncode == 0 and probe.stdout.strip() == "(3, 9)":
            return candidate
    return None


def test_every_shipped_file_compiles_with_python_3_9(tmp_path):
    """What the 5.8 extension build does (ctkMacroCompilePythonScript byte-compiles the library)."""
    python39 = _python39()
    if python39 is None:
        pytest.skip("no Python 3.9 on this machine")
    code = ("import py_compile, sys\n"
            "for p in sys.argv[1:]:\n"
            "    py_compile.compile(p, cfile=p.replace('/', '_') + 'c', doraise=True)\n")
    out = subprocess.run([python39, "-c", code, *map(str, SHIPPED)], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]


# --- MRML only on the main thread ----------------------------------------------------------------------

def test_module_starts_no_thread_and_the_engine_client_cannot_touch_mrml():
    """MRML and VTK are not thread-safe; Slicer's own pattern (and SlicerMONAIAuto3DSeg's, process.py) is a
    reader thread that only fills a queue, drained by a QTimer on the main thread. The reader thread lives
    in the Slicer-free engine client, which imports neither slicer, vtk nor the library's MRML code."""
    module_roots = {a.name.split(".")[0] for n in ast.walk(ast.parse(SCRIPT.read_text(encoding="utf-8")))
                    if isinstance(n, ast.Import) for a in n.names}
    assert "threading" not in module_roots and "_thread" not in module_roots
    client = ROOT / "AutoRegisterLib" / "engine.py"
    tree = ast.parse(client.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {f"{'.' * node.level}{node.module or ''}"} | {a.name for a in node.names}
    assert not {"slicer", "vtk", "qt", ".mrml", "mrml"} & imported, imported


def test_mrml_is_touched_only_on_the_main_thread_during_a_registration(slicer_module, monkeypatch, tmp_path):
    """Runtime check of the same rule: every library MRML call made while the module registers comes from
    the main thread."""
    slicer = pytest.importorskip("slicer")
    from AutoRegisterLib import mrml

    calls = []
    for name in ("image_from_volume_node", "volume_node_from_image", "transform_node_from_transform",
                 "find_output_node", "mark_output_node"):
        original = getattr(mrml, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append((_name, threading.current_thread() is threading.main_thread()))
            return _original(*args, **kwargs)

        monkeypatch.setattr(mrml, name, spy)
    scene = slicer.vtkMRMLScene()
    fixedImage = slicer_module.AutoRegisterTest.makeHeadPhantom(size=24, spacing=4.0)
    fixed, moving = slicer_module.AutoRegisterTest.makeCase(scene, fixedImage)[:2]
    logic = slicer_module.AutoRegisterLogic(scene=scene)
    result = logic.register(fixed, moving, presets=["sitk-rigid"], fixedModality="T1", movingModality="T1",
                            timeout=300)
    assert result.transformNode is not None
    assert calls and all(on_main for _, on_main in calls), calls


# --- the engine's environment (M1, C4) -------------------------------------------------------------------

def test_engine_environment_drops_itk_autoload_path(slicer_module, monkeypatch):
    """Slicer's launcher sets ITK_AUTOLOAD_PATH (5.10:CMake/SlicerBlockCTKAppLauncherSettings.cmake:275) and
    clears it for its own CLIs (5.10:Base/Logic/vtkSlicerCLIModuleLogic.cxx:1706-1719): ITK/ANTs from pip in
    the engine would load Slicer's ITK factories. The module does not pass it on (the launcher may re-apply
    it, so the engine and its workers also drop it: see test_engine_client)."""
    monkeypatch.setenv("ITK_AUTOLOAD_PATH", "/nowhere/ITKFactories")
    env = slicer_module.AutoRegisterLogic().engineEnvironment()
    assert "ITK_AUTOLOAD_PATH" not in env
    assert str(ROOT) in env["PYTHONPATH"].split(os.pathsep)[0]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads a worker's environment from /proc")
def test_workers_start_without_itk_autoload_path_even_when_the_launcher_sets_it(tmp_path):
    """PythonSlicer's launcher applies Slicer's [EnvironmentVariables] again when the engine starts
    (5.10:SuperBuild/python_configure_python_launcher.cmake:246-272), so the engine itself sees
    ITK_AUTOLOAD_PATH whatever the module passes; the workers that load pip's ITK and ANTs must not."""
    import SimpleITK as sitk

    from AutoRegisterLib.engine import EngineRun

    image = sitk.GaussianSource(sitk.sitkFloat32, [24] * 3, [4.0] * 3, [12.0] * 3, 100.0)
    fixed, moving = tmp_path / "fixed.nrrd", tmp_path / "moving.nrrd"
    sitk.WriteImage(image, str(fixed))
    sitk.WriteImage(sitk.GaussianSource(sitk.sitkFloat32, [24] * 3, [4.0] * 3, [13.0, 12.0, 11.0], 100.0),
                    str(moving))
    launcher = ["env", "ITK_AUTOLOAD_PATH=/nowhere/ITKFactories", sys.executable]  # what the launcher does
    run = EngineRun.start(tmp_path / "run", python=launcher, fixed_path=fixed, moving_path=moving,
                          presets=["sitk-rigid"], fixed_modality="T1", moving_modality="T1")
    try:
        start = None
        deadline = time.monotonic() + 120
        while start is None and run.is_running() and time.monotonic() < deadline:
            start = next((e for e in run.poll() if e.get("event") == "start"), None)
            time.sleep(0.01)
        assert start is not None, run.log[-5:]
        engine_env = Path(f"/proc/{run.engine_pid}/environ").read_bytes().split(b"\0")
        assert b"ITK_AUTOLOAD_PATH=/nowhere/ITKFactories" in engine_env  # the engine did inherit it
        worker_env = Path(f"/proc/{start['pid']}/environ").read_bytes().split(b"\0")
        assert not any(v.startswith(b"ITK_AUTOLOAD_PATH=") for v in worker_env)
    finally:
        run.cleanup()
