"""AutoRegister: one Register button that races registration presets and keeps the best.

This file is GUI and process plumbing only. Registration, scoring and geometry live in
AutoRegisterLib; the node conversions in AutoRegisterLib.mrml. The engine runs as the
`python -m AutoRegisterLib` command in a background process, so Slicer never freezes and a crash
or a heavy import (torch, ANTs, elastix) never touches Slicer's own interpreter.
"""

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

AUTOMATIC_TABLE = "Automatic"
MODALITY_CHOICES = ("T1", "T2", "FLAIR", "PD", "CT", "MR")
#: pip name -> import name of what the engine needs beyond Slicer's bundle, and what each enables.
DEPENDENCIES = {
    "torch": ("torch", "scoring (needed for every run)"),
    "matplotlib": ("matplotlib", "the report image"),
    "antspyx": ("ants", "the ANTs presets"),
    "itk-elastix": ("itk", "the elastix presets (unless SlicerElastix is installed)"),
}
EXIT_CANCELLED = 130


def ensureLibraryImportable():
    """Make `import AutoRegisterLib` work in an extension build and from "Additional module paths"."""
    try:
        import AutoRegisterLib  # noqa: F401
    except ImportError:
        # Run from a source checkout: the library is the module folder's sibling.
        repoRoot = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if repoRoot not in sys.path:
            sys.path.insert(0, repoRoot)
        import AutoRegisterLib  # noqa: F401
    return libraryRoot()


def libraryRoot():
    """Folder that holds the AutoRegisterLib package (goes on the engine process's PYTHONPATH)."""
    import AutoRegisterLib

    return os.path.dirname(os.path.dirname(os.path.abspath(AutoRegisterLib.__file__)))


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
        self.parent.contributors = ["AutoRegister developers"]
        self.parent.helpText = _(
            "One-click registration: several presets (ANTs, elastix, BRAINSFit, SimpleITK; rigid, affine, "
            "deformable) run in parallel, each result is scored by local normalized cross-correlation "
            "inside the overlap of the two volumes, and the best one becomes the moving volume's parent "
            "transform. Input volumes are never modified."
        )
        self.parent.acknowledgementText = _("Built on AutoRegisterLib, ANTs, elastix, BRAINSFit and SimpleITK.")


#
# AutoRegisterParameterNode
#


