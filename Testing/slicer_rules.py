"""Slicer's rules for a scripted module, encoded from Slicer's own source so a test fails where Slicer would.

The Slicer application cannot be installed on the machines that test this project, and slicer-core (PyPI)
ships MRML but not `slicer.parameterNodeWrapper`. A stand-in that accepts what Slicer rejects hides bugs:
that is how `connectGui` came to raise inside Slicer while every headless test passed. So this module
re-states, rule by rule, what Slicer 5.8 and 5.10 do, each with the source lines it encodes
(`../shared/reviews/slicer-module.md` has the reading):

- `parameterNodeWrapper` collects `typing.get_type_hints(cls, include_extras=True)` and writes each default
  through its validators when the node is created (Slicer:5.10:Base/Python/slicer/parameterNodeWrapper/
  wrapper.py `_processClass`, `_initMethod`; a value a validator rejects raises there);
- `connectGui(ui)` binds every widget whose `SlicerParameterName` property is set, by its exact class, with
  the first connector whose `canRepresent` accepts (widget, type) and raises when `create` refuses or none
  accepts (wrapper.py `_connectGui` -> `_connectParametersToGui` -> guiConnectors.py `createGuiConnector`);
- the connector table (Slicer:5.8:Base/Python/slicer/parameterNodeWrapper/guiConnectors.py; the QComboBox
  rule is at 5.8:355-368 and 5.10:431): QCheckBox and a checkable QPushButton take bool; QSpinBox and
  QSlider take int (a QSlider only when bounded); QDoubleSpinBox and ctkSliderWidget take float (the slider
  only when bounded); a QComboBox takes an Enum, or int/float/str/bool **only with a `Choice` annotation**
  ("ComboBoxToStringableConnector requires the Choice annotation to be used."), and it is refilled from the
  choices, so a value outside them makes `write` raise ValueError; QLineEdit and QTextEdit take str;
  ctkPathLineEdit and ctkDirectoryButton take a pathlib path; qMRMLNodeComboBox and
  qMRMLSubjectHierarchyTreeView take a MRML node class or a Union of them;
- `WithinRange` on a spin box overrides the .ui's minimum and maximum (guiConnectors.py
  `QSliderOrSpinBoxToIntConnector.__init__`: `setRange(minimum, maximum)`);
- a node parameter holds None or an instance of its class (validators.py `IsInstance` lets None through); a
  `Union` of node classes is written by `UnionSerializer`, whose `_findBestSerializer` offers the value to each
  member whose `canSerialize(type(value))` accepts it, so None is refused with TypeError ("Unable to write
  value") unless the Union lists None, and the wrapper writes the default, None, when the node is made
  (serializers.py `UnionSerializer`, `NodeSerializer`, `NoneSerializer`; util.py `isNodeOrUnionOfNodes`: "Note
  the None is necessary for the parameterNodeWrapper");
- `qMRMLNodeComboBoxToNodeConnector.__init__` sets the combo box's `nodeTypes` from the parameter's type
  (util.py `getNodeTypes`), whatever the .ui says.
- `slicer.util.confirmYesNoDisplay` logs its text and, in testing mode, shows nothing and returns
  `True == qt.QMessageBox.Yes`, which is False, though its docstring promises True; otherwise a modal Yes/No box
  waits for the user (`ConfirmYesNoDisplay` below).

The Slicer source read for these rules: Slicer/Slicer Base/Python/slicer/parameterNodeWrapper/ guiConnectors.py
(0e31bd8), serializers.py, util.py (52586f7) and validators.py (01c2def) as stored by the project's code index.
"""

from __future__ import annotations

import enum
import pathlib
import typing
import xml.etree.ElementTree as ET
from dataclasses import dataclass


@dataclass(frozen=True)
class Choice:
    """validators.Choice: the value must be one of `choices`."""

    choices: tuple

    def __init__(self, choices):
        object.__setattr__(self, "choices", tuple(choices))

    def validate(self, value) -> None:
        """Raise ValueError for a value outside the choices, as Slicer's validator does."""
        if value not in self.choices:
            raise ValueError(f"Value {value!r} must be within {list(self.choices)}")


@dataclass(frozen=True)
class WithinRange:
    """validators.WithinRange: minimum <= value <= maximum."""

    minimum: float
    maximum: float

    def validate(self, value) -> None:
        """Raise ValueError outside the range."""
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"Value {value!r} must be within [{self.minimum}, {self.maximum}]")


