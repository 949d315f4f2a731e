"""Just enough of PythonQt's `qt` and of the .ui's widgets to run the module's widget without a display.

Widgets are built from the .ui file by class name, signals are PythonQt-style (`connect("clicked(bool)",
slot)`), slots run in connection order (as Qt does) and `blockSignals` holds them back. Properties behave
as PythonQt exposes them (`widget.enabled = False`). Nothing here decides what Slicer accepts: the parameter
binding rules are in slicer_rules.
"""

from __future__ import annotations

import inspect
import types
import xml.etree.ElementTree as ET


class Qt:
    """The flags and enums the module uses."""

    ItemIsSelectable, ItemIsEditable, ItemIsUserCheckable, ItemIsEnabled = 1, 2, 16, 32
    Unchecked, Checked = 0, 2


class QMessageBox:
    """The standard buttons and icons (their values in Qt's qmessagebox.h)."""

    Ok, Yes, No, Cancel = 0x00000400, 0x00004000, 0x00010000, 0x00400000
    Question = 4


class _Item:
    def __init__(self, text=""):
        self._text, self._flags, self._check = text, Qt.ItemIsSelectable | Qt.ItemIsEnabled, Qt.Unchecked
        self.bold = False

    def text(self):
        return self._text

    def flags(self):
        return self._flags

    def setFlags(self, flags):
        self._flags = flags

    def checkState(self):
        return self._check

    def setCheckState(self, state):
        self._check = state

    def font(self):
        item = self

        class _Font:
            def setBold(self, bold):
                item.bold = bold

        return _Font()

    def setFont(self, font):
        pass

    def setBackground(self, brush):
        pass


class QTimer:
    """A timer the test drives by calling the connected slot itself."""

    def __init__(self):
        self.active, self.slots = False, []

    def setInterval(self, ms):
        self.interval = ms

    def connect(self, signal, slot):
        self.slots.append(slot)

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


def qt_module() -> types.ModuleType:
    """A `qt` module with the classes the module touches."""
    module = types.ModuleType("qt")
    module.Qt = Qt
    module.QListWidgetItem = module.QTableWidgetItem = _Item
    module.QTimer = QTimer
    module.QMessageBox = QMessageBox
    module.QBrush = module.QColor = lambda *args: args
    return module


def _arity(slot, given: int) -> int:
    """PythonQt passes a slot only the signal arguments it takes (`clicked(bool)` -> `onApply(self)`)."""
    try:
        params = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return given
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return given
    return min(given, sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params))


class Widget:
    """A .ui widget: properties from the file, PythonQt-style signals."""

    def __init__(self, class_name, name, props):
        self.className, self.objectName, self._props = class_name, name, props
        self.enabled, self.visible = props.get("enabled") != "false", True
        self.toolTip, self.text = props.get("toolTip") or "", props.get("text") or ""
        self._slots, self._blocked = {}, False

    def property(self, name):
        return self._props.get(name)

    def connect(self, signal, slot):
        self._slots.setdefault(signal, []).append(slot)

    def disconnect(self, signal, slot):
        self._slots.get(signal, []).remove(slot)

    def emit(self, signal, *args):
        if not self._blocked:
            for slot in list(self._slots.get(signal, [])):
                slot(*args[:_arity(slot, len(args))])

    def blockSignals(self, blocked):
        old, self._blocked = self._blocked, blocked
        return old

    def setMRMLScene(self, scene):
        self.scene = scene

    def click(self):
        if self.enabled:
            self.emit("clicked(bool)", False)


class ComboBox(Widget):
    """QComboBox: items and a current index that signals when it changes."""

    def __init__(self, *args):
        super().__init__(*args)
        self.items, self._index = [], -1

    @property
    def currentIndex(self):
        return self._index

    @currentIndex.setter
    def currentIndex(self, index):
        if index != self._index:
            self._index = index
            self.emit("currentIndexChanged(int)", index)

    @property
    def currentText(self):
        return self.items[self._index] if 0 <= self._index < len(self.items) else ""

    @property
    def count(self):
        return len(self.items)

    def clear(self):
        self.items = []
        self.currentIndex = -1

    def addItem(self, text):
        self.items.append(str(text))
        if self._index < 0:
            self.currentIndex = 0

    def addItems(self, texts):
        for text in texts:
            self.addItem(text)

    def findText(self, text):
        return self.items.index(text) if text in self.items else -1

    def itemText(self, index):
        return self.items[index]


