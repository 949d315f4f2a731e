"""The Slicer module, checked where Slicer itself cannot run.

Static checks: the .ui parses, every `self.ui.<name>` exists in it, top-level imports are only what
Slicer bundles, ruff is clean, no registration toolkit is used directly, the CMake files declare
what Slicer needs. Then the Logic runs for real headless: the GUI-only modules (qt, the
ScriptedLoadableModule bases, parameterNodeWrapper, i18n) are replaced by stand-ins, the MRML scene
is slicer-core's, and the engine runs as the real background command.
"""

from __future__ import annotations

import ast
import inspect
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from scene_helpers import segmentation_of_blocks

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
    return ast.parse(SCRIPT.read_text(encoding="utf-8"), filename=str(SCRIPT))


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
    foreign = {name for name in top if name not in SLICER_BUNDLED | {"AutoRegisterLib", "AutoRegisterSlicerLib"}
               and name not in sys.stdlib_module_names}
    assert foreign == set(), f"import these inside functions: {foreign}"
    # The module is imported when Slicer starts: at the top it takes only the library's light vocabulary.
    lib = {n.module for n in module_tree().body if isinstance(n, ast.ImportFrom) and n.module
           and n.module.startswith("AutoRegisterLib")}
    assert lib <= {"AutoRegisterLib.events", "AutoRegisterLib.modality"}, lib


def test_module_uses_no_registration_toolkit_and_no_algorithm_of_its_own():
    tree = module_tree()
    assert imported_roots(ast.walk(tree)) & TOOLKITS == set()
    # Registration, scoring and geometry come from AutoRegisterLib; SimpleITK only reads transform files.
    lib_imports = {n.module if n.module != "AutoRegisterLib" else f"AutoRegisterLib.{a.name}"
                   for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                   and n.module.startswith("AutoRegisterLib") for a in n.names}
    assert {"AutoRegisterLib.mrml", "AutoRegisterLib.background"} <= lib_imports
    # No process plumbing of its own: the engine client (AutoRegisterLib.engine) spawns, reads and kills.
    assert imported_roots(ast.walk(tree)) & {"subprocess", "signal", "queue", "threading", "psutil"} == set()
    sitk_calls = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                  and isinstance(n.value, ast.Name) and n.value.id == "sitk"}
    assert sitk_calls <= {"Euler3DTransform"}  # the Test's known truth; transforms are read by the library
    # Only the Test class builds its phantom and measures errors; the GUI and the Logic compute nothing.
    glue = [n for n in tree.body if not (isinstance(n, ast.ClassDef) and n.name == "AutoRegisterTest")]
    numpy_math = {n.attr for node in glue for n in ast.walk(node) if isinstance(n, ast.Attribute)
                  and isinstance(n.value, ast.Name) and n.value.id == "np"}
    assert numpy_math == set()


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