@dataclass(frozen=True)
class Default:
    """parameterNodeWrapper.Default: a default given as an annotation."""

    value: object


class UnboundedSliderError(RuntimeError):
    """A QSlider or ctkSliderWidget bound to an unbounded number: Slicer raises RuntimeError."""


def split_annotations(datatype):
    """(bare type, [annotations]) of a possibly `Annotated` type (util.splitAnnotations)."""
    if typing.get_origin(datatype) is typing.Annotated:
        args = typing.get_args(datatype)
        return args[0], list(args[1:])
    return datatype, []


def _is_node_type(datatype) -> bool:
    import vtk

    bare = split_annotations(datatype)[0]
    if typing.get_origin(bare) is typing.Union:
        return all(_is_node_type(a) for a in typing.get_args(bare) if a is not type(None))
    return isinstance(bare, type) and issubclass(bare, vtk.vtkObject) and bare.__name__.startswith("vtkMRML")


def node_types(datatype) -> tuple:
    """The class names a node parameter takes (util.getNodeTypes): one class, or a Union's node classes."""
    bare = split_annotations(datatype)[0]
    members = typing.get_args(bare) if typing.get_origin(bare) is typing.Union else (bare,)
    return tuple(m.__name__ for m in members if m is not type(None))


def _check_node_value(datatype, value) -> None:
    """What the serializers accept for a node parameter (see the module docstring)."""
    bare = split_annotations(datatype)[0]
    if typing.get_origin(bare) is typing.Union:
        members = typing.get_args(bare)
        if value is None:
            if type(None) not in members:
                raise TypeError(f"Unable to write value 'None' of type '{type(None)}'")
            return
        if not any(m is not type(None) and isinstance(value, m) for m in members):
            raise TypeError(f"Value must be of type {node_types(datatype)}, is type '{type(value)}'")
    elif value is not None and not isinstance(value, bare):
        raise TypeError(f"Value must be of type '{bare}', is type '{type(value)}'")


def connector_for(widget_class: str, datatype):
    """The connector Slicer creates for a widget of class `widget_class` bound to `datatype`, or raise
    RuntimeError as `createGuiConnector` does. Returns (connector name, choices or None, range or None)."""
    bare, annotations = split_annotations(datatype)
    choice = next((a for a in annotations if isinstance(a, Choice)), None)
    within = next((a for a in annotations if isinstance(a, WithinRange)), None)
    paths = (pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePath)
    if bare is bool and widget_class in ("QCheckBox", "QPushButton"):
        return widget_class + "ToBool", None, None
    if bare is int and widget_class in ("QSlider", "QSpinBox"):
        if widget_class == "QSlider" and within is None:
            raise UnboundedSliderError("Cannot have a connection to ctkSliderWidget where the float types is unbounded.")
        return "QSliderOrSpinBoxToInt", None, within
    if bare is float and widget_class in ("QDoubleSpinBox", "ctkSliderWidget"):
        if widget_class == "ctkSliderWidget" and within is None:
            raise UnboundedSliderError("Cannot have a connection to ctkSliderWidget where the float types is unbounded.")
        return "QDoubleSpinBoxCtkSliderWidgetToFloat", None, within
    if widget_class == "QComboBox" and bare in (int, float, str, bool):
        if choice is None:
            raise RuntimeError("ComboBoxToStringableConnector requires the Choice annotation to be used.")
        return "QComboBoxToStringable", choice.choices, None
    if widget_class == "QComboBox" and isinstance(bare, type) and issubclass(bare, enum.Enum):
        return "QComboBoxToEnum", tuple(bare), None
    if bare is str and widget_class in ("QLineEdit", "QTextEdit"):
        return widget_class + "ToStr", None, None
    if bare in paths and widget_class in ("ctkPathLineEdit", "ctkDirectoryButton"):
        return widget_class + "ToPath", None, None
    if widget_class in ("qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView") and _is_node_type(datatype):
        return widget_class + "ToNode", None, None
    raise RuntimeError(f"Unable to create GUI connector from datatype '{datatype}' to widget type '{widget_class}'")