@parameterNodeWrapper
class AutoRegisterParameterNode:
    """GUI state: inputs, outputs and the Advanced options."""

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedModality: str = "MR"
    movingModality: str = "MR"
    tableName: str = AUTOMATIC_TABLE
    createOutputVolume: bool = False
    disabledPresets: str = ""  # comma-separated preset names left out of the race
    scoringWindowVoxels: Annotated[int, WithinRange(3, 15)] = 5
    jobs: Annotated[int, WithinRange(0, 64)] = 0  # 0: one per core
    timeoutSeconds: Annotated[int, WithinRange(10, 36000)] = 600
    device: str = "auto"
    keepAllCandidates: bool = False


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

    def setup(self) -> None:
        """Load the .ui, connect signals and the parameter node."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AutoRegister.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = AutoRegisterLogic()

        for combo in (self.ui.fixedModalityComboBox, self.ui.movingModalityComboBox):
            combo.addItems(list(MODALITY_CHOICES))
        self.ui.tableComboBox.addItem(AUTOMATIC_TABLE)
        self.ui.tableComboBox.addItems(self.logic.tableNames())
        self.ui.resultsTable.setColumnCount(len(AutoRegisterLogic.RESULT_COLUMNS))
        self.ui.resultsTable.setHorizontalHeaderLabels(list(AutoRegisterLogic.RESULT_COLUMNS))
        self.ui.progressBar.setRange(0, 100)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.registerButton.connect("clicked(bool)", self.onRegisterButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.resultsTable.connect("itemSelectionChanged()", self.onResultSelectionChanged)
        self.ui.fixedVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onFixedVolumeChanged)
        self.ui.movingVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onMovingVolumeChanged)
        self.ui.tableComboBox.connect("currentIndexChanged(int)", self.updatePresetList)
        self.ui.fixedModalityComboBox.connect("currentIndexChanged(int)", self.updatePresetList)
        self.ui.movingModalityComboBox.connect("currentIndexChanged(int)", self.updatePresetList)
        self.ui.presetsListWidget.connect("itemChanged(QListWidgetItem*)", self.onPresetToggled)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPollRun)

        self.initializeParameterNode()
        self.updateDependencyStatus()
        self.updatePresetList()

    def cleanup(self) -> None:
        """Stop a running registration and drop observers when the module is closed."""
        if self._run is not None:
            self._run.cancel()
            self._run.cleanup()
            self._run = None
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        """Reconnect the parameter node when the module is shown."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Disconnect the parameter node when another module is shown."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        """Forget the parameter node before the scene closes."""
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Get a fresh parameter node after the scene closed."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Use the module's parameter node; pick the first volumes if none is selected."""
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        """Bind the GUI to a parameter node (widgets with SlicerParameterName follow it)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self.updateButtons()

    def updateButtons(self, caller=None, event=None) -> None:
        """Register is enabled with two different volumes and no run in progress."""
        p = self._parameterNode
        running = self._run is not None
        ready = bool(p and p.fixedVolume and p.movingVolume and p.fixedVolume != p.movingVolume)
        self.ui.registerButton.enabled = ready and not running
        self.ui.cancelButton.enabled = running
        if running:
            self.ui.registerButton.toolTip = _("Registration in progress")
        elif not ready:
            self.ui.registerButton.toolTip = _("Select two different volumes")
        else:
            self.ui.registerButton.toolTip = _("Race the presets and keep the best result")

    def onFixedVolumeChanged(self, node) -> None:
        """Guess the fixed modality when the fixed volume changes (the user may correct it)."""
        if node is not None and self._parameterNode:
            self._parameterNode.fixedModality = self.logic.guessModality(node)

    def onMovingVolumeChanged(self, node) -> None:
        """Guess the moving modality when the moving volume changes (the user may correct it)."""
        if node is not None and self._parameterNode:
            self._parameterNode.movingModality = self.logic.guessModality(node)

    def updatePresetList(self, *unused) -> None:
        """List the chosen table's presets as checkable items (unticked ones are left out)."""
        if not self._parameterNode:
            return
        names = self.logic.tablePresetNames(self._parameterNode.tableName, self._parameterNode.fixedModality,
                                            self._parameterNode.movingModality)
        disabled = set(filter(None, self._parameterNode.disabledPresets.split(",")))
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
        widget = self.ui.presetsListWidget
        off = [widget.item(i).text() for i in range(widget.count) if widget.item(i).checkState() != qt.Qt.Checked]
        self._parameterNode.disabledPresets = ",".join(off)

    def updateDependencyStatus(self) -> None:
        """Say which backends cannot run until their package is installed."""
        missing = self.logic.missingDependencies()
        if missing:
            text = "; ".join(f"{pip} is missing: no {purpose}" for pip, purpose in missing.items())
            self.ui.dependenciesLabel.text = text
        else:
            self.ui.dependenciesLabel.text = _("All Python dependencies are installed.")
        self.ui.installDependenciesButton.enabled = bool(missing)

    def onInstallDependencies(self) -> None:
        """Install the missing packages once, keeping Slicer's numpy and scipy."""
        with slicer.util.tryWithErrorDisplay(_("Failed to install dependencies."), waitCursor=True):
            self.logic.installDependencies()
        self.updateDependencyStatus()

    def onRegisterButton(self) -> None:
        """Start the background registration; progress arrives through the poll timer."""
        with slicer.util.tryWithErrorDisplay(_("Failed to start the registration."), waitCursor=True):
            p = self._parameterNode
            self.ui.resultsTable.setRowCount(0)
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Starting...")
            self._result = None
            self._run = self.logic.start(p.fixedVolume, p.movingVolume, **self.logic.optionsFromParameterNode(p))
            self._pollTimer.start()
        self.updateButtons()

    def onCancelButton(self) -> None:
        """Kill the engine and its workers; nothing is added to the scene."""
        if self._run is not None:
            self.ui.statusLabel.text = _("Cancelling...")
            self._run.cancel()

    def onPollRun(self) -> None:
        """Drain progress events; when the engine ends, bring the result into the scene."""
        run = self._run
        if run is None:
            self._pollTimer.stop()
            return
        for event in run.poll():
            if "fraction" in event:
                self.ui.progressBar.value = int(100 * event["fraction"])
            if event.get("event") in ("start", "finish", "score"):
                self.ui.statusLabel.text = self.logic.describeEvent(event, run)
        if run.isRunning():
            return
        self._pollTimer.stop()
        self._run = None
        with slicer.util.tryWithErrorDisplay(_("Registration failed."), waitCursor=True):
            try:
                self._result = self.logic.finish(run)
            finally:
                run.cleanup()
            self.showResult(self._result)
        self.updateButtons()

    def showResult(self, result) -> None:
        """Fill the results table and highlight the winner."""
        self.ui.progressBar.value = 100
        self.ui.statusLabel.text = result.message
        table = self.ui.resultsTable
        self._fillingResults = True
        try:
            table.setRowCount(len(result.candidates))
            for row, values in enumerate(self.logic.resultRows(result)):
                for column, value in enumerate(values):
                    item = qt.QTableWidgetItem(value)
                    if result.best is not None and result.candidates[row].name == result.best.name:
                        font = item.font()
                        font.setBold(True)
                        item.setFont(font)
                        item.setBackground(qt.QBrush(qt.QColor(200, 240, 200)))
                    table.setItem(row, column, item)
            table.resizeColumnsToContents()
            if result.best is not None:
                table.selectRow(result.candidates.index(result.best))
        finally:
            self._fillingResults = False

    def onResultSelectionChanged(self) -> None:
        """Apply the selected candidate instead of the winner."""
        if self._fillingResults or self._result is None:
            return
        rows = {index.row() for index in self.ui.resultsTable.selectedIndexes()}
        if len(rows) != 1:
            return
        candidate = self._result.candidates[rows.pop()]
        with slicer.util.tryWithErrorDisplay(_("Could not apply this result."), waitCursor=True):
            self.logic.applyCandidate(self._result, candidate.name)
            self.ui.statusLabel.text = _("Using {name}.").format(name=candidate.name)