@pytest.fixture()
def case_nodes(slicer_module):
    """A phantom and a copy moved by a known rigid transform, as volume nodes of a slicer-core scene."""
    slicer = pytest.importorskip("slicer")
    fixed_image = slicer_module.AutoRegisterTest.makeHeadPhantom(size=32, spacing=4.0)
    scene = slicer.vtkMRMLScene()
    fixed, moving, truth = slicer_module.AutoRegisterTest.makeCase(scene, fixed_image)
    return fixed_image, truth, scene, fixed, moving


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
def test_logic_register_runs_the_engine_and_sets_the_moving_parent_transform(slicer_module, case_nodes):
    fixed_image, truth, scene, fixed, moving = case_nodes
    from AutoRegisterLib import mrml

    logic = slicer_module.AutoRegisterLogic(scene=scene)
    test = slicer_module.AutoRegisterTest()
    voxels_before = mrml.image_from_volume_node(moving).array.copy()
    fixed_geometry = mrml.ijk_to_ras(fixed)
    events = []
    result = logic.register(fixed, moving, presets=["sitk-rigid", "sitk-affine"], fixedModality="T1",
                            movingModality="T1", createOutputVolume=True, keepAllCandidates=True,
                            progress=events.append, timeout=300)

    assert [c.name for c in result.candidates] == ["sitk-rigid", "sitk-affine"]
    assert result.best is not None and result.best.status == "ok"
    assert [e["event"] for e in events][0] == "hello" and events[-1]["event"] == "done"
    assert {e["event"] for e in events} >= {"start", "finish", "score"}
    assert moving.GetParentTransformNode() is result.transformNode
    assert result.transformNode.GetClassName() == "vtkMRMLLinearTransformNode"
    # Inputs untouched.
    assert np.array_equal(mrml.image_from_volume_node(moving).array, voxels_before)
    assert np.array_equal(mrml.ijk_to_ras(fixed), fixed_geometry) and fixed.GetParentTransformNode() is None
    # The node is the winner's transform, and the winner is right (truth's inverse).
    assert test.meanErrorMm(result.transformNode, fixed_image, truth) < 1.0
    best = result.transform(result.best.name)
    points = fixed_image.physical_points(np.random.default_rng(0).uniform(5, 25, size=(50, 3)))
    for p in points:
        node_point = mrml.LPS_FROM_RAS @ mrml.transform_point_ras(result.transformNode, mrml.LPS_FROM_RAS @ p)
        assert np.linalg.norm(node_point - np.array(best.TransformPoint(tuple(p)))) < 1e-6
    assert result.outputVolume is not None and len(result.candidateTransformNodes) == 2
    # Our nodes point at the moving volume by node reference.
    assert result.transformNode.GetNodeReferenceID("AutoRegisterOutputFor") == moving.GetID()

    # Selecting another candidate refills our node; running again replaces our nodes, adds none.
    other = next(c.name for c in result.candidates if c.name != result.best.name)
    logic.applyCandidate(result, other)
    assert moving.GetParentTransformNode() is result.transformNode
    assert result.transformNode.GetAttribute("AutoRegister.Candidate") == other
    counts = (scene.GetNumberOfNodesByClass("vtkMRMLTransformNode"),
              scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))
    again = logic.register(fixed, moving, presets=["sitk-rigid", "sitk-affine"], fixedModality="T1",
                           movingModality="T1", createOutputVolume=True, keepAllCandidates=True, timeout=300)
    assert (scene.GetNumberOfNodesByClass("vtkMRMLTransformNode"),
            scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")) == counts
    assert again.transformNode.GetID() == result.transformNode.GetID()
    assert again.outputVolume.GetID() == result.outputVolume.GetID()
    rows = logic.resultRows(again)
    assert len(rows) == 2 and all(len(r) == len(logic.RESULT_COLUMNS) for r in rows)
    # The run folders hold the transform files until the result is cleaned up.
    for r in (result, again):
        assert Path(r.runFolder).is_dir()
        r.cleanup()
        assert not Path(r.runFolder).exists()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process tree check reads /proc")
def test_cancel_stops_the_engine_and_its_workers_and_removes_the_run_folder(slicer_module, case_nodes):
    fixed_image, truth, scene, fixed, moving = case_nodes
    logic = slicer_module.AutoRegisterLogic(scene=scene)
    run = logic.start(fixed, moving, presets=["sitk-rigid", "sitk-affine"], fixedModality="T1",
                      movingModality="T1", jobs=2)
    engine = run.engine
    deadline = time.monotonic() + 60
    while not any(e.get("event") == "start" for e in engine.events) and time.monotonic() < deadline:
        engine.poll()
        time.sleep(0.02)
    assert engine.is_running(), "the engine ended before it could be cancelled"
    tree = _descendants(engine.launcher_pid) | {engine.launcher_pid}
    assert len(tree) >= 2  # the engine and at least one worker

    engine.cancel()  # what the Cancel button does: it returns at once
    engine.wait(timeout=30)
    with pytest.raises(RuntimeError, match="cancelled"):
        logic.finish(run)
    engine.cleanup()
    time.sleep(0.2)
    assert [pid for pid in tree if _alive(pid)] == []
    assert not Path(engine.run_dir).exists()
    assert moving.GetParentTransformNode() is None  # the scene is untouched


def test_engine_failure_is_reported_with_the_engines_message(slicer_module, case_nodes):
    fixed_image, truth, scene, fixed, moving = case_nodes
    logic = slicer_module.AutoRegisterLogic(scene=scene)
    with pytest.raises(RuntimeError, match="unknown preset"):
        logic.register(fixed, moving, presets=["no-such-preset"], fixedModality="T1", movingModality="T1",
                       timeout=120)
    assert moving.GetParentTransformNode() is None
    with pytest.raises(ValueError, match="different"):
        logic.register(fixed, fixed)


def test_inputs_removed_during_a_run_are_not_touched(slicer_module, case_nodes):
    """M5: deleting the moving volume while the engine runs must not apply anything to a node that is gone."""
    fixed_image, truth, scene, fixed, moving = case_nodes
    logic = slicer_module.AutoRegisterLogic(scene=scene)
    run = logic.start(fixed, moving, presets=["sitk-rigid"], fixedModality="T1", movingModality="T1")
    scene.RemoveNode(moving)
    run.engine.wait(timeout=300)
    with pytest.raises(RuntimeError, match="removed"):
        logic.finish(run)
    run.engine.cleanup()
    assert scene.GetNumberOfNodesByClass("vtkMRMLTransformNode") == 0


def test_a_broken_user_table_does_not_hide_the_others(slicer_module, tmp_path, monkeypatch):
    """M11: one invalid file in the user's tables folder is skipped; the built-in tables stay listed."""
    monkeypatch.setenv("AUTOREGISTER_TABLES", str(tmp_path))
    (tmp_path / "broken.json").write_text("{ not json")
    names = slicer_module.AutoRegisterLogic().tableNames()
    assert "T2_to_T1" in names and len(names) >= 6
    presets = slicer_module.AutoRegisterLogic().tablePresetNames("Automatic", "T1", "T2")
    assert presets


def test_preset_overrides_and_scoring_window_reach_the_engines_table(slicer_module, case_nodes):
    """Switched-off presets leave the table written for the engine; window 0 keeps the table's own."""
    import json

    fixed_image, truth, scene, fixed, moving = case_nodes
    logic = slicer_module.AutoRegisterLogic(scene=scene)
    table = logic.findTable("Automatic", "T1", "T1")
    off = table.presets[0].name
    for window, expected in ((None, table.scoring.window_voxels), (logic.scoringWindow(6), 7)):
        run = logic.start(fixed, moving, fixedModality="T1", movingModality="T1", disabledPresets=[off],
                          scoringWindowVoxels=window)
        try:
            written = json.loads((Path(run.engine.run_dir) / "table.json").read_text())
        finally:
            run.engine.cleanup()
        names = [p if isinstance(p, str) else p["name"] for p in written["presets"]]
        assert off not in names and names
        assert written["scoring"]["window_voxels"] == expected


# --- masks and the focus (issue #13) -----------------------------------------------------------------

def test_masks_and_the_focus_reach_the_engine_as_files_on_their_volumes_grids(slicer_module, case_nodes,
                                                                              slicer_segmentations):
    """A segment is exported on the fixed volume's grid (world), a labelmap in the moving volume's frame, an ROI
    becomes the fixed voxels it holds; each is written into the run folder and passed as the engine's option."""
    from AutoRegisterLib import mrml
    from AutoRegisterLib.image import read_image

    slicer = slicer_segmentations
    fixed_image, truth, scene, fixed, moving = case_nodes
    segmentation = segmentation_of_blocks(slicer, scene, fixed, np.s_[10:20, 8:22, 9:23])
    segment_id = segmentation.GetSegmentation().GetNthSegmentID(0)
    moving_image = mrml.image_from_volume_node(moving)
    labels = (moving_image.array > np.percentile(moving_image.array, 50)).astype(np.uint8)
    labelmap = mrml.volume_node_from_image(moving_image.with_array(labels), scene, "moving mask",
                                           node=scene.AddNode(slicer.vtkMRMLLabelMapVolumeNode()))
    roi = scene.AddNode(slicer.vtkMRMLMarkupsROINode())
    roi.SetCenter(0.0, 0.0, 0.0)
    roi.SetSize(30.0, 40.0, 20.0)
    logic = slicer_module.AutoRegisterLogic(scene=scene)
    run = logic.start(fixed, moving, presets=["sitk-rigid"], fixedModality="T1", movingModality="T1",
                      fixedMask=segmentation, fixedMaskSegmentID=segment_id, movingMask=labelmap, focus=roi)
    try:
        folder = Path(run.engine.run_dir)
        for name in ("fixed_mask", "moving_mask", "focus"):
            assert f"--{name.replace('_', '-')}={folder / f'{name}.nrrd'}" in run.engine.argv
        fixed_mask, moving_mask, focus = (read_image(folder / f"{n}.nrrd") for n in ("fixed_mask", "moving_mask", "focus"))
    finally:
        run.engine.cleanup()
    assert fixed_mask.same_grid(fixed_image) and focus.same_grid(fixed_image) and moving_mask.same_grid(moving_image)
    expected = np.zeros(fixed_image.array.shape, bool)
    expected[10:20, 8:22, 9:23] = True
    assert np.array_equal(fixed_mask.array != 0, expected)
    assert np.array_equal(moving_mask.array != 0, labels == 1)
    box = mrml.focus_box_from_roi_node(roi)
    assert np.array_equal(focus.array != 0, box.to_mask(fixed_image)) and focus.array.any()


def test_a_mask_the_engine_refuses_fails_the_run_with_its_one_line(slicer_module, case_nodes):
    import slicer

    from AutoRegisterLib import mrml
    from AutoRegisterLib.image import Image

    fixed_image, truth, scene, fixed, moving = case_nodes
    far = Image(np.ones((4, 4, 4), np.uint8), (4.0, 4.0, 4.0), (900.0, 900.0, 900.0))
    labelmap = mrml.volume_node_from_image(far, scene, "far away", node=scene.AddNode(slicer.vtkMRMLLabelMapVolumeNode()))
    logic = slicer_module.AutoRegisterLogic(scene=scene)
    with pytest.raises(RuntimeError, match="moving mask: .*moving_mask.nrrd: does not overlap the moving image"):
        logic.register(fixed, moving, presets=["sitk-rigid"], fixedModality="T1", movingModality="T1",
                       movingMask=labelmap, timeout=120)
    assert moving.GetParentTransformNode() is None


# --- the trust verdict (issue #12) --------------------------------------------------------------------

def _ended_run(slicer_module, folder, case, light="red", disagreement=True, hot_xyz=(3, 2, 1)):
    """A run that ended as the engine ends one won by the exact answer (truth's inverse) with a `light` verdict
    (exit code 4 when red), its disagreement map written when `disagreement`; and that map (or None)."""
    from engine_outputs import EndedEngine, disagreement_map, exit_code_of, write_engine_outputs

    fixed_image, truth, scene, fixed, moving = case
    grid = disagreement_map(fixed_image, hot_xyz=hot_xyz) if disagreement else None
    write_engine_outputs(Path(folder) / "out", truth.GetInverse(), light, grid,
                         worst_slice=hot_xyz[2] if disagreement else None)
    return slicer_module.AutoRegisterRun(EndedEngine(folder, exit_code_of(light)), fixed, moving, "two"), grid


@pytest.fixture()
def ask(monkeypatch):
    """slicer.util.confirmYesNoDisplay with Slicer's rules (slicer_rules.ConfirmYesNoDisplay): the user says No
    unless the test says otherwise; every box shown is recorded."""
    import slicer
    import slicer_rules

    dialog = slicer_rules.ConfirmYesNoDisplay(answer=False)
    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay", dialog)
    return dialog


def test_a_red_result_is_applied_only_when_the_user_says_yes(slicer_module, case_nodes, tmp_path, ask):
    """Exit code 4: the user is asked first; No leaves the moving volume as it was and says so, Yes applies."""
    fixed_image, truth, scene, fixed, moving = case_nodes
    logic = slicer_module.AutoRegisterLogic(scene=scene)
    run, _ = _ended_run(slicer_module, tmp_path / "no", case_nodes)
    result = logic.finish(run)
    assert run.engine.exit_code == 4 and len(ask.questions) == 1
    title, text = ask.questions[0]
    assert title == "AutoRegister: check this result"
    assert "sitk-rigid is RED: estimated error 6.1 mm (90 %: 3.5-11.0 mm); candidates disagree by 6.1 mm" in text
    assert "'AutoRegister test moving disagreement (mm)' shows where" in text
    assert text.endswith("Apply sitk-rigid to 'AutoRegister test moving' anyway?")
    assert not result.applied and result.transformNode is None and moving.GetParentTransformNode() is None
    assert scene.GetNumberOfNodesByClass("vtkMRMLTransformNode") == 0
    assert "NOT applied" in result.message and "select sitk-rigid in Results" in result.message
    # What a console user reads: the light, the words and every number.
    assert result.light == "red" and result.untrusted and result.trust["high_mm"] == 11.0
    assert result.verdict.startswith("RED: estimated error 6.1 mm (90 %: 3.5-11.0 mm); candidates disagree")
    assert result.disagreementNode is not None

    ask.answer = True
    result = logic.finish(_ended_run(slicer_module, tmp_path / "yes", case_nodes)[0])
    assert len(ask.questions) == 2 and result.applied
    assert moving.GetParentTransformNode() is result.transformNode
    assert slicer_module.AutoRegisterTest().meanErrorMm(result.transformNode, fixed_image, truth) < 0.01
    assert "although its trust verdict is red" in result.message


def test_the_console_can_answer_for_a_red_result_and_a_green_one_asks_nothing(slicer_module, case_nodes, tmp_path,
                                                                                ask):
    fixed_image, truth, scene, fixed, moving = case_nodes
    logic = slicer_module.AutoRegisterLogic(scene=scene)
    declined = logic.finish(_ended_run(slicer_module, tmp_path / "red0", case_nodes)[0], applyUntrusted=False)
    assert not declined.applied and moving.GetParentTransformNode() is None
    judged = []
    accepted = logic.finish(_ended_run(slicer_module, tmp_path / "red1", case_nodes)[0],
                            applyUntrusted=lambda result: judged.append(result.verdict) or True)
    assert accepted.applied and judged and judged[0].startswith("RED")
    for light in ("green", "amber", None):
        result = logic.finish(_ended_run(slicer_module, tmp_path / str(light), case_nodes, light)[0])
        assert result.applied and not result.untrusted and moving.GetParentTransformNode() is result.transformNode
        assert result.message.endswith("applied to 'AutoRegister test moving'.")
        assert result.light == light and (result.verdict != "") == (light is not None)
    assert ask.questions == []


def test_in_slicers_testing_mode_a_red_result_is_applied_without_a_dialog(slicer_module, case_nodes, tmp_path,
                                                                           monkeypatch, caplog):
    """Nobody answers in testing mode: Slicer's confirm dialogs document Yes without a box, but
    confirmYesNoDisplay returns `True == qt.QMessageBox.Yes` (False) then, so the module decides itself."""
    import types

    import slicer
    import slicer_rules

    dialog = slicer_rules.ConfirmYesNoDisplay(answer=False, testing=True)
    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay", dialog)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(testingEnabled=lambda: True), raising=False)
    fixed_image, truth, scene, fixed, moving = case_nodes
    assert dialog("Apply?", windowTitle="check") is False  # what relying on it would do
    with caplog.at_level("WARNING"):
        result = slicer_module.AutoRegisterLogic(scene=scene).finish(_ended_run(slicer_module, tmp_path, case_nodes)[0])
    assert result.applied and moving.GetParentTransformNode() is result.transformNode and dialog.questions == []
    assert any("testing mode" in r.getMessage() and "RED" in r.getMessage() for r in caplog.records)


def test_the_disagreement_map_is_one_node_per_moving_volume_that_the_next_run_replaces(slicer_module, case_nodes,
                                                                                      tmp_path, ask):
    """Loaded on the fixed volume's coarse grid as the engine wrote it; a re-run refills the same node; a run
    without a map removes it (it showed another run's winner), without an error."""
    from AutoRegisterLib import mrml

    fixed_image, truth, scene, fixed, moving = case_nodes
    logic = slicer_module.AutoRegisterLogic(scene=scene)
    result = logic.finish(_ended_run(slicer_module, tmp_path / "1", case_nodes, "amber")[0])
    node, grid = result.disagreementNode, _ended_run(slicer_module, tmp_path / "grid", case_nodes)[1]
    assert node.GetName() == "AutoRegister test moving disagreement (mm)" and mrml.is_output_node(node)
    loaded = mrml.image_from_volume_node(node)
    assert loaded.same_grid(grid) and loaded.array.max() == 9.0
    outside = ~np.isfinite(grid.array)  # NaN in the file: 0 once read (ITK's NIfTI reader), under the threshold
    assert np.all(loaded.array[outside] < node.GetDisplayNode().GetLowerThreshold())
    assert node.GetDisplayNode().GetColorNodeID() in mrml.DISAGREEMENT_COLORS
    volumes = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    again = logic.finish(_ended_run(slicer_module, tmp_path / "2", case_nodes, "green", hot_xyz=(5, 5, 5))[0])
    assert again.disagreementNode.GetID() == node.GetID()
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes
    assert mrml.image_from_volume_node(node).array[5, 5, 5] == 9.0
    without = logic.finish(_ended_run(slicer_module, tmp_path / "3", case_nodes, "green", disagreement=False)[0])
    assert without.disagreementNode is None and without.applied
    assert scene.GetNodeByID(node.GetID()) is None
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes - 1


def _record_layers(monkeypatch):
    """slicer.util.setSliceViewerLayers with Slicer's keywords (util.py), recording each call's."""
    import slicer

    calls = []

    def set_slice_viewer_layers(background="keep-current", foreground="keep-current", label="keep-current",
                                foregroundOpacity=None, labelOpacity=None, fit=False, rotateToVolumePlane=False):
        calls.append(dict(background=background, foreground=foreground, foregroundOpacity=foregroundOpacity, fit=fit))

    # slicer-core ships Slicer's util.py: an argument the real one lacks would raise there.
    assert inspect.signature(set_slice_viewer_layers) == inspect.signature(slicer.util.setSliceViewerLayers)
    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", set_slice_viewer_layers)
    return calls


def test_an_amber_or_red_verdict_shows_its_map_over_the_fixed_volume_at_its_worst_slice(slicer_module, case_nodes,
                                                                                      tmp_path, monkeypatch, ask):
    """The map is the overlay and every slice view jumps to its largest disagreement (vtkMRMLSliceNode.JumpAllSlices,
    slicer-core's own); a green result shows the registered volume, as before."""
    import slicer

    from AutoRegisterLib import mrml

    fixed_image, truth, scene, fixed, moving = case_nodes
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    axial = slicer.vtkMRMLSliceNode()  # a slice view's node: axial (its SliceToRAS is the identity)
    axial.SetLayoutName("Red")
    scene.AddNode(axial)
    calls = _record_layers(monkeypatch)
    logic = slicer_module.AutoRegisterLogic(scene=scene)
    result = logic.finish(_ended_run(slicer_module, tmp_path / "amber", case_nodes, "amber")[0])
    logic.showInViews(result)
    assert calls[-1] == dict(background=fixed, foreground=result.disagreementNode, foregroundOpacity=0.4, fit=True)
    grid = _ended_run(slicer_module, tmp_path / "grid", case_nodes)[1]
    hot = mrml.LPS_FROM_RAS @ grid.physical_points(np.array([[3.0, 2.0, 1.0]]))[0]
    assert np.isclose(axial.GetSliceToRAS().GetElement(2, 3), hot[2])  # the axial view shows the worst slice
    green = logic.finish(_ended_run(slicer_module, tmp_path / "green", case_nodes, "green")[0])
    logic.showInViews(green)
    assert calls[-1] == dict(background=fixed, foreground=moving, foregroundOpacity=0.5, fit=True)
    assert green.disagreementNode is not None  # loaded all the same, one click away


def test_a_run_that_ends_badly_is_still_an_error_whatever_its_verdict(slicer_module, case_nodes, tmp_path, ask):
    from engine_outputs import EndedEngine

    fixed_image, truth, scene, fixed, moving = case_nodes
    logic = slicer_module.AutoRegisterLogic(scene=scene)
    for code in (4, 1):  # exit 4 without result.json; a crash
        run = slicer_module.AutoRegisterRun(EndedEngine(tmp_path / str(code), code, "boom"), fixed, moving, "two")
        with pytest.raises(RuntimeError, match="engine failed: boom"):
            logic.finish(run)
    assert ask.questions == [] and moving.GetParentTransformNode() is None


@pytest.mark.slow
def test_the_engines_red_verdict_reaches_the_console_and_nothing_is_applied(slicer_module, case_nodes, tmp_path,
                                                                            monkeypatch):
    """The real engine under a calibration that calls everything red: exit code 4, result.json's verdict and
    disagreement.nii.gz reach the result; declined, the scene keeps the moving volume as it was."""
    from AutoRegisterLib import mrml
    from AutoRegisterLib.image import coarsened
    from AutoRegisterLib.trust import GRID_MM, Calibration

    strict = tmp_path / "strict.json"
    Calibration([0.0, 1.0, 0.0, 0.0], -0.5, 0.5, [0.0, 0.0], -2.0, 2.0, red_min_mm=-1.0).save(strict)
    monkeypatch.setenv("AUTOREGISTER_TRUST_CALIBRATION", str(strict))
    fixed_image, truth, scene, fixed, moving = case_nodes
    logic = slicer_module.AutoRegisterLogic(scene=scene)
    result = logic.register(fixed, moving, presets=["sitk-rigid", "sitk-affine"], fixedModality="T1",
                            movingModality="T1", applyUntrusted=False, timeout=300)
    try:
        assert int(result.exit_code) == 4 and result.light == "red" and result.verdict.startswith("RED")
        assert not result.applied and moving.GetParentTransformNode() is None
        assert scene.GetNumberOfNodesByClass("vtkMRMLTransformNode") == 0
        loaded = mrml.image_from_volume_node(result.disagreementNode)
        assert loaded.same_grid(coarsened(fixed_image, GRID_MM))
        assert 0 <= result.trust["worst_slice"] < loaded.array.shape[0]
    finally:
        result.cleanup()
