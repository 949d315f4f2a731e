"""The Slicer module, checked where Slicer itself cannot run.

Static checks: the .ui parses, every `self.ui.<name>` exists in it, top-level imports are only what
Slicer bundles, ruff is clean, no registration toolkit is used directly, the CMake files declare
what Slicer needs. Then the Logic runs for real headless: the GUI-only modules (qt, the
ScriptedLoadableModule bases, parameterNodeWrapper, i18n) are replaced by stand-ins, the MRML scene
is slicer-core's, and the engine runs as the real background command.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import time
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULE_DIR = ROOT / "AutoRegister"
SCRIPT = MODULE_DIR / "AutoRegister.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "AutoRegister.ui"

#: Top-level imports AutoRegister.py may use: the standard library plus what Slicer bundles.
SLICER_BUNDLED = {"qt", "ctk", "vtk", "slicer", "numpy", "SimpleITK", "__main__"}
#: Never imported by the module itself, anywhere: the engine (AutoRegisterLib) owns them.
TOOLKITS = {"torch", "ants", "antspyx", "itk", "itk_elastix", "cupy", "numba", "dask", "scipy", "skimage",
            "monai", "nibabel"}


def module_tree() -> ast.Module:
    return ast.parse(SCRIPT.read_text(), filename=str(SCRIPT))


def imported_roots(nodes) -> set[str]:
    roots = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def ui_widget_names() -> set[str]:
    return {w.get("name") for w in ET.parse(UI_FILE).getroot().iter("widget")}


# --- static checks -------------------------------------------------------------------------------

def test_ui_file_parses_and_has_one_prominent_register_button():
    root = ET.parse(UI_FILE).getroot()
    assert root.tag == "ui"
    buttons = [w for w in root.iter("widget") if w.get("class") == "QPushButton"]
    register = [w for w in buttons if w.get("name") == "registerButton"]
    assert len(register) == 1
    heights = [int(h.text) for h in register[0].iter("height")]
    assert heights and max(heights) >= 40
    advanced = next(w for w in root.iter("widget") if w.get("name") == "advancedCollapsibleButton")
    collapsed = [p for p in advanced.findall("property") if p.get("name") == "collapsed"]
    assert collapsed and collapsed[0].find("bool").text == "true"


def test_every_ui_widget_used_in_the_code_exists_in_the_ui_file():
    used = set()
    for node in ast.walk(module_tree()):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            used.add(node.attr)
    assert "registerButton" in used
    assert used - ui_widget_names() == set()


def test_parameter_names_in_the_ui_are_fields_of_the_parameter_node():
    root = ET.parse(UI_FILE).getroot()
    bound = {p.find("string").text for p in root.iter("property") if p.get("name") == "SlicerParameterName"}
    wrapper = next(n for n in ast.walk(module_tree())
                   if isinstance(n, ast.ClassDef) and n.name == "AutoRegisterParameterNode")
    fields = {s.target.id for s in wrapper.body if isinstance(s, ast.AnnAssign)}
    assert bound and bound <= fields


def test_top_level_imports_are_only_what_slicer_bundles():
    top = imported_roots(module_tree().body)
    foreign = {name for name in top if name not in SLICER_BUNDLED and name not in sys.stdlib_module_names}
    assert foreign == set(), f"import these inside functions: {foreign}"


def test_module_uses_no_registration_toolkit_and_no_algorithm_of_its_own():
    tree = module_tree()
    assert imported_roots(ast.walk(tree)) & TOOLKITS == set()
    # Registration, scoring and geometry come from AutoRegisterLib; SimpleITK only reads transform files.
    lib_imports = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                   and n.module.startswith("AutoRegisterLib")}
    assert {"AutoRegisterLib.mrml", "AutoRegisterLib.image", "AutoRegisterLib.pipeline"} & lib_imports
    sitk_calls = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                  and isinstance(n.value, ast.Name) and n.value.id == "sitk"}
    assert sitk_calls <= {"ReadTransform", "Euler3DTransform"}  # the latter builds the Test's known truth
    numpy_math = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                  and isinstance(n.value, ast.Name) and n.value.id == "np"}
    assert numpy_math <= {"array", "mean", "linalg", "random"}  # only the in-Slicer Test measures errors


def test_module_classes_and_public_functions_have_docstrings():
    tree = module_tree()
    names = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"AutoRegister", "AutoRegisterWidget", "AutoRegisterLogic", "AutoRegisterTest"} <= names
    missing = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))
               and not n.name.startswith("_") and not ast.get_docstring(n)]
    assert missing == []


def test_ruff_is_clean_on_the_module():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not os.path.exists(ruff):
        pytest.skip("ruff not installed")
    out = subprocess.run([ruff, "check", str(MODULE_DIR), str(ROOT / "AutoRegisterLib" / "mrml.py")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cmake_declares_the_extension_module_library_and_test():
    top = (ROOT / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS", "find_package(Slicer",
                "add_subdirectory(AutoRegister)", "Slicer_EXTENSION_GENERATE_CONFIG", "Slicer_EXTENSION_CPACK"):
        assert key in top, key
    assert 'EXTENSION_CATEGORY "Registration"' in top
    module = (MODULE_DIR / "CMakeLists.txt").read_text()
    for key in ("slicerMacroBuildScriptedModule", "MODULE_PYTHON_SCRIPTS", "MODULE_PYTHON_RESOURCES",
                "slicer_add_python_unittest", "AutoRegisterLib", "AutoRegisterLib/resources/presets"):
        assert key in module, key
    for resource in ("Resources/UI/", "Resources/Icons/"):
        assert resource in module
    assert UI_FILE.exists() and (MODULE_DIR / "Resources" / "Icons" / "AutoRegister.png").exists()


# --- the Logic, for real, with stand-ins for the GUI-only modules --------------------------------

class _Anything(types.ModuleType):
    """A module whose every attribute is a harmless callable class (qt, which needs a display)."""

    def __getattr__(self, name):
        return type(name, (), {"__init__": lambda self, *a, **k: None})


@pytest.fixture()
def logic_module(monkeypatch):
    slicer = pytest.importorskip("slicer")
    pytest.importorskip("SimpleITK")

    class Base:
        def __init__(self, *args, **kwargs):
            pass

    class LogicBase(Base):
        def getParameterNode(self):
            raise NotImplementedError("no parameter node without the Slicer application")

    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    slm.ScriptedLoadableModule = slm.ScriptedLoadableModuleWidget = slm.ScriptedLoadableModuleTest = Base
    slm.ScriptedLoadableModuleLogic = LogicBase
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.WithinRange = lambda low, high: (low, high)
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    for name, module in {"qt": _Anything("qt"), "slicer.ScriptedLoadableModule": slm,
                         "slicer.parameterNodeWrapper": pnw, "slicer.i18n": i18n}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.syspath_prepend(str(MODULE_DIR))
    monkeypatch.delitem(sys.modules, "AutoRegister", raising=False)
    import AutoRegister

    yield AutoRegister, slicer
    sys.modules.pop("AutoRegister", None)


@pytest.fixture()
def case_nodes(tmp_path):
    slicer = pytest.importorskip("slicer")
    from AutoRegisterDev import data
    from AutoRegisterLib import mrml
    from AutoRegisterLib.errors import InputError

    try:
        t1 = data.load_icbm("t1", 4.0)
    except InputError as exc:
        pytest.skip(str(exc))
    case = data.make_case(t1, t1, seed=3, rotation_deg=8.0, translation_mm=10.0)
    scene = slicer.vtkMRMLScene()
    fixed = mrml.volume_node_from_image(case.fixed, scene, "fixed")
    moving = mrml.volume_node_from_image(case.moving, scene, "moving")
    # SimpleITK presets only: fast, and independent of which optional toolkits this machine has.
    table = tmp_path / "sitk.json"
    table.write_text('{"schema": "autoregister-table/1", "name": "sitk-only", "fixed_modality": "T1", '
                     '"moving_modality": "T1", "presets": ["sitk-rigid", "sitk-affine"]}')
    return case, scene, fixed, moving, str(table)


def _descendants(pid: int) -> set[int]:
    """Live descendants of `pid`, from /proc (Linux)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_logic_register_runs_the_engine_and_sets_the_moving_parent_transform(logic_module, case_nodes):
    AutoRegister, slicer = logic_module
    case, scene, fixed, moving, table = case_nodes
    from AutoRegisterDev import data
    from AutoRegisterLib import mrml

    logic = AutoRegister.AutoRegisterLogic(scene=scene)
    voxels_before = mrml.image_from_volume_node(moving).array.copy()
    fixed_geometry = mrml.ijk_to_ras(fixed)
    events = []
    result = logic.register(fixed, moving, table=table, fixedModality="T1", movingModality="T1",
                            createOutputVolume=True, keepAllCandidates=True, progress=events.append, timeout=300)

    assert [c.name for c in result.candidates] == ["sitk-rigid", "sitk-affine"]
    assert result.best is not None and result.best.status == "ok"
    assert all(c.transform is not None for c in result.candidates if c.status == "ok")
    assert {e["event"] for e in events} >= {"start", "finish", "done"}
    assert moving.GetParentTransformNode() is result.transformNode
    assert result.transformNode.GetClassName() == "vtkMRMLLinearTransformNode"
    # Inputs untouched.
    assert np.array_equal(mrml.image_from_volume_node(moving).array, voxels_before)
    assert np.array_equal(mrml.ijk_to_ras(fixed), fixed_geometry) and fixed.GetParentTransformNode() is None
    # The node is the winner's transform, and the winner is right (known misalignment of 14 mm).
    head = case.fixed.array > 0.1 * case.fixed.array.max()
    assert data.point_error_mm(case, result.best.transform, head) < 1.0
    points = case.fixed.physical_points(np.random.default_rng(0).uniform(5, 40, size=(50, 3)))
    for p in points:
        node_point = mrml.LPS_FROM_RAS @ mrml.transform_point_ras(result.transformNode, mrml.LPS_FROM_RAS @ p)
        assert np.linalg.norm(node_point - np.array(result.best.transform.TransformPoint(tuple(p)))) < 1e-6
    assert result.outputVolume is not None and len(result.candidateTransformNodes) == 2
    assert not any(Path(p).exists() for p in [result.summary.get("inputs", {}).get("fixed", "")] if p)

    # Selecting another candidate refills our node; running again replaces our nodes, adds none.
    other = next(c.name for c in result.candidates if c.name != result.best.name)
    logic.applyCandidate(result, other)
    assert moving.GetParentTransformNode() is result.transformNode
    assert result.transformNode.GetAttribute("AutoRegister.Candidate") == other
    counts = (scene.GetNumberOfNodesByClass("vtkMRMLTransformNode"),
              scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))
    again = logic.register(fixed, moving, table=table, fixedModality="T1", movingModality="T1",
                           createOutputVolume=True, keepAllCandidates=True, timeout=300)
    assert (scene.GetNumberOfNodesByClass("vtkMRMLTransformNode"),
            scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")) == counts
    assert again.transformNode.GetID() == result.transformNode.GetID()
    assert again.outputVolume.GetID() == result.outputVolume.GetID()
    rows = logic.resultRows(again)
    assert len(rows) == 2 and all(len(r) == len(logic.RESULT_COLUMNS) for r in rows)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process tree check reads /proc")
def test_cancel_stops_the_engine_and_its_workers_and_removes_the_temporary_folder(logic_module, case_nodes):
    AutoRegister, slicer = logic_module
    case, scene, fixed, moving, table = case_nodes
    logic = AutoRegister.AutoRegisterLogic(scene=scene)
    run = logic.start(fixed, moving, table=table, fixedModality="T1", movingModality="T1", jobs=2)
    deadline = time.monotonic() + 60
    while not any(e.get("event") == "start" for e in run.events) and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.02)
    assert run.isRunning(), "the engine ended before it could be cancelled"
    tree = _descendants(run.process.pid) | {run.process.pid}
    assert len(tree) >= 2  # the engine and at least one worker

    run.cancel()
    run.wait(timeout=30)
    with pytest.raises(RuntimeError, match="cancelled"):
        logic.finish(run)
    run.cleanup()
    time.sleep(0.2)
    assert [pid for pid in tree if _alive(pid)] == []
    assert not Path(run.workDir).exists()
    assert moving.GetParentTransformNode() is None  # the scene is untouched


def test_engine_failure_is_reported_with_the_engines_message(logic_module, case_nodes, tmp_path):
    AutoRegister, slicer = logic_module
    case, scene, fixed, moving, table = case_nodes
    logic = AutoRegister.AutoRegisterLogic(scene=scene)
    with pytest.raises(RuntimeError, match="unknown preset"):
        logic.register(fixed, moving, presets=["no-such-preset"], fixedModality="T1", movingModality="T1",
                       table=table, timeout=120)
    assert moving.GetParentTransformNode() is None
    with pytest.raises(ValueError, match="different"):
        logic.register(fixed, fixed)