#
# AutoRegisterLogic
#


@dataclass
class AutoRegisterResult:
    """What a run produced: every candidate (AutoRegisterLib Candidates), the winner, and the output nodes."""

    candidates: list
    best: object
    fixedModality: str
    movingModality: str
    tableName: str
    exitCode: int
    message: str
    fixedVolume: object = None
    movingVolume: object = None
    transformNode: object = None
    outputVolume: object = None
    candidateTransformNodes: dict = field(default_factory=dict)
    createOutputVolume: bool = False
    summary: dict = field(default_factory=dict, repr=False)
    fixedImage: object = field(default=None, repr=False)  # LPS images the engine saw
    movingImage: object = field(default=None, repr=False)

    def candidate(self, name):
        """The candidate called `name`."""
        for c in self.candidates:
            if c.name == name:
                return c
        raise KeyError(name)


class EngineProcess:
    """The `python -m AutoRegisterLib` command in the background: a reader thread feeds a queue
    that the GUI polls; cancel stops the whole process tree; the temporary folder is removed."""

    def __init__(self, args, env, workDir, outDir, context=None):
        """Start the command; `context` keeps what finish() needs (nodes, options)."""
        self.workDir, self.outDir, self.context = workDir, outDir, context or {}
        self.events, self.log = [], []
        self.exitCode = None
        self.cancelled = False
        self._queue = queue.Queue()
        posix = os.name == "posix"
        self.process = subprocess.Popen(
            args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, encoding="utf-8", errors="replace",
            # Its own process group, so cancel reaches the engine and nothing of Slicer's.
            start_new_session=posix,
            creationflags=0 if posix else subprocess.CREATE_NEW_PROCESS_GROUP,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self.process.wait()
        self._queue.put(None)

    def poll(self):
        """Progress events received since the last call (JSON lines); other lines go to the log."""
        new = []
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self.exitCode = self.process.returncode
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict) and "event" in event:
                new.append(event)
                if event["event"] == "done":
                    self.exitCode = event.get("exit_code", self.exitCode)
            elif line.strip():
                self.log.append(line)
                logging.info("AutoRegister engine: %s", line)
        self.events.extend(new)
        return new

    def isRunning(self):
        """True until the engine has exited and all its output has been read."""
        return self._reader.is_alive() or not self._queue.empty()

    def wait(self, progress=None, timeout=None):
        """Block until the engine ends, passing each event to `progress` (console use)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.isRunning():
            for event in self.poll():
                if progress is not None:
                    progress(event)
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError("AutoRegister did not finish in time; it was cancelled")
            time.sleep(0.05)
        for event in self.poll():
            if progress is not None:
                progress(event)
        if self.exitCode is None:
            self.exitCode = self.process.returncode

    def cancel(self, graceSeconds=10.0):
        """Stop the engine and its worker processes: interrupt first (the engine then kills its
        workers and removes its files), kill the whole tree if it does not end in time."""
        if self.process.poll() is not None:
            return
        self.cancelled = True
        try:
            if os.name == "posix":
                os.killpg(self.process.pid, signal.SIGINT)
            else:
                self.process.send_signal(signal.CTRL_BREAK_EVENT)
            self.process.wait(graceSeconds)
        except (subprocess.TimeoutExpired, ProcessLookupError, PermissionError, OSError):
            pass
        if self.process.poll() is None:
            self._killTree()

    def _killTree(self):
        try:
            import psutil

            children = psutil.Process(self.process.pid).children(recursive=True)
        except Exception:  # psutil missing or the process just ended: fall back to the group
            children = []
        for child in children:
            try:
                child.kill()
            except Exception:
                pass
        if os.name == "posix":
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        else:
            subprocess.call(["taskkill", "/F", "/T", "/PID", str(self.process.pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.process.wait()

    def cleanup(self):
        """Remove the temporary folder (inputs, outputs); the run must have ended."""
        if self.process.poll() is None:
            self.cancel()
        shutil.rmtree(self.workDir, ignore_errors=True)


class AutoRegisterLogic(ScriptedLoadableModuleLogic):
    """Runs AutoRegister on volume nodes; usable from the Python console without the GUI:

    result = AutoRegisterLogic().register(fixedNode, movingNode)
    """

    RESULT_COLUMNS = ("Preset", "Backend", "Score", "Coverage", "Folding", "Time (s)", "Status")

    def __init__(self, scene=None) -> None:
        """`scene` defaults to slicer.mrmlScene."""
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        ensureLibraryImportable()

    @property
    def scene(self):
        """The MRML scene outputs are added to."""
        return self._scene if self._scene is not None else slicer.mrmlScene

    def getParameterNode(self):
        """The module's parameter node, wrapped."""
        return AutoRegisterParameterNode(super().getParameterNode())

    # --- choices shown in the GUI ------------------------------------------------------------

    def tableNames(self):
        """Names of every preset table (built-in and the user's)."""
        from AutoRegisterLib import presets

        try:
            return [t.name for t in presets.list_tables()]
        except Exception as exc:  # a broken user table must not break the module
            logging.warning(f"AutoRegister: cannot list preset tables: {exc}")
            return []

    def findTable(self, tableName, fixedModality, movingModality):
        """The table for a name, a JSON file path or a Table; the modality pair's table for "Automatic"."""
        from AutoRegisterLib import presets

        if isinstance(tableName, presets.Table):
            return tableName
        if not tableName or tableName == AUTOMATIC_TABLE:
            return presets.find_table(fixedModality, movingModality)
        if str(tableName).endswith(".json") and os.path.isfile(tableName):
            return presets.load_table(tableName)
        for table in presets.list_tables():
            if table.name == tableName:
                return table
        raise ValueError(f"no preset table named {tableName!r}")

    def tablePresetNames(self, tableName, fixedModality, movingModality):
        """Preset names of a table ([] when it cannot be loaded)."""
        try:
            return [p.name for p in self.findTable(tableName, fixedModality, movingModality).presets]
        except Exception as exc:
            logging.warning(f"AutoRegister: {exc}")
            return []

    def guessModality(self, volumeNode):
        """The library's modality guess for a volume node ('CT' or 'MR')."""
        from AutoRegisterLib import mrml, presets

        try:
            return presets.guess_modality(mrml.image_from_volume_node(volumeNode))
        except Exception:
            return "MR"

    def optionsFromParameterNode(self, p):
        """register()/start() keyword arguments from the GUI's parameter node."""
        return dict(
            fixedModality=p.fixedModality, movingModality=p.movingModality, table=p.tableName,
            disabledPresets=[n for n in p.disabledPresets.split(",") if n],
            scoringWindowVoxels=p.scoringWindowVoxels, jobs=p.jobs or None, timeoutSeconds=p.timeoutSeconds,
            device=p.device, keepAllCandidates=p.keepAllCandidates, createOutputVolume=p.createOutputVolume,
        )

    # --- dependencies -------------------------------------------------------------------------

    def missingDependencies(self):
        """pip name -> what is lost, for each package the engine would import but cannot find."""
        import importlib.util

        missing = {}
        for pip, (module, purpose) in DEPENDENCIES.items():
            if importlib.util.find_spec(module) is None:
                if pip == "itk-elastix" and self.elastixExecutable():
                    continue
                missing[pip] = purpose
        return missing

    def installDependencies(self, packages=None):
        """pip-install the missing packages once, pinning Slicer's numpy and scipy so they are not replaced."""
        packages = list(packages or self.missingDependencies())
        if not packages:
            return []
        import importlib.metadata

        pins = []
        for name in ("numpy", "scipy", "SimpleITK"):
            try:
                pins.append(f"{name}=={importlib.metadata.version(name)}")
            except importlib.metadata.PackageNotFoundError:
                pass
        constraints = tempfile.NamedTemporaryFile("w", suffix="-constraints.txt", delete=False)
        try:
            constraints.write("\n".join(pins) + "\n")
            constraints.close()
            if "torch" in packages:
                packages.remove("torch")
                self._installTorch(constraints.name)
            if packages:
                slicer.util.pip_install(packages + ["--constraint", constraints.name])
        finally:
            os.unlink(constraints.name)
        return packages

    def _installTorch(self, constraintsPath):
        # The PyTorch extension picks the wheel that matches the GPU; plain pip is the fallback.
        try:
            import PyTorchUtils

            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False) is not None:
                return
        except ImportError:
            pass
        slicer.util.pip_install(["torch", "--constraint", constraintsPath])

    # --- tools that Slicer already has ----------------------------------------------------------

    def brainsfitExecutable(self):
        """Path of Slicer's BRAINSFit CLI, or None outside Slicer."""
        try:
            return slicer.modules.brainsfit.path
        except AttributeError:
            return None

    def elastixExecutable(self):
        """Path of SlicerElastix's elastix executable, or None when that extension is not installed."""
        try:
            import Elastix

            elastixLogic = Elastix.ElastixLogic()
            path = os.path.join(elastixLogic.getElastixBinDir(), elastixLogic.elastixFilename)
            return path if os.path.isfile(path) else None
        except Exception:
            return None

    def engineEnvironment(self):
        """Environment of the engine process: Slicer's startup environment plus our library and tools."""
        try:
            env = dict(slicer.util.startupEnvironment())
        except Exception:  # outside the Slicer application
            env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([libraryRoot()] + [p for p in [env.get("PYTHONPATH")] if p])
        env["PYTHONUNBUFFERED"] = "1"
        for name, path in (("AUTOREGISTER_BRAINSFIT", self.brainsfitExecutable()),
                           ("AUTOREGISTER_ELASTIX", self.elastixExecutable())):
            if path:
                env[name] = path
        return env

    def pythonExecutable(self):
        """PythonSlicer inside Slicer (it sets up Slicer's libraries), else this interpreter."""
        return shutil.which("PythonSlicer") or sys.executable

    def temporaryFolder(self):
        """A new folder under Slicer's temporary path (removed when the run ends)."""
        try:
            base = os.path.join(slicer.app.temporaryPath, "AutoRegister")
        except AttributeError:
            base = os.path.join(tempfile.gettempdir(), "AutoRegister")
        os.makedirs(base, exist_ok=True)
        return tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=base)

    # --- running ------------------------------------------------------------------------------

    def start(self, fixedVolume, movingVolume, fixedModality=None, movingModality=None, table=None,
              presets=None, disabledPresets=(), scoringWindowVoxels=None, jobs=None, timeoutSeconds=600,
              device="auto", keepAllCandidates=False, createOutputVolume=False):
        """Write the volumes to a temporary folder and start the engine; returns an EngineProcess."""
        from dataclasses import replace

        from AutoRegisterLib import mrml
        from AutoRegisterLib.image import write_image

        if fixedVolume is None or movingVolume is None:
            raise ValueError(_("Select a fixed and a moving volume."))
        if fixedVolume == movingVolume:
            raise ValueError(_("The fixed and moving volumes must be different."))
        # Fixed as the user sees it; moving in its own coordinates, because our result replaces its parent.
        fixedImage = mrml.image_from_volume_node(fixedVolume, world=True)
        movingImage = mrml.image_from_volume_node(movingVolume)
        fixedModality = fixedModality or self.guessModality(fixedVolume)
        movingModality = movingModality or self.guessModality(movingVolume)
        self._checkPresetNames(presets)
        workDir = self.temporaryFolder()
        try:
            fixedPath = os.path.join(workDir, "fixed.nrrd")
            movingPath = os.path.join(workDir, "moving.nrrd")
            write_image(fixedImage, fixedPath, compress=False)
            write_image(movingImage, movingPath, compress=False)
            outDir = os.path.join(workDir, "out")
            args = [self.pythonExecutable(), "-m", "AutoRegisterLib", fixedPath, movingPath, "--out", outDir,
                    "--fixed-modality", fixedModality, "--moving-modality", movingModality,
                    "--timeout", str(float(timeoutSeconds)), "--device", device,
                    # Every candidate's transform is needed to switch to another row of the results.
                    "--keep-all", "--progress-json"]
            if jobs:
                args += ["--jobs", str(int(jobs))]
            tableObject = None
            if presets:
                args += ["--presets", ",".join(presets) if not isinstance(presets, str) else presets]
            else:
                tableObject = self.findTable(table, fixedModality, movingModality)
                disabled = set(disabledPresets or ())
                if disabled or scoringWindowVoxels:
                    tableObject = tableObject.without(disabled)
                    if not tableObject.presets:
                        raise ValueError(_("Every preset is switched off."))
                    if scoringWindowVoxels:
                        scoring = replace(tableObject.scoring, window_voxels=int(scoringWindowVoxels))
                        tableObject = replace(tableObject, scoring=scoring)
                tablePath = os.path.join(workDir, "table.json")
                with open(tablePath, "w") as f:
                    json.dump(tableObject.to_dict(), f, indent=2)
                args += ["--table", tablePath]
            context = dict(fixedVolume=fixedVolume, movingVolume=movingVolume, fixedImage=fixedImage,
                           movingImage=movingImage, keepAllCandidates=keepAllCandidates,
                           createOutputVolume=createOutputVolume,
                           tableName=tableObject.name if tableObject is not None else "custom")
            logging.info(f"AutoRegister: {' '.join(args)}")
            return EngineProcess(args, self.engineEnvironment(), workDir, outDir, context)
        except BaseException:
            shutil.rmtree(workDir, ignore_errors=True)
            raise

    def _checkPresetNames(self, presets):
        if presets is None or isinstance(presets, str):
            return
        if not all(isinstance(p, str) for p in presets):
            raise TypeError("presets must be preset names")

    def register(self, fixedVolume, movingVolume, progress=None, timeout=None, **options):
        """Register without the GUI: start the engine, wait, and bring the best result into the scene.

        Options are those of start(). Returns an AutoRegisterResult with every candidate;
        result.transformNode is the moving volume's new parent transform.
        """
        run = self.start(fixedVolume, movingVolume, **options)
        try:
            run.wait(progress=progress or self._logProgress, timeout=timeout)
            return self.finish(run)
        finally:
            run.cleanup()

    def _logProgress(self, event):
        if event.get("event") in ("finish", "done"):
            logging.info(f"AutoRegister: {event}")

    def describeEvent(self, event, run):
        """One status line for a progress event."""
        running = {e["candidate"] for e in run.events if e.get("event") == "start"}
        running -= {e["candidate"] for e in run.events if e.get("event") == "finish"}
        if event.get("event") == "finish":
            return _("{name}: {status}. Running: {running}").format(
                name=event["candidate"], status=event.get("status"), running=", ".join(sorted(running)) or "-")
        return _("Running: {running}").format(running=", ".join(sorted(running)) or "-")

    def finish(self, run):
        """Read the engine's result.json and transforms, then create or replace our output nodes."""
        import SimpleITK as sitk  # bundled with Slicer; only used to read the engine's transform files

        from AutoRegisterLib.pipeline import Candidate

        code = run.exitCode
        if run.cancelled:
            raise RuntimeError(_("Registration cancelled; the scene was not changed."))
        resultPath = os.path.join(run.outDir, "result.json")
        if code not in (0, 3) or not os.path.isfile(resultPath):
            message = next((e.get("message") for e in run.events if e.get("event") == "done"), None)
            details = message or "\n".join(run.log[-5:]) or f"exit code {code}"
            raise RuntimeError(_("The registration engine failed: {details}").format(details=details))
        with open(resultPath) as f:
            summary = json.load(f)
        fields = set(Candidate.__dataclass_fields__) - {"transform", "warped", "transform_path"}
        candidates = []
        for entry in summary["candidates"]:
            candidate = Candidate(**{k: v for k, v in entry.items() if k in fields})
            if entry.get("transform"):
                candidate.transform_path = entry["transform"]
                candidate.transform = sitk.ReadTransform(os.path.join(run.outDir, entry["transform"]))
            candidates.append(candidate)
        best = next((c for c in candidates if c.name == summary.get("best")), None)
        ctx = run.context
        result = AutoRegisterResult(
            candidates=candidates, best=best, fixedModality=summary.get("fixed_modality"),
            movingModality=summary.get("moving_modality"), tableName=ctx.get("tableName"), exitCode=code,
            message="", fixedVolume=ctx["fixedVolume"], movingVolume=ctx["movingVolume"],
            createOutputVolume=ctx.get("createOutputVolume", False), summary=summary,
            fixedImage=ctx["fixedImage"], movingImage=ctx["movingImage"])
        if best is None:
            reasons = "; ".join(f"{c.name}: {c.error or c.status}" for c in candidates)
            result.message = _("No preset succeeded ({reasons}).").format(reasons=reasons)
            return result
        self.applyCandidate(result, best.name)
        if ctx.get("keepAllCandidates"):
            self._keepCandidateNodes(result)
        result.message = _("Best: {name} (score {score:.3f}); applied to '{moving}'.").format(
            name=best.name, score=best.score or 0.0, moving=result.movingVolume.GetName())
        return result

    def applyCandidate(self, result, name):
        """Make candidate `name` the moving volume's parent transform (and refill the output volume)."""
        from AutoRegisterLib import mrml
        from AutoRegisterLib.image import resample_to_grid

        candidate = result.candidate(name)
        if candidate.transform is None:
            raise ValueError(_("{name} has no transform ({status}).").format(name=name, status=candidate.status))
        moving, scene = result.movingVolume, self.scene
        previous = mrml.find_output_node(scene, "transform", moving)
        node = mrml.transform_node_from_transform(
            candidate.transform, scene, name=f"{moving.GetName()} AutoRegister ({name})",
            reference=result.fixedImage, node=previous)
        mrml.mark_output_node(node, "transform", moving)
        node.SetAttribute("AutoRegister.Candidate", name)
        moving.SetAndObserveTransformNodeID(node.GetID())
        result.transformNode = node
        if result.createOutputVolume:
            warped = resample_to_grid(result.movingImage, result.fixedImage, candidate.transform)
            volume = mrml.volume_node_from_image(
                warped, scene, name=f"{moving.GetName()} registered", node=mrml.find_output_node(scene, "volume", moving))
            mrml.mark_output_node(volume, "volume", moving)
            result.outputVolume = volume
        return node

    def _keepCandidateNodes(self, result):
        from AutoRegisterLib import mrml

        moving = result.movingVolume
        for candidate in result.candidates:
            if candidate.transform is None:
                continue
            role = f"candidate:{candidate.name}"
            node = mrml.transform_node_from_transform(
                candidate.transform, self.scene, name=f"{moving.GetName()} AutoRegister candidate {candidate.name}",
                reference=result.fixedImage, node=mrml.find_output_node(self.scene, role, moving))
            result.candidateTransformNodes[candidate.name] = mrml.mark_output_node(node, role, moving)

    def resultRows(self, result):
        """Text of the results table, one row per candidate, in RESULT_COLUMNS order."""
        def _number(value, fmt):
            return "" if value is None else format(value, fmt)

        rows = []
        for c in result.candidates:
            status = c.status if not c.error else f"{c.status}: {c.error}"
            rows.append([c.name, c.backend, _number(c.score, ".3f"), _number(c.coverage, ".2f"),
                         _number(c.folding_fraction, ".3f"), _number(c.seconds, ".1f"), status])
        return rows


