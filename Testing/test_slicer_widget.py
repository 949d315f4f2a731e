"""The module's panel, run without a display: setup() on widgets built from the .ui (fake_qt), the parameter
node bound by Slicer's rules (slicer_rules), the real MRML of slicer-core and the real engine.

Each test is a thing a user does with the panel; the review item it guards is named (review of the module
against Slicer's source, ../shared/reviews/slicer-module.md).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import pytest
from scene_helpers import segmentation_of_blocks

UI_FILE = Path(__file__).resolve().parent.parent / "AutoRegister" / "Resources" / "UI" / "AutoRegister.ui"


@pytest.fixture()
def panel(slicer_module, monkeypatch, tmp_path):
    """The widget after setup(), with a phantom pair in the scene; error dialogs are recorded, not shown."""
    import fake_qt
    import slicer

    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    ui = fake_qt.widgets_from_ui(UI_FILE)
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: fake_qt.root_widget(UI_FILE, ui))
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda widget: ui)
    dialogs = []

    @contextlib.contextmanager
    def try_with_error_display(message, waitCursor=False, show=True):
        try:
            yield
        except Exception as exc:
            dialogs.append(f"{message} {exc}")

    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", try_with_error_display)
    # Slicer's own keywords (util.py setSliceViewerLayers): an unknown keyword raises, as in Slicer.
    def set_slice_viewer_layers(background="keep-current", foreground="keep-current", label="keep-current",
                                foregroundOpacity=None, labelOpacity=None, fit=False, rotateToVolumePlane=False):
        pass

    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", set_slice_viewer_layers)
    node = slicer_module.AutoRegisterParameterNode()
    monkeypatch.setattr(slicer_module.AutoRegisterLogic, "getParameterNode", lambda self: node)
    monkeypatch.setenv("AUTOREGISTER_TABLES", str(tmp_path / "user tables"))
    widget = slicer_module.AutoRegisterWidget()
    widget.setup()
    image = slicer_module.AutoRegisterTest.makeHeadPhantom(size=32, spacing=4.0)
    fixed, moving, truth = slicer_module.AutoRegisterTest.makeCase(scene, image)
    yield widget, fixed, moving, dialogs, image, truth
    widget.cleanup()  # what Slicer does when the module is unloaded: no observer outlives the test


def _pick(widget, fixed, moving):
    """What a user does: pick the two volumes in the selectors."""
    widget.ui.fixedVolumeSelector.setCurrentNode(fixed)
    widget.ui.movingVolumeSelector.setCurrentNode(moving)


def _run_to_end(widget, seconds=300):
    """Drive the poll timer as Qt would, until the run ends."""
    deadline = time.monotonic() + seconds
    while widget._run is not None and time.monotonic() < deadline:
        widget.onPollRun()
        time.sleep(0.05)
    assert widget._run is None, "the run did not end in time"


def test_setup_binds_every_widget_and_register_waits_for_two_volumes(panel):
    widget, fixed, moving, dialogs, _, _ = panel
    assert widget.ui.fixedModalityComboBox.items[:2] == ["T1", "T2"]  # refilled from the Choice (B1)
    assert widget.ui.deviceComboBox.items == ["auto", "cpu", "cuda"]
    assert widget.ui.tableComboBox.items[0] == "Automatic" and "T2_to_T1" in widget.ui.tableComboBox.items
    assert widget.ui.scoringWindowSpinBox.minimum == 0 and widget.ui.scoringWindowSpinBox.value == 0  # M10
    assert not widget.ui.registerButton.enabled
    _pick(widget, fixed, moving)
    assert widget._parameterNode.fixedVolume is fixed and widget._parameterNode.movingVolume is moving
    assert widget.ui.registerButton.enabled, widget.ui.registerButton.toolTip
    assert dialogs == []


def test_preset_list_follows_the_new_modality_not_the_old_one(panel):
    """M4: the list must show the table of the pair the user just picked."""
    widget, fixed, moving, dialogs, _, _ = panel
    _pick(widget, fixed, moving)
    combo = widget.ui.movingModalityComboBox
    for modality in ("T2", "CT", "T1"):
        combo.currentIndex = combo.findText(modality)  # the user's choice: the connector writes it
        shown = [widget.ui.presetsListWidget.item(i).text() for i in range(widget.ui.presetsListWidget.count)]
        assert shown == widget.logic.tablePresetNames("Automatic", "T1", modality), modality
    widget.ui.tableComboBox.currentIndex = widget.ui.tableComboBox.findText("CT_to_T1")
    assert widget._parameterNode.tableName == "CT_to_T1"
    shown = [widget.ui.presetsListWidget.item(i).text() for i in range(widget.ui.presetsListWidget.count)]
    assert shown == widget.logic.tablePresetNames("CT_to_T1", "T1", "T1")


def test_a_corrected_modality_survives_a_resync(panel):
    """M8: the guess runs when the user picks another volume, not when the node re-syncs the selectors."""
    widget, fixed, moving, dialogs, _, _ = panel
    _pick(widget, fixed, moving)
    combo = widget.ui.movingModalityComboBox
    combo.currentIndex = combo.findText("FLAIR")
    widget.setParameterNode(widget._parameterNode)  # enter(), scene load: connectGui writes every widget
    assert widget._parameterNode.movingModality == "FLAIR"
    widget.ui.movingVolumeSelector.setCurrentNode(fixed)  # another node: guessed again
    widget.ui.movingVolumeSelector.setCurrentNode(moving)
    assert widget._parameterNode.movingModality == "MR"


def test_register_is_disabled_without_torch_and_says_how_to_install_it(panel, monkeypatch):
    """B3: a fresh Slicer has no torch."""
    widget, fixed, moving, dialogs, _, _ = panel
    _pick(widget, fixed, moving)
    real = widget.logic.missingDependencies
    monkeypatch.setattr(widget.logic, "missingDependencies",
                        lambda requiredOnly=False: {"torch": "scoring", **({} if requiredOnly else real())})
    widget.enter()  # dependencies are looked up when the module is shown
    assert not widget.ui.registerButton.enabled
    assert "torch" in widget.ui.registerButton.toolTip and "Install dependencies" in widget.ui.registerButton.toolTip
    assert widget.ui.dependenciesLabel.visible and "torch" in widget.ui.dependenciesLabel.text
    assert widget.ui.installDependenciesButton.visible and widget.ui.installDependenciesButton.enabled


@pytest.mark.slow
def test_register_button_applies_the_winner_and_rows_without_a_transform_cannot_be_picked(panel, tmp_path):
    widget, fixed, moving, dialogs, image, truth = panel
    table = tmp_path / "two.json"
    table.write_text('{"schema": "autoregister-table/1", "name": "two", "fixed_modality": "T1", '
                     '"moving_modality": "T1", "presets": ["sitk-rigid", "no-such-backend-preset"]}')
    _pick(widget, fixed, moving)
    widget._parameterNode.tableName = "sitk.json"  # a name that is no table: the run fails with a dialog
    widget.ui.registerButton.click()
    assert widget._run is None and dialogs and "sitk.json" in dialogs[-1]
    dialogs.clear()
    widget._parameterNode.tableName = "Automatic"
    widget.ui.registerButton.click()
    failing = widget._run
    failing.engine.process.kill()  # the engine dies: one dialog, and its run folder is removed
    _run_to_end(widget, seconds=60)
    assert len(dialogs) == 1 and "engine failed" in dialogs[0] and not Path(failing.engine.run_dir).exists()
    assert widget._result is None and moving.GetParentTransformNode() is None
    dialogs.clear()
    table.write_text('{"schema": "autoregister-table/1", "name": "one", "fixed_modality": "T1", '
                     '"moving_modality": "T1", "presets": ["sitk-rigid", "sitk-affine"]}')
    widget._parameterNode.tableName = str(table)
    assert widget.ui.tableComboBox.currentText == str(table)  # a table file is shown as an entry
    widget.ui.registerButton.click()
    assert widget._run is not None and not widget.ui.registerButton.enabled and widget.ui.cancelButton.enabled
    _run_to_end(widget)
    assert dialogs == []
    result = widget._result
    assert result.best is not None and moving.GetParentTransformNode() is result.transformNode
    assert widget.ui.resultsTable.rowCount == 2
    assert widget.ui.progressBar.value == 100 and "Best:" in widget.ui.statusLabel.text
    assert slicer_module_test_error(widget, image, truth) < 1.0
    other = next(c for c in result.candidates if c.name != result.best.name)
    widget.ui.resultsTable.selectRow(result.candidates.index(other))
    assert result.transformNode.GetAttribute("AutoRegister.Candidate") == other.name
    assert widget.ui.registerButton.enabled and not widget.ui.cancelButton.enabled
    widget.cleanup()
    assert not Path(result.runFolder).exists()


def slicer_module_test_error(widget, image, truth):
    """The self-test's error measure on the panel's result."""
    import AutoRegister

    return AutoRegister.AutoRegisterTest().meanErrorMm(widget._result.transformNode, image, truth)


@pytest.mark.slow
def test_cancel_shows_no_dialog_changes_nothing_and_removes_the_run(panel):
    """M7: a user's Cancel is not an error; M2/M3: the engine and its files go."""
    widget, fixed, moving, dialogs, _, _ = panel
    _pick(widget, fixed, moving)
    widget._parameterNode.fixedModality = widget._parameterNode.movingModality = "T1"
    widget.ui.registerButton.click()
    run = widget._run
    deadline = time.monotonic() + 120
    while not any(e.get("event") == "start" for e in run.engine.events) and time.monotonic() < deadline:
        widget.onPollRun()
        time.sleep(0.02)
    widget.ui.cancelButton.click()
    assert widget.ui.statusLabel.text == "Cancelling..."
    _run_to_end(widget, seconds=60)
    assert dialogs == []
    assert "Cancelled" in widget.ui.statusLabel.text and widget.ui.progressBar.value == 0
    assert moving.GetParentTransformNode() is None
    assert not Path(run.engine.run_dir).exists()
    assert widget.ui.registerButton.enabled