class NodeComboBox(Widget):
    """qMRMLNodeComboBox, as Slicer's (Libs/MRML/Widgets/qMRMLNodeComboBox.cxx): it lists the nodes of its scene
    whose class is one of `nodeTypes` (subclasses too unless showChildNodeTypes is false), so setCurrentNode
    selects a node only when it lists it, else nothing (setCurrentNodeID: no index found -> None); without a
    scene the request is kept (RequestedNode) and applied when setMRMLScene gives it one."""

    def __init__(self, *args):
        super().__init__(*args)
        self._node, self._requested, self.scene = None, None, None
        self.nodeTypes = tuple(self._props.get("nodeTypes") or ())
        self.showChildNodeTypes = self._props.get("showChildNodeTypes") != "false"

    def currentNode(self):
        return self._node

    def lists(self, node) -> bool:
        """True when `node` is one of the combo box's entries."""
        if node is None or self.scene is None or not self.scene.IsNodePresent(node):
            return False
        if self.showChildNodeTypes:
            return any(node.IsA(t) for t in self.nodeTypes)
        return node.GetClassName() in self.nodeTypes

    def setCurrentNode(self, node):
        if self.scene is None:
            self._requested = node
            return
        node = node if self.lists(node) else None
        if node is not self._node:
            self._node = node
            self.emit("currentNodeChanged(vtkMRMLNode*)", node)

    def setMRMLScene(self, scene):
        self.scene = scene
        requested, self._requested = self._requested, None
        if requested is not None:
            self.setCurrentNode(requested)


class SegmentSelector(Widget):
    """qMRMLSegmentSelectorWidget, as Slicer's (Libs/MRML/Widgets/qMRMLSegmentSelectorWidget.cxx, 11a2ceb): an
    inner qMRMLNodeComboBox of segmentation nodes (its scene comes from setMRMLScene); a new segmentation fills
    the segment list (segment IDs in the segmentation's order, "None" first when noneEnabled) and keeps the
    current segment silently when the new one has it, or "None" silently when noneEnabled and none was chosen,
    else selects the first segment and signals currentSegmentChanged(QString) (populateSegmentCombobox);
    setCurrentSegmentID selects a listed ID (signalling when the index changes) and ignores one it lacks."""

    NONE = "None"

    def __init__(self, *args):
        super().__init__(*args)
        self.noneEnabled = self._props.get("noneEnabled") == "true"
        self._nodes = NodeComboBox("qMRMLNodeComboBox", f"{self.objectName}.nodes", {"nodeTypes": None})
        self._nodes.nodeTypes = ("vtkMRMLSegmentationNode",)
        self._nodes.connect("currentNodeChanged(vtkMRMLNode*)", self._onNodeChanged)
        self._segmentation, self._ids, self._index, self._current = None, [], -1, ""

    def setMRMLScene(self, scene):
        self.scene = scene
        self._nodes.setMRMLScene(scene)

    def currentNode(self):
        return self._nodes.currentNode()

    def setCurrentNode(self, node):
        self._nodes.setCurrentNode(node)

    def currentSegmentID(self):
        return self._current

    def setCurrentSegmentID(self, segmentID):
        if not segmentID and self.noneEnabled:
            self._select(0)
        elif segmentID in self._ids and self._ids.index(segmentID) != self._index:
            self._select(self._ids.index(segmentID))

    def _onNodeChanged(self, node):
        segmentation = node if node is not None and node.IsA("vtkMRMLSegmentationNode") else None
        self.emit("currentNodeChanged(vtkMRMLNode*)", node)
        if segmentation is not self._segmentation:
            self._segmentation = segmentation
            self._populate()

    def _populate(self):
        self._ids, self._index = [], -1
        content = self._segmentation.GetSegmentation() if self._segmentation is not None else None
        if content is None or content.GetNumberOfSegments() == 0:
            return
        ids = [content.GetNthSegmentID(i) for i in range(content.GetNumberOfSegments())]
        self._ids = ([self.NONE] if self.noneEnabled else []) + ids
        if (self.noneEnabled and not self._current) or (self._current and self._current in ids):
            self._index = self._ids.index(self._current or self.NONE)  # restored with signals blocked
        else:
            self._select(1 if self.noneEnabled else 0)

    def _select(self, index):
        if index == self._index:
            return
        self._index = index
        data = self._ids[index]
        self._current = "" if data == self.NONE else data
        if self._segmentation is not None:
            self.emit("currentSegmentChanged(QString)", self._current)


