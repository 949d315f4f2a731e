"""AutoRegister: one Register button that races registration presets and keeps the best.

This file is Slicer glue only: nodes, paths, the panel and applying transforms. Registration, scoring and
geometry live in AutoRegisterLib, the node conversions in AutoRegisterLib.mrml, and the engine client
(spawn, progress, cancel, reading the outputs) in AutoRegisterLib.engine. The engine runs as
`python -m AutoRegisterLib` in a background process, so Slicer never freezes and a crash or a heavy import
(torch, ANTs, elastix) never touches Slicer's own interpreter.
"""

import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Annotated, Union

import qt
import slicer
import vtk
from AutoRegisterSlicerLib import dependencies, environment
from AutoRegisterSlicerLib.selftest import SelfTestSteps
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLMarkupsROINode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def ensureLibraryImportable():
    """Make `import AutoRegisterLib` work in an extension build and from "Additional module paths"."""
    try:
        import AutoRegisterLib  # noqa: F401
    except ImportError:
        # Run from a source checkout: the library is the module folder's sibling.
        repoRoot = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if repoRoot not in sys.path:
            sys.path.insert(0, repoRoot)
    return libraryRoot()


def libraryRoot():
    """Folder that holds the AutoRegisterLib package (put first on the engine's path)."""
    import AutoRegisterLib

    return os.path.dirname(os.path.dirname(os.path.abspath(AutoRegisterLib.__file__)))


ensureLibraryImportable()
# Both are light (no numpy): the module is imported when Slicer starts.
from AutoRegisterLib.events import DEVICES  # noqa: E402
from AutoRegisterLib.modality import MODALITIES  # noqa: E402

AUTOMATIC_TABLE = "Automatic"
#: The optional mask inputs: each is a parameter (a node), a "<role>SegmentID" parameter (the segment, when the
#: node is a segmentation), a "<role>Selector" and a "<role>SegmentSelector" in the .ui.
MASK_ROLES = ("fixedMask", "movingMask", "focus")
#: The colour of each trust light in the panel (the light's own word is in the text too, for colour-blind users).
TRUST_COLOURS = {"green": "#2e7d32", "amber": "#e65100", "red": "#c62828"}
#: Verdicts whose disagreement map replaces the registered volume as the overlay in the slice views: there the
#: user has to look where candidates disagree; a green result is checked by looking at the alignment itself.
SHOW_DISAGREEMENT_FOR = ("amber", "red")


#
# AutoRegister
#


class AutoRegister(ScriptedLoadableModule):
    """Module metadata."""

    def __init__(self, parent):
        """Describe the module to Slicer."""
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("AutoRegister")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["AutoRegister developers (AutoRegister project)"]
        self.parent.helpText = _(
            "One-click registration: several presets (ANTs, elastix, BRAINSFit, SimpleITK; rigid, affine, "
            "deformable) run in parallel, each result is scored by local normalized cross-correlation "
            "inside the overlap of the two volumes, and the best one becomes the moving volume's parent "
            "transform. Input volumes are never modified."
        ) + self.getDefaultModuleDocumentationLink()
        self.parent.acknowledgementText = _("Built on AutoRegisterLib, ANTs, elastix, BRAINSFit and SimpleITK.")


#
# AutoRegisterParameterNode
#


@parameterNodeWrapper
class AutoRegisterParameterNode:
    """GUI state: inputs, outputs and the Advanced options."""

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedModality: Annotated[str, Choice(list(MODALITIES))] = "MR"
    movingModality: Annotated[str, Choice(list(MODALITIES))] = "MR"
    # Not bound to its combo box: the list changes with the user's tables, and a bound combo raises on
    # a saved value that is no longer listed.
    tableName: str = AUTOMATIC_TABLE
    createOutputVolume: bool = False
    disabledPresets: str = ""  # comma-separated preset names left out of the race
    scoringWindowVoxels: Annotated[int, WithinRange(0, 15)] = 0  # 0: the table's own window
    jobs: Annotated[int, WithinRange(0, 64)] = 0  # 0: one per core
    timeoutSeconds: Annotated[int, WithinRange(10, 36000)] = 600
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    keepAllCandidates: bool = False
    # A Union of node types must list None: its serializer refuses to write None otherwise, and None is the
    # default written when the node is made (parameterNodeWrapper/serializers.py UnionSerializer, util.py).
    fixedMask: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode, None]
    movingMask: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode, None]
    focus: Union[vtkMRMLSegmentationNode, vtkMRMLMarkupsROINode, None]
    # Not bound: no connector takes a qMRMLSegmentSelectorWidget; the module keeps them in sync.
    fixedMaskSegmentID: str = ""
    movingMaskSegmentID: str = ""
    focusSegmentID: str = ""


#
# AutoRegisterWidget
#


class AutoRegisterWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI wiring only: every action goes through AutoRegisterLogic."""

    POLL_INTERVAL_MS = 200

    def __init__(self, parent=None) -> None:
        """Set up members; the GUI itself is built in setup()."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._result = None
        self._pollTimer = None
        self._fillingResults = False
        self._shownPresets = None
        self._seenVolumes = {}
        self._installing = False
        self._missing = {}  # pip name -> what is lost; looked up on setup, enter and after an install

    def setup(self) -> None:
        """Load the .ui, connect signals and the parameter node."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AutoRegister.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = AutoRegisterLogic()

        self.ui.resultsTable.setColumnCount(len(AutoRegisterLogic.RESULT_COLUMNS))
        self.ui.resultsTable.setHorizontalHeaderLabels(list(AutoRegisterLogic.RESULT_COLUMNS))
        self.ui.progressBar.setRange(0, 100)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.registerButton.connect("clicked(bool)", self.onRegisterButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.resultsTable.connect("itemSelectionChanged()", self.onResultSelectionChanged)
        self.ui.tableComboBox.connect("currentIndexChanged(int)", self.onTableChanged)
        self.ui.presetsListWidget.connect("itemChanged(QListWidgetItem*)", self.onPresetToggled)
        for role in MASK_ROLES:
            getattr(self.ui, f"{role}SegmentSelector").connect(
                "currentSegmentChanged(QString)", lambda segmentID, role=role: self.onSegmentChanged(role, segmentID))
        self.ui.warningsLabel.visible = False
        self.showTrust(None)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPollRun)

        self.refreshTableList()
        self.initializeParameterNode()
        self.updateDependencyStatus()

    def cleanup(self) -> None:
        """Stop a running registration, remove its files and drop observers when the module is closed."""
        self.stopRun()
        if self._result is not None:
            self._result.cleanup()
            self._result = None
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        """Reconnect the parameter node when the module is shown; pick up tables added meanwhile."""
        self.refreshTableList()
        self.initializeParameterNode()
        self.updateDependencyStatus()

    def exit(self) -> None:
        """Disconnect the parameter node when another module is shown."""
        self.setParameterNode(None, updateGui=False)

    def onSceneStartClose(self, caller, event) -> None:
        """A run must not apply its result to a scene that is gone: cancel it, then forget the parameter node."""
        if self._run is not None:
            self.stopRun()
            self.ui.statusLabel.text = _("Cancelled: the scene was closed.")
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Get a fresh parameter node after the scene closed."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Use the module's parameter node."""
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode, updateGui=True) -> None:
        """Bind the GUI to a parameter node (widgets with SlicerParameterName follow it)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._shownPresets = None
        # What the node holds now was chosen before (a saved scene, a re-entered module): keep its modalities.
        p = self._parameterNode
        self._seenVolumes = {"fixed": p.fixedVolume, "moving": p.movingVolume} if p else {}
        if updateGui:
            self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        """Everything the parameter node decides: the table combo, the preset list and the buttons.

        Runs on the node's ModifiedEvent, i.e. after a bound widget has written its new value (a slot of
        ours connected to the widget would run first and read the old one)."""
        p = self._parameterNode
        if p:
            self.guessModalitiesOfNewVolumes()
            self.selectTableInCombo(p.tableName)
            self.updatePresetList()
            self.updateSegmentSelectors()
        self.updateButtons()

    def updateSegmentSelectors(self) -> None:
        """Show a mask's segment selector when its node is a segmentation, on the segment the node remembers."""
        p = self._parameterNode
        for role in MASK_ROLES:
            node = getattr(p, role)
            selector = getattr(self.ui, f"{role}SegmentSelector")
            isSegmentation = node is not None and node.IsA("vtkMRMLSegmentationNode")
            selector.visible = isSegmentation
            if not isSegmentation:
                continue
            remembered = getattr(p, f"{role}SegmentID")
            if selector.currentNode() is not node:
                selector.setCurrentNode(node)  # fills its segments and may select one (and say so)
            if remembered and selector.currentSegmentID() != remembered:
                selector.setCurrentSegmentID(remembered)  # does nothing when this segmentation lacks it
            # Some Slicer versions select without a signal: the node follows what the selector shows.
            if getattr(p, f"{role}SegmentID") != selector.currentSegmentID():
                setattr(p, f"{role}SegmentID", selector.currentSegmentID())

    def onSegmentChanged(self, role, segmentID) -> None:
        """Remember the segment picked for a mask, when its selector shows that mask's segmentation."""
        p = self._parameterNode
        selector = getattr(self.ui, f"{role}SegmentSelector")
        if p and getattr(p, role) is not None and selector.currentNode() is getattr(p, role):
            if getattr(p, f"{role}SegmentID") != segmentID:
                setattr(p, f"{role}SegmentID", segmentID)

    def guessModalitiesOfNewVolumes(self) -> None:
        """Guess the modality of a volume the user just picked; a modality the user corrected stays.

        Done here, after the node holds the new volume: a slot on the selector would run before the
        connector's and its write would make the node push the old volume back into the selector."""
        p = self._parameterNode
        for role in ("fixed", "moving"):
            node = getattr(p, f"{role}Volume")
            if node is not self._seenVolumes.get(role):
                self._seenVolumes[role] = node
                if node is not None:
                    setattr(p, f"{role}Modality", self.logic.guessModality(node))

    def updateButtons(self) -> None:
        """Register needs two different volumes, the required packages, and no run or install in progress."""
        p = self._parameterNode
        running = self._run is not None
        missing = [pip for pip in self._missing if pip in dependencies.REQUIRED]
        ready = bool(p and p.fixedVolume and p.movingVolume and p.fixedVolume != p.movingVolume)
        self.ui.registerButton.enabled = ready and not running and not missing and not self._installing
        self.ui.cancelButton.enabled = running
        self.ui.installDependenciesButton.enabled = not running and not self._installing and bool(self._missing)
        if missing:
            self.ui.registerButton.toolTip = _(
                "{packages} is not installed. Click 'Install dependencies' (PyTorch comes from the PyTorch "
                "extension), then restart Slicer if asked.").format(packages=", ".join(missing))
        elif running:
            self.ui.registerButton.toolTip = _("Registration in progress")
        elif not ready:
            self.ui.registerButton.toolTip = _("Select two different volumes")
        else:
            self.ui.registerButton.toolTip = _("Race the presets and keep the best result")

    def refreshTableList(self) -> None:
        """Fill the table combo: Automatic, then every table that loads (a broken user table is skipped)."""
        combo = self.ui.tableComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem(AUTOMATIC_TABLE)
        combo.addItems(self.logic.tableNames())
        combo.blockSignals(wasBlocked)
        if self._parameterNode:
            self.selectTableInCombo(self._parameterNode.tableName)

    def selectTableInCombo(self, name) -> None:
        """Show `name` in the table combo; a table file or a table no longer listed is added as an entry."""
        combo = self.ui.tableComboBox
        index = combo.findText(name)
        wasBlocked = combo.blockSignals(True)
        if index < 0:
            combo.addItem(name)
            index = combo.findText(name)
        combo.currentIndex = index
        combo.blockSignals(wasBlocked)

    def onTableChanged(self, index) -> None:
        """The table combo is not bound: write the user's choice into the parameter node."""
        if self._parameterNode and index >= 0:
            self._parameterNode.tableName = self.ui.tableComboBox.itemText(index)

    def updatePresetList(self) -> None:
        """List the chosen table's presets as checkable items (unticked ones are left out)."""
        p = self._parameterNode
        key = (p.tableName, p.fixedModality, p.movingModality, p.disabledPresets)
        if key == self._shownPresets:
            return
        self._shownPresets = key
        names = self.logic.tablePresetNames(p.tableName, p.fixedModality, p.movingModality)
        disabled = set(filter(None, p.disabledPresets.split(",")))
        widget = self.ui.presetsListWidget
        wasBlocked = widget.blockSignals(True)
        widget.clear()
        for name in names:
            item = qt.QListWidgetItem(name)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Unchecked if name in disabled else qt.Qt.Checked)
            widget.addItem(item)
        widget.blockSignals(wasBlocked)

    def onPresetToggled(self, item) -> None:
        """Remember which presets are switched off."""
        if not self._parameterNode:
            return
        widget = self.ui.presetsListWidget
        off = [widget.item(i).text() for i in range(widget.count) if widget.item(i).checkState() != qt.Qt.Checked]
        self._parameterNode.disabledPresets = ",".join(off)

    def updateDependencyStatus(self) -> None:
        """Say, above the Register button, which packages are missing and what each one enables."""
        self._missing = missing = self.logic.missingDependencies()
        self.ui.dependenciesLabel.text = "; ".join(
            _("{package} is missing: no {purpose}").format(package=pip, purpose=purpose)
            for pip, purpose in missing.items())
        self.ui.dependenciesLabel.visible = bool(missing)
        self.ui.installDependenciesButton.visible = bool(missing)
        self.updateButtons()

    def onInstallDependencies(self) -> None:
        """Install the missing packages after the user confirms; Register waits until it is done."""
        missing = self.logic.missingDependencies()
        if not missing or self._run is not None:
            return
        if not slicer.util.confirmOkCancelDisplay(
                _("Install {packages} into Slicer's Python? This can take several minutes.").format(
                    packages=", ".join(missing))):
            return
        self._installing = True
        self.updateButtons()
        try:
            with slicer.util.tryWithErrorDisplay(_("Failed to install dependencies."), waitCursor=True):
                self.logic.installDependencies(list(missing))
        finally:
            self._installing = False
            self.updateDependencyStatus()

    def onRegisterButton(self) -> None:
        """Start the background registration; progress arrives through the poll timer."""
        if self._result is not None:
            self._result.cleanup()  # its transform files; the nodes it made stay in the scene
            self._result = None
        with slicer.util.tryWithErrorDisplay(_("Failed to start the registration."), waitCursor=True):
            p = self._parameterNode
            self.ui.resultsTable.setRowCount(0)
            self.ui.warningsLabel.text = ""
            self.ui.warningsLabel.visible = False
            self.showTrust(None)
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Starting...")
            self._run = self.logic.start(p.fixedVolume, p.movingVolume, **self.logic.optionsFromParameterNode(p))
            self._pollTimer.start()
        self.updateButtons()

    def onCancelButton(self) -> None:
        """Ask the engine to stop (it is killed with its workers if it does not); nothing is added to the scene."""
        if self._run is not None:
            self.ui.statusLabel.text = _("Cancelling...")
            self._run.engine.cancel()

    def stopRun(self) -> None:
        """End a running registration now and remove its files (module closed, scene closed)."""
        if self._run is not None:
            self._pollTimer.stop()
            self._run.engine.terminate(grace_s=2.0)  # Slicer waits on this: a short grace, then the kill
            self._run.engine.cleanup()
            self._run = None
            self.updateButtons()

    def onPollRun(self) -> None:
        """Drain progress events; when the engine ends, bring the result into the scene."""
        run = self._run
        if run is None:
            self._pollTimer.stop()
            return
        for event in run.engine.poll():
            if "fraction" in event:
                self.ui.progressBar.value = int(100 * event["fraction"])
            if event.get("event") in ("start", "finish", "score") and not run.engine.cancelled:
                self.ui.statusLabel.text = self.logic.describeEvent(event, run)
        if run.engine.is_running():
            return
        self._pollTimer.stop()
        self._run = None
        if run.engine.cancelled:
            run.engine.cleanup()
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Cancelled; the scene was not changed.")
        else:
            self.ui.statusLabel.text = _("Registration failed.")
            with slicer.util.tryWithErrorDisplay(_("Registration failed."), waitCursor=True):
                self._result = self.logic.finish(run, applyUntrusted=self.confirmUntrusted)
                self.showResult(self._result)
                self.logic.showInViews(self._result)
            if self._result is None:
                run.engine.cleanup()  # nothing to apply later: its files go now
        self.updateButtons()

    def confirmUntrusted(self, result) -> bool:
        """Ask whether to apply a red winner, with its disagreement map already in the views to look at."""
        self.logic.showInViews(result)
        return self.logic.askToApplyUntrusted(result)

    def showResult(self, result) -> None:
        """Fill the results table and highlight the winner; rows without a transform cannot be selected."""
        self.ui.progressBar.value = 100
        self.ui.statusLabel.text = result.message
        warnings = self.logic.resultWarnings(result)
        self.ui.warningsLabel.text = "\n".join(_("Warning: {text}").format(text=w) for w in warnings)
        self.ui.warningsLabel.visible = bool(warnings)
        self.showTrust(result)
        table = self.ui.resultsTable
        self._fillingResults = True
        try:
            table.setRowCount(len(result.candidates))
            for row, values in enumerate(self.logic.resultRows(result)):
                candidate = result.candidates[row]
                for column, value in enumerate(values):
                    item = qt.QTableWidgetItem(value)
                    if not candidate.transform_path:
                        item.setFlags(qt.Qt.ItemIsEnabled)
                    if result.best is not None and candidate.name == result.best.name:
                        font = item.font()
                        font.setBold(True)
                        item.setFont(font)
                        item.setBackground(qt.QBrush(qt.QColor(200, 240, 200)))
                    table.setItem(row, column, item)
            table.resizeColumnsToContents()
            # A winner the user declined stays unselected, so clicking its row applies it after all.
            if result.best is not None and result.applied:
                table.selectRow(result.candidates.index(result.best))
        finally:
            self._fillingResults = False

    def showTrust(self, result) -> None:
        """The winner's trust verdict under the Register button: light and estimate in the light's colour, the
        reason on the line below; hidden when there is none (before the first run, during a run)."""
        trust = result.trust if result is not None else {}
        headline = AutoRegisterLogic.trustHeadline(trust)
        self.ui.trustLabel.text = f"● {headline}" if headline else ""
        self.ui.trustLabel.styleSheet = (
            f"color: {TRUST_COLOURS.get(trust.get('light'), 'black')}; font-weight: bold" if headline else "")
        self.ui.trustReasonLabel.text = str(trust.get("reason") or "") if headline else ""
        self.ui.trustLabel.visible = bool(headline)
        self.ui.trustReasonLabel.visible = bool(headline and self.ui.trustReasonLabel.text)

    def onResultSelectionChanged(self) -> None:
        """Apply the selected candidate instead of the winner."""
        if self._fillingResults or self._result is None:
            return
        rows = {index.row() for index in self.ui.resultsTable.selectedIndexes()}
        if len(rows) != 1:
            return
        candidate = self._result.candidates[rows.pop()]
        if not candidate.transform_path:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not apply this result."), waitCursor=True):
            self.logic.applyCandidate(self._result, candidate.name)
            self.ui.statusLabel.text = _("Using {name}.").format(name=candidate.name)