#
# AutoRegisterTest
#


class AutoRegisterTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: registers two real volumes end to end, from the console API and the button."""

    def setUp(self):
        """Start from an empty scene."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run every test."""
        self.setUp()
        self.test_register_recovers_a_known_rigid_misalignment()
        self.setUp()
        self.test_register_button_runs_in_the_background()

    def _loadCase(self):
        """MRHead as fixed; moving = MRHead moved by a known rigid transform (through the library)."""
        import numpy as np
        import SampleData
        import SimpleITK as sitk

        from AutoRegisterLib import mrml
        from AutoRegisterLib.image import resample_to_grid

        fixed = SampleData.downloadSample("MRHead")
        fixedImage = mrml.image_from_volume_node(fixed)
        centre = fixedImage.physical_points(np.array([[(n - 1) / 2 for n in fixedImage.size]]))[0]
        truth = sitk.Euler3DTransform(tuple(centre), 0.08, -0.05, 0.1, (6.0, -4.0, 5.0))
        moving = mrml.volume_node_from_image(resample_to_grid(fixedImage, fixedImage, truth), slicer.mrmlScene,
                                             "MRHead moved")
        return fixed, moving, fixedImage, truth

    def _meanErrorMm(self, transformNode, fixedImage, truth):
        """Mean distance, over points of the fixed volume, between the node's mapping and the truth."""
        import numpy as np

        from AutoRegisterLib import mrml

        rng = np.random.default_rng(0)
        points = fixedImage.physical_points(rng.uniform(0.2, 0.8, size=(200, 3)) * np.array(fixedImage.size))
        errors = [np.linalg.norm(mrml.LPS_FROM_RAS @ mrml.transform_point_ras(transformNode, mrml.LPS_FROM_RAS @ p)
                                 - np.array(truth.TransformPoint(tuple(p)))) for p in points]
        return float(np.mean(errors))

    def test_register_recovers_a_known_rigid_misalignment(self):
        """Console API: the result's transform node is the moving parent and matches the truth."""
        self.delayDisplay("Registering MRHead to a moved copy")
        fixed, moving, fixedImage, truth = self._loadCase()
        before = moving.GetImageData().GetScalarRange()
        logic = AutoRegisterLogic()
        result = logic.register(fixed, moving, presets=["sitk-rigid", "sitk-affine"], createOutputVolume=True)
        self.assertIsNotNone(result.best)
        self.assertEqual(len(result.candidates), 2)
        self.assertEqual(moving.GetParentTransformNode(), result.transformNode)
        self.assertEqual(moving.GetImageData().GetScalarRange(), before)  # input voxels untouched
        self.assertLess(self._meanErrorMm(result.transformNode, fixedImage, truth), 1.5)
        # Running again replaces our nodes instead of adding more.
        transforms = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLTransformNode")
        again = logic.register(fixed, moving, presets=["sitk-rigid"], createOutputVolume=True)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLTransformNode"), transforms)
        self.assertEqual(again.outputVolume.GetID(), result.outputVolume.GetID())
        self.delayDisplay("Console registration passed")

    def test_register_button_runs_in_the_background(self):
        """GUI: the button starts the engine, Slicer keeps processing events, the table fills."""
        fixed, moving, fixedImage, truth = self._loadCase()
        slicer.util.selectModule("AutoRegister")
        widget = slicer.modules.AutoRegisterWidget
        widget._parameterNode.fixedVolume = fixed
        widget._parameterNode.movingVolume = moving
        widget._parameterNode.tableName = AUTOMATIC_TABLE
        widget.ui.registerButton.click()
        deadline = time.monotonic() + 1800
        while widget._run is not None and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertIsNotNone(widget._result)
        self.assertGreater(widget.ui.resultsTable.rowCount, 0)
        self.assertLess(self._meanErrorMm(widget._result.transformNode, fixedImage, truth), 1.5)
        self.delayDisplay("Register button passed")