def test_closing_the_scene_cancels_a_run(panel):
    """M5: a result must never land in a scene that was closed."""
    widget, fixed, moving, dialogs, _, _ = panel
    _pick(widget, fixed, moving)
    widget.ui.registerButton.click()
    run = widget._run
    widget.onSceneStartClose(None, None)
    assert widget._run is None and not Path(run.engine.run_dir).exists()
    assert moving.GetParentTransformNode() is None and dialogs == []


# --- masks and the focus (issue #13) -----------------------------------------------------------------

def test_a_segmentation_mask_shows_its_segment_selector_and_keeps_the_chosen_segment(panel, slicer_segmentations):
    """The segment selector (qMRMLSegmentSelectorWidget) appears for a segmentation only; the segment the user picks
    is the parameter node's and survives a re-sync and a detour through a labelmap."""
    widget, fixed, moving, dialogs, _, _ = panel
    slicer = slicer_segmentations
    scene = slicer.mrmlScene
    organs = segmentation_of_blocks(slicer, scene, fixed, np.s_[10:20, 10:20, 6:10], ["Liver", "Tumour"], step=4)
    liver, tumour = (organs.GetSegmentation().GetNthSegmentID(i) for i in range(2))
    p, selector = widget._parameterNode, widget.ui.fixedMaskSegmentSelector
    assert not selector.visible and p.fixedMask is None
    widget.ui.fixedMaskSelector.setCurrentNode(organs)
    assert p.fixedMask is organs and selector.visible and selector.currentNode() is organs
    assert p.fixedMaskSegmentID == liver == selector.currentSegmentID()  # the first segment, until the user picks
    selector.setCurrentSegmentID(tumour)
    assert p.fixedMaskSegmentID == tumour
    widget.setParameterNode(p)  # enter(), a scene load: connectGui writes every widget again
    assert p.fixedMaskSegmentID == tumour == selector.currentSegmentID()
    labelmap = mrml_labelmap(slicer, scene, fixed)
    widget.ui.fixedMaskSelector.setCurrentNode(labelmap)
    assert p.fixedMask is labelmap and not selector.visible
    widget.ui.fixedMaskSelector.setCurrentNode(organs)
    assert selector.visible and p.fixedMaskSegmentID == tumour
    # A volume is no mask: the combo box does not list it (its nodeTypes come from the parameter's Union).
    widget.ui.movingMaskSelector.setCurrentNode(moving)
    assert p.movingMask is None
    assert dialogs == []