#
# AutoRegisterLogic
#


@dataclass
class AutoRegisterRun:
    """A started registration: the library's engine client and the nodes it was started for."""

    engine: object  # AutoRegisterLib.engine.EngineRun
    fixedVolume: object
    movingVolume: object
    tableName: str
    keepAllCandidates: bool = False
    createOutputVolume: bool = False


@dataclass
class AutoRegisterResult:
    """What a run produced (the library's typed outputs) and the nodes made from it.

    Transforms are read from the run folder only when a candidate is applied, and the folder is removed by
    cleanup() (the widget does so when the next run starts or the module closes)."""

    outputs: object  # AutoRegisterLib.results.EngineOutputs (EngineRun.outputs())
    fixedVolume: object
    movingVolume: object
    tableName: str
    runFolder: str
    createOutputVolume: bool = False
    message: str = ""
    transformNode: object = None
    outputVolume: object = None
    candidateTransformNodes: dict = field(default_factory=dict)
    #: True once a candidate's transform is the moving volume's parent (a red winner the user declined: False).
    applied: bool = False
    #: The trust verdict's disagreement map (mm) as a volume node, or None when the engine wrote none.
    disagreementNode: object = None

    def __getattr__(self, name):
        """The library's outputs answer the rest: candidates, best, summary, exit_code, candidate(name)."""
        if name == "outputs":
            raise AttributeError(name)
        return getattr(self.outputs, name)

    @property
    def light(self):
        """The trust verdict's light: "green", "amber", "red", or None when there is no verdict."""
        return self.outputs.trust.get("light")

    @property
    def verdict(self):
        """The trust verdict in words, e.g. "RED: estimated error 4.2 mm (90 %: 2.5–7.0 mm); candidates disagree
        by ..." ("" when there is none); `trust` has every number."""
        headline = AutoRegisterLogic.trustHeadline(self.outputs.trust)
        reason = self.outputs.trust.get("reason")
        return f"{headline}; {reason}" if headline and reason else headline

    @property
    def untrusted(self):
        """True when the winner must not be applied without asking: a red verdict (the engine's exit code 4)."""
        from AutoRegisterLib.events import ExitCode

        return self.best is not None and (self.light == "red" or self.exit_code == ExitCode.UNTRUSTED)

    def transform(self, name):
        """The SimpleITK transform of candidate `name`, read from its file (only now: it can be large)."""
        return self.outputs.read_transform(name)

    def cleanup(self):
        """Remove the run folder (the transform files); nodes already in the scene stay."""
        shutil.rmtree(self.runFolder, ignore_errors=True)