def parameter_types(cls) -> dict:
    """name -> possibly annotated type, as `_processClass` collects them."""
    cls = getattr(cls, "rules_class", cls)
    return typing.get_type_hints(cls, include_extras=True)


def defaults(cls) -> dict:
    """name -> default value (class attribute, `Default` annotation, or the type's own default)."""
    values = {}
    cls = getattr(cls, "rules_class", cls)
    for name, datatype in parameter_types(cls).items():
        bare, annotations = split_annotations(datatype)
        if hasattr(cls, name):
            values[name] = getattr(cls, name)
        else:
            given = next((a for a in annotations if isinstance(a, Default)), None)
            values[name] = given.value if given else {bool: False, int: 0, float: 0.0, str: ""}.get(bare)
    return values


def validate(cls, name: str, value) -> None:
    """Run the parameter's validators on `value` (what every write does; the default is written at init)."""
    if _is_node_type(parameter_types(cls)[name]):
        _check_node_value(parameter_types(cls)[name], value)
    for annotation in split_annotations(parameter_types(cls)[name])[1]:
        if hasattr(annotation, "validate"):
            annotation.validate(value)


def ui_widgets(ui_file):
    """(class, name, {property: value}) of every widget in a Qt Designer .ui file."""
    for widget in ET.parse(ui_file).getroot().iter("widget"):
        props = {}
        for prop in widget.findall("property"):
            child = next(iter(prop), None)
            if child is not None and child.tag == "stringlist":
                props[prop.get("name")] = tuple(item.text for item in child.findall("string"))
            else:
                props[prop.get("name")] = None if child is None else child.text
        yield widget.get("class"), widget.get("name"), props


def ui_connections(ui_file):
    """(sender, signal, receiver, slot) of every connection a .ui file makes."""
    for c in ET.parse(ui_file).getroot().iter("connection"):
        yield c.findtext("sender"), c.findtext("signal"), c.findtext("receiver"), c.findtext("slot")


def bound_widgets(ui_file) -> dict:
    """parameter name -> (widget class, widget name, {property: value}) for every widget with SlicerParameterName."""
    return {props["SlicerParameterName"]: (cls, name, props)
            for cls, name, props in ui_widgets(ui_file) if props.get("SlicerParameterName")}


def connect_gui(cls, ui_file) -> dict:
    """What `connectGui(self.ui)` does at setup() and every enter(): unknown names raise ValueError, a
    refused binding raises RuntimeError, and each widget is written the parameter's default value (a
    QComboBox raises ValueError for a value outside its choices). Returns name -> connector info."""
    types_ = parameter_types(cls)
    values = defaults(cls)
    connectors = {}
    for name, (widget_class, _, _props) in bound_widgets(ui_file).items():
        if name not in types_:
            raise ValueError(f"Cannot find a param with the given name: {name}")
        validate(cls, name, values[name])
        connector, choices, _range = connector_for(widget_class, types_[name])
        if choices is not None and values[name] not in choices:
            raise ValueError(f"Unable to find value {values[name]} in choices {list(choices)}")
        connectors[name] = (connector, choices, _range)
    return connectors