def mrml_labelmap(slicer, scene, volume):
    """A labelmap node on `volume`'s grid with a block inside."""
    from AutoRegisterLib import mrml

    reference = mrml.image_from_volume_node(volume)
    labels = (reference.array > reference.array.mean()).astype("uint8")
    return mrml.volume_node_from_image(reference.with_array(labels), scene, "labels",
                                       node=scene.AddNode(slicer.vtkMRMLLabelMapVolumeNode()))


def test_register_passes_the_chosen_masks_and_focus_to_the_engine(panel, slicer_segmentations):
    widget, fixed, moving, dialogs, _, _ = panel
    slicer = slicer_segmentations
    scene = slicer.mrmlScene
    organs = segmentation_of_blocks(slicer, scene, fixed, np.s_[10:20, 10:20, 6:10], ["Liver", "Tumour"], step=4)
    roi = scene.AddNode(slicer.vtkMRMLMarkupsROINode())
    roi.SetSize(40.0, 40.0, 40.0)
    _pick(widget, fixed, moving)
    widget.ui.fixedMaskSelector.setCurrentNode(organs)
    widget.ui.fixedMaskSegmentSelector.setCurrentSegmentID(organs.GetSegmentation().GetNthSegmentID(1))
    widget.ui.movingMaskSelector.setCurrentNode(mrml_labelmap(slicer, scene, moving))
    widget.ui.focusSelector.setCurrentNode(roi)
    assert not widget.ui.focusSegmentSelector.visible  # an ROI has no segments
    widget.ui.registerButton.click()
    run = widget._run
    assert dialogs == [] and run is not None
    folder = Path(run.engine.run_dir)
    flags = [a.split("=")[0] for a in run.engine.argv if a.startswith("--") and "=" in a]
    assert flags == ["--fixed-mask", "--moving-mask", "--focus"]
    assert all((folder / name).is_file() for name in ("fixed_mask.nrrd", "moving_mask.nrrd", "focus.nrrd"))
    widget.stopRun()