class AutoRegisterLogic(ScriptedLoadableModuleLogic):
    """Runs AutoRegister on volume nodes; usable from the Python console without the GUI:

    result = AutoRegisterLogic().register(fixedNode, movingNode)
    """

    RESULT_COLUMNS = ("Preset", "Backend", "Score", "Coverage", "Folding", "Time (s)", "Status")

    def __init__(self, scene=None) -> None:
        """`scene` defaults to slicer.mrmlScene."""
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene

    @property
    def scene(self):
        """The MRML scene outputs are added to."""
        return self._scene if self._scene is not None else slicer.mrmlScene

    def getParameterNode(self):
        """The module's parameter node, wrapped."""
        return AutoRegisterParameterNode(super().getParameterNode())

    # --- choices shown in the GUI ------------------------------------------------------------

    def tableNames(self):
        """Names of every preset table that loads (built-in and the user's); broken files are logged."""
        from AutoRegisterLib import presets

        problems = []
        tables = presets.list_tables(errors=problems)
        for problem in problems:
            logging.warning(f"AutoRegister: skipped a preset table: {problem}")
        return [t.name for t in tables]

    def findTable(self, tableName, fixedModality, movingModality):
        """The table for a name, a JSON file path or a Table; the modality pair's table for "Automatic"."""
        from AutoRegisterLib import presets

        automatic = not tableName or tableName == AUTOMATIC_TABLE
        return presets.resolve_table(None if automatic else tableName, fixedModality, movingModality)

    def tablePresetNames(self, tableName, fixedModality, movingModality):
        """Preset names of a table ([] when it cannot be loaded)."""
        try:
            return [p.name for p in self.findTable(tableName, fixedModality, movingModality).presets]
        except Exception as exc:
            logging.warning(f"AutoRegister: {exc}")
            return []

    def guessModality(self, volumeNode):
        """The library's modality guess ('CT' or 'MR') from every 4th voxel, so a large CT costs no copy."""
        from AutoRegisterLib.image import Image
        from AutoRegisterLib.modality import guess_modality

        try:
            sample = slicer.util.arrayFromVolume(volumeNode)[::4, ::4, ::4]
            return guess_modality(Image(sample, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))
        except Exception:
            return "MR"

    @staticmethod
    def scoringWindow(voxels):
        """The scoring window the GUI passes on: None (the table's own) for 0, else the next odd size."""
        voxels = int(voxels or 0)
        if voxels <= 0:
            return None
        return max(3, voxels if voxels % 2 else voxels + 1)

    def optionsFromParameterNode(self, p):
        """register()/start() keyword arguments from the GUI's parameter node."""
        return dict(
            fixedModality=p.fixedModality, movingModality=p.movingModality, table=p.tableName,
            disabledPresets=[n for n in p.disabledPresets.split(",") if n],
            scoringWindowVoxels=self.scoringWindow(p.scoringWindowVoxels), jobs=p.jobs or None,
            timeoutSeconds=p.timeoutSeconds, device=p.device, keepAllCandidates=p.keepAllCandidates,
            createOutputVolume=p.createOutputVolume,
            fixedMask=p.fixedMask, fixedMaskSegmentID=p.fixedMaskSegmentID or None,
            movingMask=p.movingMask, movingMaskSegmentID=p.movingMaskSegmentID or None,
            focus=p.focus, focusSegmentID=p.focusSegmentID or None,
        )

    # --- dependencies and the engine's environment (AutoRegisterSlicerLib) ---------------------

    def missingDependencies(self, requiredOnly=False):
        """pip name -> what is lost, for each package the engine would import but cannot find."""
        return dependencies.missing(requiredOnly, elastixExecutable=self.elastixExecutable())

    def installDependencies(self, packages=None):
        """Install packages: torch through the PyTorch extension, the rest by pip, Slicer's own pinned."""
        return dependencies.install(list(packages or self.missingDependencies()))

    def elastixExecutable(self):
        """Path of SlicerElastix's elastix executable, or None."""
        return environment.elastixExecutable()

    def engineEnvironment(self):
        """Environment of the engine: Slicer's startup environment, SlicerElastix's, our library first."""
        return environment.engineEnvironment(libraryRoot())

    # --- running ------------------------------------------------------------------------------

    def start(self, fixedVolume, movingVolume, fixedModality=None, movingModality=None, table=None,
              presets=None, disabledPresets=(), scoringWindowVoxels=None, jobs=None, timeoutSeconds=600,
              device="auto", keepAllCandidates=False, createOutputVolume=False, fixedMask=None,
              fixedMaskSegmentID=None, movingMask=None, movingMaskSegmentID=None, focus=None, focusSegmentID=None):
        """Write the volumes into a new run folder and start the engine; returns an AutoRegisterRun.

        `fixedMask` and `movingMask` (a labelmap volume node, or a segmentation node with the ID of its segment)
        say where each volume holds what matters; `focus` (a segmentation segment or a markups ROI node) is
        the structure of the fixed volume to align best. Each is placed where it shows in the views."""
        from AutoRegisterLib import mrml
        from AutoRegisterLib.background import start_registration

        if fixedVolume is None or movingVolume is None:
            raise ValueError(_("Select a fixed and a moving volume."))
        if fixedVolume == movingVolume:
            raise ValueError(_("The fixed and moving volumes must be different."))
        automatic = not table or table == AUTOMATIC_TABLE
        # Fixed as the user sees it; moving in its own coordinates, because our result replaces its parent.
        # Each mask in the frame of its volume.
        masks = {
            "fixed_mask": self._mask(fixedMask, fixedMaskSegmentID, fixedVolume, world=True),
            "moving_mask": self._mask(movingMask, movingMaskSegmentID, movingVolume, world=False),
            "focus": self._mask(focus, focusSegmentID, fixedVolume, world=True),
        }
        engine, tableName = start_registration(
            environment.temporaryFolder(), mrml.image_from_volume_node(fixedVolume, world=True),
            mrml.image_from_volume_node(movingVolume), fixed_modality=fixedModality or self.guessModality(fixedVolume),
            moving_modality=movingModality or self.guessModality(movingVolume), table=None if automatic else table,
            presets=presets, disabled=disabledPresets, window_voxels=scoringWindowVoxels,
            timeout_s=timeoutSeconds, device=device, jobs=jobs, python=environment.pythonExecutable(),
            env=self.engineEnvironment(), **masks)
        logging.info(f"AutoRegister: {' '.join(engine.argv)}")
        return AutoRegisterRun(engine, fixedVolume, movingVolume, tableName, keepAllCandidates, createOutputVolume)

    @staticmethod
    def _mask(node, segmentID, volume, world):
        """A mask node as the library takes it (an Image or a FocusBox), or None."""
        from AutoRegisterLib import mrml

        return None if node is None else mrml.mask_from_node(node, volume, segmentID, world=world)

    def register(self, fixedVolume, movingVolume, progress=None, timeout=None, applyUntrusted=None, **options):
        """Register without the GUI: start the engine, wait (Slicer keeps drawing), apply the best result.

        Options are those of start(). Returns an AutoRegisterResult with every candidate;
        result.transformNode is the moving volume's new parent transform. result.verdict says how far to
        trust it (result.light, result.trust: every number) and result.disagreementNode maps where candidates
        disagree. A red winner is applied only when `applyUntrusted` says so: True, False, or None to ask.
        """
        run = self.start(fixedVolume, movingVolume, **options)
        try:
            run.engine.wait(progress=progress or self._logProgress, timeout=timeout, idle=self._processEvents)
            return self.finish(run, applyUntrusted=applyUntrusted)
        except BaseException:
            run.engine.cleanup()
            raise

    def _processEvents(self):
        app = getattr(slicer, "app", None)
        if app is not None:
            app.processEvents()

    def _logProgress(self, event):
        if event.get("event") in ("finish", "done"):
            logging.info(f"AutoRegister: {event}")

    def describeEvent(self, event, run):
        """One status line for a progress event."""
        running = ", ".join(run.engine.running.names) or "-"
        if event.get("event") == "finish":
            return _("{name}: {status}. Running: {running}").format(
                name=event["candidate"], status=event.get("status"), running=running)
        return _("Running: {running}").format(running=running)

    def finish(self, run, applyUntrusted=None):
        """Read the engine's outputs, load the disagreement map and make the winner the moving volume's parent
        transform. A winner with a red trust verdict (exit code 4) is applied only when `applyUntrusted` says so:
        True, False, a function of the result, or None to ask the user (askToApplyUntrusted)."""
        from AutoRegisterLib.events import ExitCode

        engine = run.engine
        if engine.cancelled:
            raise RuntimeError(_("Registration cancelled; the scene was not changed."))
        outputs = engine.outputs()
        kept = (ExitCode.OK, ExitCode.NO_RESULT, ExitCode.UNTRUSTED)  # each wrote result.json
        if outputs.exit_code not in kept or not outputs.summary:
            details = outputs.message or f"exit code {outputs.exit_code}"
            raise RuntimeError(_("The registration engine failed: {details}").format(details=details))
        self._checkEngineLibrary(engine)
        for warning in self.resultWarnings(outputs):
            logging.warning(f"AutoRegister: {warning}")
        for node in (run.fixedVolume, run.movingVolume):
            if not self.scene.IsNodePresent(node):
                raise RuntimeError(_("An input volume was removed during the registration; nothing was applied."))
        result = AutoRegisterResult(outputs=outputs, fixedVolume=run.fixedVolume, movingVolume=run.movingVolume,
                                    tableName=run.tableName, runFolder=engine.run_dir,
                                    createOutputVolume=run.createOutputVolume)
        self.loadDisagreementMap(result)
        if result.best is None:
            reasons = "; ".join(f"{c.name}: {c.error or c.status}" for c in result.candidates)
            result.message = _("No preset succeeded ({reasons}).").format(reasons=reasons)
            return result
        if result.verdict:
            logging.info(f"AutoRegister: trust {result.verdict}")
        if run.keepAllCandidates:
            self._keepCandidateNodes(result)
        names = dict(name=result.best.name, score=result.best.score or 0.0, moving=result.movingVolume.GetName())
        if result.untrusted and not self._applyUntrusted(result, applyUntrusted):
            result.message = _("Best: {name} (score {score:.3f}), NOT applied: its trust verdict is red. "
                               "'{moving}' keeps its transform; select {name} in Results to apply it anyway.").format(
                **names)
            return result
        self.applyCandidate(result, result.best.name)
        if result.untrusted:
            result.message = _("Best: {name} (score {score:.3f}); applied to '{moving}' although its trust verdict "
                               "is red: check it before using it.").format(**names)
        else:
            result.message = _("Best: {name} (score {score:.3f}); applied to '{moving}'.").format(**names)
        return result

    def _applyUntrusted(self, result, applyUntrusted):
        """Whether to apply a red winner: the caller's answer, or the user's."""
        if applyUntrusted is None:
            return bool(self.askToApplyUntrusted(result))
        return bool(applyUntrusted(result) if callable(applyUntrusted) else applyUntrusted)

    def askToApplyUntrusted(self, result):
        """Ask the user whether to apply a winner whose trust verdict is red (Yes/No). In Slicer's testing mode
        nobody can answer: no dialog, the answer is Yes and the log says so, as Slicer's confirm dialogs document."""
        if self.testingEnabled():
            # Decided here: slicer.util.confirmYesNoDisplay returns `True == qt.QMessageBox.Yes` (False) then.
            logging.warning(f"AutoRegister: testing mode: applying {result.best.name} without asking, although its "
                            f"trust verdict is {result.verdict}")
            return True
        where = (_("\n\n'{map}' shows where the candidates disagree.").format(map=result.disagreementNode.GetName())
                 if result.disagreementNode is not None else "")
        return slicer.util.confirmYesNoDisplay(
            _("The trust verdict on {name} is {verdict}.{where}\n\nApply {name} to '{moving}' anyway?").format(
                name=result.best.name, verdict=result.verdict, where=where, moving=result.movingVolume.GetName()),
            windowTitle=_("AutoRegister: check this result"))

    @staticmethod
    def testingEnabled():
        """True when Slicer runs its tests (--testing): nobody is there to answer a question."""
        app = getattr(slicer, "app", None)
        return bool(app is not None and app.testingEnabled())

    @staticmethod
    def trustHeadline(trust):
        """A trust verdict (result.trust) in one line: "GREEN: estimated error 0.6 mm (90 %: 0.3–1.1 mm)"."""
        from AutoRegisterLib.trust import headline

        return headline(trust)

    def loadDisagreementMap(self, result):
        """Load the engine's disagreement map (mm) as the volume node result.disagreementNode, replacing the one a
        previous run made for the same moving volume; without a map that node is removed (it showed another run)."""
        from AutoRegisterLib import mrml
        from AutoRegisterLib.image import read_image

        moving, scene = result.movingVolume, self.scene
        previous = mrml.find_output_node(scene, "disagreement", moving)
        path = result.outputs.disagreement_path
        if path is None:
            if previous is not None:
                scene.RemoveNode(previous)
            return None
        node = mrml.disagreement_node_from_image(read_image(path), scene, name=f"{moving.GetName()} disagreement (mm)",
                                                 node=previous)
        mrml.mark_output_node(node, "disagreement", moving)
        self._placeBeside(node, moving)
        result.disagreementNode = node
        return node

    def _checkEngineLibrary(self, engine):
        """Warn when the engine ran another AutoRegisterLib than this module (an installed extension and a
        checkout both on Slicer's paths: the launcher puts its own paths before ours)."""
        import AutoRegisterLib

        hello = next((e for e in engine.events if e.get("event") == "hello"), {})
        library = hello.get("library")
        if hello.get("version") != AutoRegisterLib.__version__ or (library and os.path.normcase(
                os.path.realpath(library)) != os.path.normcase(os.path.realpath(libraryRoot()))):
            logging.warning(f"AutoRegister: the engine ran AutoRegisterLib {hello.get('version')} from {library}, "
                            f"this module uses {AutoRegisterLib.__version__} from {libraryRoot()}")

    @staticmethod
    def resultWarnings(result):
        """What a run warns the user of: result.json's warnings, then the notes on the masks."""
        return list(result.warnings) + list(result.mask_notes)

    def applyCandidate(self, result, name):
        """Make candidate `name` the moving volume's parent transform (and refill the output volume)."""
        from AutoRegisterLib import mrml
        from AutoRegisterLib.image import resample_to_grid

        candidate = result.candidate(name)
        if not candidate.transform_path:
            raise ValueError(_("{name} has no transform ({status}).").format(name=name, status=candidate.status))
        transform = result.transform(name)
        moving, scene = result.movingVolume, self.scene
        node = mrml.transform_node_from_transform(
            transform, scene, name=f"{moving.GetName()} AutoRegister ({name})", reference=result.fixedVolume,
            node=mrml.find_output_node(scene, "transform", moving))
        mrml.mark_output_node(node, "transform", moving)
        node.SetAttribute("AutoRegister.Candidate", name)
        moving.SetAndObserveTransformNodeID(node.GetID())
        self._placeBeside(node, moving)
        result.transformNode = node
        result.applied = True
        if result.createOutputVolume:
            warped = resample_to_grid(mrml.image_from_volume_node(moving),
                                      mrml.image_from_volume_node(result.fixedVolume, world=True), transform)
            volume = mrml.volume_node_from_image(
                warped, scene, name=f"{moving.GetName()} registered", node=mrml.find_output_node(scene, "volume", moving))
            mrml.mark_output_node(volume, "volume", moving)
            self._placeBeside(volume, moving)
            result.outputVolume = volume
        return node

    def _placeBeside(self, node, moving):
        """Put a new node in the moving volume's subject-hierarchy folder (not at the root)."""
        try:
            sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
            parent = sh.GetItemParent(sh.GetItemByDataNode(moving))
            sh.SetItemParent(sh.GetItemByDataNode(node), parent)
        except Exception as exc:  # no subject hierarchy (bare scene): the root is fine
            logging.debug(f"AutoRegister: subject hierarchy not set: {exc}")

    def showInViews(self, result):
        """Show the registered moving volume over the fixed one in the slice views; for an amber or red verdict,
        the disagreement map instead, with the views moved to where it is largest (its worst slice)."""
        from AutoRegisterLib import mrml

        if result.best is None or not hasattr(slicer.util, "setSliceViewerLayers"):
            return
        if result.disagreementNode is None or result.light not in SHOW_DISAGREEMENT_FOR:
            slicer.util.setSliceViewerLayers(background=result.fixedVolume,
                                             foreground=result.outputVolume or result.movingVolume,
                                             foregroundOpacity=0.5, fit=True)
            return
        slicer.util.setSliceViewerLayers(background=result.fixedVolume, foreground=result.disagreementNode,
                                         foregroundOpacity=0.4, fit=True)
        # After the fit, which centres the views on the volume.
        point = mrml.hottest_point_ras(result.disagreementNode, result.trust.get("worst_slice"))
        if point is not None:
            slicer.vtkMRMLSliceNode.JumpAllSlices(self.scene, *(float(v) for v in point))

    def _keepCandidateNodes(self, result):
        from AutoRegisterLib import mrml

        moving = result.movingVolume
        for candidate in result.candidates:
            if not candidate.transform_path:
                continue
            role = f"candidate:{candidate.name}"
            node = mrml.transform_node_from_transform(
                result.transform(candidate.name), self.scene, reference=result.fixedVolume,
                name=f"{moving.GetName()} AutoRegister candidate {candidate.name}",
                node=mrml.find_output_node(self.scene, role, moving))
            result.candidateTransformNodes[candidate.name] = mrml.mark_output_node(node, role, moving)
            self._placeBeside(node, moving)

    def resultRows(self, result):
        """Text of the results table, one row per candidate, in RESULT_COLUMNS order."""
        def _number(value, fmt):
            return "" if value is None else format(value, fmt)

        rows = []
        for c in result.candidates:
            status = str(c.status) if not c.error else f"{c.status}: {c.error}"
            rows.append([c.name, c.backend, _number(c.score, ".3f"), _number(c.coverage, ".2f"),
                         _number(c.folding_fraction, ".3f"), _number(c.seconds, ".1f"), status])
        return rows


#
# AutoRegisterTest
#


class AutoRegisterTest(ScriptedLoadableModuleTest, SelfTestSteps):
    """Runs inside Slicer (and from Testing/slicer_smoke.py): registers two small volumes it makes itself,
    from the console API and from the button, and cancels a run (the steps: AutoRegisterSlicerLib.selftest)."""

    logicClass = AutoRegisterLogic

    def setUp(self):
        """Start from an empty scene with the dependencies in place."""
        slicer.mrmlScene.Clear()
        logic = AutoRegisterLogic()
        missing = logic.missingDependencies(requiredOnly=True)
        if missing:
            if not slicer.app.commandOptions().testingEnabled:
                self.skipTest(f"not installed: {', '.join(missing)} (AutoRegister's Install dependencies)")
            logic.installDependencies(list(missing))

    def runTest(self):
        """Run every test."""
        for test in (self.test_register_recovers_a_known_rigid_misalignment,
                     self.test_register_button_runs_in_the_background, self.test_cancel_leaves_the_scene_alone):
            self.setUp()
            test()