class CheckBox(Widget):
    """QCheckBox."""

    checked = False


class SpinBox(Widget):
    """QSpinBox with the .ui's range."""

    def __init__(self, *args):
        super().__init__(*args)
        self.minimum, self.maximum = int(self._props.get("minimum") or 0), int(self._props.get("maximum") or 99)
        self.value = int(self._props.get("value") or 0)

    def setRange(self, low, high):
        self.minimum, self.maximum = low, high


class ListWidget(Widget):
    """QListWidget."""

    def __init__(self, *args):
        super().__init__(*args)
        self.items = []

    def clear(self):
        self.items = []

    def addItem(self, item):
        self.items.append(item)

    def item(self, index):
        return self.items[index]

    @property
    def count(self):
        return len(self.items)


class TableWidget(Widget):
    """QTableWidget."""

    def __init__(self, *args):
        super().__init__(*args)
        self.rows, self.selected = {}, []

    @property
    def rowCount(self):
        return len(self.rows)

    def setRowCount(self, count):
        self.rows = {r: self.rows.get(r, {}) for r in range(count)}

    def setColumnCount(self, count):
        self.columns = count

    def setHorizontalHeaderLabels(self, labels):
        self.labels = labels

    def setItem(self, row, column, item):
        self.rows[row][column] = item

    def resizeColumnsToContents(self):
        pass

    def selectRow(self, row):
        self.selected = [row]
        self.emit("itemSelectionChanged()")

    def selectedIndexes(self):
        return [types.SimpleNamespace(row=lambda r=r: r) for r in self.selected]


class ProgressBar(Widget):
    """QProgressBar."""

    value = 0

    def setRange(self, low, high):
        self.range = (low, high)


CLASSES = {"QComboBox": ComboBox, "qMRMLNodeComboBox": NodeComboBox, "QCheckBox": CheckBox,
           "QSpinBox": SpinBox, "QListWidget": ListWidget, "QTableWidget": TableWidget,
           "QProgressBar": ProgressBar, "qMRMLSegmentSelectorWidget": SegmentSelector}


def widgets_from_ui(ui_file) -> types.SimpleNamespace:
    """`slicer.util.childWidgetVariables` of the loaded .ui: one fake per named widget."""
    from slicer_rules import ui_widgets

    return types.SimpleNamespace(**{name: CLASSES.get(cls, Widget)(cls, name, props)
                                    for cls, name, props in ui_widgets(ui_file)})


def root_widget(ui_file, ui) -> Widget:
    """The .ui's top-level qMRMLWidget (`slicer.util.loadUI`): its setMRMLScene emits mrmlSceneChanged, which
    reaches only the widgets of `ui` the .ui's <connections> connect it to, as in Slicer (a qMRML widget
    without that connection never gets a scene, and lists no node)."""
    from slicer_rules import ui_connections

    root = Widget("qMRMLWidget", ET.parse(ui_file).getroot().find("widget").get("name"), {})
    for sender, signal, receiver, slot in ui_connections(ui_file):
        if sender == root.objectName and slot == "setMRMLScene(vtkMRMLScene*)":
            root.connect(signal, getattr(ui, receiver).setMRMLScene)

    def set_scene(scene, _root=root):
        _root.scene = scene
        _root.emit("mrmlSceneChanged(vtkMRMLScene*)", scene)

    root.setMRMLScene = set_scene
    return root