def test_the_runs_warnings_and_mask_notes_are_shown_with_its_result(panel, tmp_path):
    """result.json's top-level "warnings" and inputs.masks.notes appear under the results, and go with the next run."""
    import json

    from AutoRegisterLib.results import read_outputs

    widget, fixed, moving, dialogs, _, _ = panel
    out = tmp_path / "out"
    out.mkdir()
    warning = "the moving image looks rotated 180° about the vertical axis"
    note = "fixed mask: liver.nii.gz: resampled onto the fixed image's grid; its 0.5 mm voxels are finer"
    (out / "result.json").write_text(json.dumps({
        "best": None, "warnings": [warning], "inputs": {"masks": {"fixed_mask": "liver.nii.gz", "notes": [note]}},
        "candidates": [{"name": "sitk-rigid", "backend": "sitk", "transform_type": "rigid", "status": "failed",
                        "error": "diverged"}]}))
    module = __import__("AutoRegister")
    result = module.AutoRegisterResult(outputs=read_outputs(out, 3), fixedVolume=fixed, movingVolume=moving,
                                       tableName="custom", runFolder=str(tmp_path / "run"))
    assert widget.logic.resultWarnings(result) == [warning, note]
    widget.showResult(result)
    label = widget.ui.warningsLabel
    assert label.visible and warning in label.text and note in label.text and len(label.text.splitlines()) == 2
    quiet = module.AutoRegisterResult(outputs=read_outputs(tmp_path / "nothing", 0), fixedVolume=fixed,
                                      movingVolume=moving, tableName="custom", runFolder=str(tmp_path / "run"))
    widget.showResult(quiet)
    assert not label.visible and label.text == ""


# --- the trust verdict (issue #12) --------------------------------------------------------------------

def _end_run(widget, folder, image, truth, fixed, moving, light):
    """What the poll timer sees when the engine has ended a run won by the exact answer, with a `light` verdict
    (exit code 4 when red) and its disagreement map: the result is brought into the scene."""
    from engine_outputs import EndedEngine, disagreement_map, exit_code_of, write_engine_outputs

    import AutoRegister

    write_engine_outputs(Path(folder) / "out", truth.GetInverse(), light, disagreement_map(image), worst_slice=1)
    widget._run = AutoRegister.AutoRegisterRun(EndedEngine(folder, exit_code_of(light)), fixed, moving, "two")
    widget.onPollRun()
    assert widget._run is None