def parameter_node_wrapper(cls):
    """A stand-in for `@parameterNodeWrapper` that behaves as Slicer's does where the module can tell:
    defaults are validated when a node is made (`_initMethod`), every write is validated and fires the
    node's ModifiedEvent, and `connectGui(ui)` binds by `connector_for` (raising where Slicer raises),
    writes each value to its widget, refills a Choice combo from its choices, and connects the widget's
    change signal after the module's own slots (guiConnectors.py `_connect`). A value written to the node
    is written back to every bound widget (wrapper.py `_updateGUIFromParameterNode`), before the module's
    observers run, since connectGui observes first."""
    types_ = parameter_types(cls)
    initial = defaults(cls)

    class Wrapped:
        __doc__ = cls.__doc__

        def __init__(self, parameterNode=None):
            object.__setattr__(self, "_values", {})
            object.__setattr__(self, "_observers", {})
            object.__setattr__(self, "_guis", {})
            for name, value in initial.items():
                validate(cls, name, value)
                self._values[name] = value

        def __getattr__(self, name):
            values = object.__getattribute__(self, "_values")
            if name in values:
                return values[name]
            raise AttributeError(name)

        def __setattr__(self, name, value):
            if name not in types_:
                raise AttributeError(f"Cannot find a param with the given name: {name}")
            validate(cls, name, value)
            self._values[name] = value
            self.Modified()

        def Modified(self):
            for callback in list(self._observers.values()):
                callback(self, "ModifiedEvent")

        def AddObserver(self, event, callback, priority=0.0):
            tag = len(self._observers) + 1000 * len(self._guis) + 1
            while tag in self._observers:
                tag += 1
            self._observers[tag] = callback
            return tag

        def RemoveObserver(self, tag):
            self._observers.pop(tag, None)

        def connectGui(self, ui):
            bindings = {}
            for widget in vars(ui).values():
                name = widget.property("SlicerParameterName")
                if not name:
                    continue
                if name not in types_:
                    raise ValueError(f"Cannot find a param with the given name: {name}")
                _, choices, within = connector_for(widget.className, types_[name])
                bindings[name] = (widget, choices, within)
            tag = len(self._guis) + 1
            self._guis[tag] = bindings
            for name, (widget, choices, within) in bindings.items():
                if choices is not None:
                    was = widget.blockSignals(True)
                    widget.clear()
                    widget.addItems([str(c) for c in choices])
                    widget.blockSignals(was)
                if within is not None:
                    widget.setRange(within.minimum, within.maximum)
                if widget.className == "qMRMLNodeComboBox":
                    widget.nodeTypes = node_types(types_[name])
                self._write(widget, choices, self._values[name])
                signal, read = self._reader(widget, choices)
                widget.connect(signal, lambda *args, _n=name, _read=read: self._from_gui(_n, _read()))
            self.AddObserver("ModifiedEvent", lambda caller, event: self._to_gui())
            return tag

        def disconnectGui(self, tag):
            self._guis.pop(tag, None)

        def _from_gui(self, name, value):
            if self._values.get(name) != value:
                setattr(self, name, value)

        def _to_gui(self):
            for bindings in self._guis.values():
                for name, (widget, choices, _) in bindings.items():
                    self._write(widget, choices, self._values[name])

        @staticmethod
        def _write(widget, choices, value):
            if choices is not None:
                if value not in choices:
                    raise ValueError(f"Unable to find value {value} in choices {list(choices)}")
                widget.currentIndex = list(choices).index(value)
            elif widget.className == "qMRMLNodeComboBox":
                widget.setCurrentNode(value)
            elif widget.className == "QCheckBox":
                widget.checked = bool(value)
            else:
                widget.value = value

        @staticmethod
        def _reader(widget, choices):
            if choices is not None:
                return "currentIndexChanged(int)", lambda: choices[widget.currentIndex]
            if widget.className == "qMRMLNodeComboBox":
                return "currentNodeChanged(vtkMRMLNode*)", widget.currentNode
            if widget.className == "QCheckBox":
                return "stateChanged(int)", lambda: widget.checked
            return "valueChanged(int)", lambda: widget.value

    Wrapped.__name__ = Wrapped.__qualname__ = cls.__name__
    Wrapped.__module__ = cls.__module__
    Wrapped.rules_class = cls
    return Wrapped


class ConfirmYesNoDisplay:
    """`slicer.util.confirmYesNoDisplay(text, windowTitle=None, parent=None, **kwargs)` as Slicer runs it
    (Base/Python/slicer/util.py `confirmYesNoDisplay` and `_messageDisplay`; read in the copy slicer-core
    5.13.31053 ships, util.py:3396-3408 and 3424-3455, since the code index holds no 5.8 or 5.10 util.py): the
    text is logged; when `slicer.app.testingEnabled()`, no box is shown and `_messageDisplay` returns its
    testingReturnValue True, which confirmYesNoDisplay compares with qt.QMessageBox.Yes: False; otherwise a
    modal box waits until the user clicks, and the result is whether that was Yes. `answer` is the user's
    click; `questions` holds (windowTitle, text) of every box shown."""

    YES = 0x00004000  # qt.QMessageBox.Yes

    def __init__(self, answer: bool = True, testing: bool = False):
        self.answer, self.testing, self.questions = answer, testing, []

    def __call__(self, text, windowTitle=None, parent=None, **kwargs):
        import logging

        logging.info(text)
        if self.testing:
            testing_return_value = True
            return testing_return_value == self.YES
        self.questions.append((windowTitle, text))
        return bool(self.answer)