def _asking(monkeypatch, answer, log):
    """slicer.util.confirmYesNoDisplay with Slicer's rules, answering `answer` and noting in `log` when it asks."""
    import slicer
    import slicer_rules

    dialog = slicer_rules.ConfirmYesNoDisplay(answer=answer)

    def confirm(text, windowTitle=None, parent=None, **kwargs):
        log.append("asked")
        return dialog(text, windowTitle=windowTitle, parent=parent, **kwargs)

    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay", confirm)
    return dialog


def _layers(monkeypatch, log):
    """slicer.util.setSliceViewerLayers with Slicer's keywords, noting each overlay in `log`."""
    import slicer

    def set_slice_viewer_layers(background="keep-current", foreground="keep-current", label="keep-current",
                                foregroundOpacity=None, labelOpacity=None, fit=False, rotateToVolumePlane=False):
        log.append(foreground)

    monkeypatch.setattr(slicer.util, "setSliceViewerLayers", set_slice_viewer_layers)


def test_the_verdict_shows_under_register_in_its_colour_and_goes_when_the_next_run_starts(panel, tmp_path,
                                                                                          monkeypatch):
    import AutoRegister

    widget, fixed, moving, dialogs, image, truth = panel
    label, reason = widget.ui.trustLabel, widget.ui.trustReasonLabel
    assert not label.visible and label.text == "" and not reason.visible  # before the first run
    log = []
    _asking(monkeypatch, answer=False, log=log)
    _layers(monkeypatch, log)
    _end_run(widget, tmp_path / "green", image, truth, fixed, moving, "green")
    assert dialogs == [] and "asked" not in log
    assert label.visible and label.text == "● GREEN: estimated error 0.6 mm (90 %: 0.3-1.1 mm)"
    assert AutoRegister.TRUST_COLOURS["green"] in label.styleSheet
    assert reason.visible and reason.text.startswith("1 other candidate; the closest agrees within 0.4 mm")
    assert moving.GetParentTransformNode() is widget._result.transformNode and log[-1] is moving
    assert widget.ui.resultsTable.selected == [0]  # the winner's row
    _end_run(widget, tmp_path / "amber", image, truth, fixed, moving, "amber")
    assert label.text.startswith("● AMBER: estimated error 1.8 mm")
    assert AutoRegister.TRUST_COLOURS["amber"] in label.styleSheet
    assert log[-1] is widget._result.disagreementNode  # where the candidates disagree, over the fixed volume
    _pick(widget, fixed, moving)
    widget.ui.registerButton.click()
    try:
        assert widget._run is not None and not label.visible and label.text == "" and not reason.visible
    finally:
        widget.stopRun()


def test_a_red_winner_waits_for_the_users_yes_and_its_row_applies_it_later(panel, tmp_path, monkeypatch):
    """Exit code 4: the map is in the views before the question; No leaves the moving volume alone and says so;
    the winner's row is left unselected, so a click on it applies it."""
    import AutoRegister

    widget, fixed, moving, dialogs, image, truth = panel
    log = []
    dialog = _asking(monkeypatch, answer=False, log=log)
    _layers(monkeypatch, log)
    _end_run(widget, tmp_path / "red", image, truth, fixed, moving, "red")
    result = widget._result
    assert dialogs == [] and len(dialog.questions) == 1
    assert log.index(result.disagreementNode) < log.index("asked")
    assert moving.GetParentTransformNode() is None and not result.applied
    status = widget.ui.statusLabel.text
    assert "NOT applied" in status and "trust verdict is red" in status
    assert widget.ui.trustLabel.text.startswith("● RED: estimated error 6.1 mm (90 %: 3.5-11.0 mm)")
    assert AutoRegister.TRUST_COLOURS["red"] in widget.ui.trustLabel.styleSheet
    assert "left back part of the head" in widget.ui.trustReasonLabel.text
    assert widget.ui.resultsTable.selected == []
    widget.ui.resultsTable.selectRow(result.candidates.index(result.best))
    assert moving.GetParentTransformNode() is result.transformNode and result.applied
    assert widget.ui.statusLabel.text == "Using sitk-rigid." and dialogs == []
