"""'Label tiles': mark tiles of a labelling grid as changed or unchanged on the map.

A click marks the tile under the cursor changed (1), a right click unchanged (0), a shift-click
clears it (empty: not labelled), and a drag paints every tile it crosses with the label of the
button that started it. Each gesture is one step on the grid layer's undo stack (so QGIS's Undo
and Redo, and the dock's buttons, take it back and forth) and is written to the GeoPackage at
once: the file always holds what the map shows, and a training started next reads it.

Why not the layer's edit buffer: ``QgsVectorLayer.commitChanges`` empties the undo stack, so
saving after every gesture through the buffer would make undo impossible. A gesture is instead
a :class:`LabelCommand` that writes its values through the data provider, and undoing it writes
the old values back the same way.

:class:`GridLabels` is the model (which tile is where, the labels, their counts);
:class:`TileLabelTool` is the map tool that turns mouse gestures into labels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from qgis.core import (
    NULL,
    QgsGeometry,
    QgsPointXY,
    QgsRectangle,
    QgsSpatialIndex,
    QgsVectorDataProvider,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.gui import QgsMapCanvas, QgsMapMouseEvent, QgsMapTool, QgsRubberBand
from qgis.PyQt import sip
from qgis.PyQt.QtCore import QCoreApplication, QObject, Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor, QKeyEvent
from qgis.PyQt.QtWidgets import QUndoCommand

from kdmsi_qgis.contract import D

logger = logging.getLogger(__name__)

CHANGED = 1
UNCHANGED = 0
#: The value of a tile that is not labelled (an empty field).
CLEAR: int | None = None
#: Fields that make a polygon layer a labelling grid (written by ``kdmsi grid``).
GRID_FIELDS = ("row_off", "col_off")
#: Preview colours of a drag in progress, by label.
PAINT_COLOURS = {CHANGED: "#e31a1c", UNCHANGED: "#33a02c", CLEAR: "#808080"}


def tr(text: str) -> str:
    return QCoreApplication.translate("KdmsiLabelTiles", text)


def is_grid_layer(layer: Any, field: str = D.LABEL_FIELD) -> bool:
    """``layer`` is a polygon layer of the labelling grid with the label field."""
    if not isinstance(layer, QgsVectorLayer) or not layer.isValid():
        return False
    if layer.geometryType() != QgsWkbTypes.GeometryType.PolygonGeometry:
        return False
    names = set(layer.fields().names())
    return field in names and all(name in names for name in GRID_FIELDS)


@dataclass(frozen=True)
class LabelCounts:
    """How many grid tiles carry each label, and whether training can start.

    Training needs at least one changed and one unchanged tile (the engine's
    ``TrainingSet.check_classes``); with :data:`D.MIN_HELD_OUT_UNCHANGED` unchanged tiles or
    more, some are also kept out of training to calibrate the detector's map.
    """

    changed: int
    unchanged: int
    unlabelled: int

    @property
    def ready(self) -> bool:
        return self.changed > 0 and self.unchanged > 0

    @property
    def calibrated(self) -> bool:
        return self.ready and self.unchanged >= D.MIN_HELD_OUT_UNCHANGED

    def summary(self) -> str:
        return tr("{} changed, {} unchanged, {} not labelled").format(
            self.changed, self.unchanged, self.unlabelled
        )

    def advice(self) -> str:
        """What the analyst should do next, in one sentence."""
        if not self.ready:
            missing = []
            if self.changed == 0:
                missing.append(tr("a changed tile (click)"))
            if self.unchanged == 0:
                missing.append(tr("an unchanged tile (right click)"))
            return tr("Training needs both kinds: mark {}.").format(tr(" and ").join(missing))
        if not self.calibrated:
            return tr(
                "Enough to train. Mark {} or more unchanged tiles so that some can be kept out "
                "of training to calibrate the detector's map."
            ).format(D.MIN_HELD_OUT_UNCHANGED)
        return tr("Enough changed and unchanged tiles to train: press Run all (or Train).")


class LabelCommand(QUndoCommand):
    """One gesture: new labels for some tiles, with their old labels for undo."""

    def __init__(self, grid: GridLabels, changes: dict[int, tuple[Any, Any]], text: str) -> None:
        super().__init__(text)
        self.grid = grid
        self.changes = changes

    def redo(self) -> None:
        self.grid.write({fid: new for fid, (_old, new) in self.changes.items()})

    def undo(self) -> None:
        self.grid.write({fid: old for fid, (old, _new) in self.changes.items()})


class GridLabels(QObject):
    """The labels of a labelling-grid layer: tiles by position, label edits with undo.

    Signals:
        countsChanged: the new :class:`LabelCounts` after every change.
    """

    countsChanged = pyqtSignal(object)  # noqa: N815 (Qt naming)

    def __init__(self, layer: QgsVectorLayer, field: str = D.LABEL_FIELD) -> None:
        super().__init__()
        if not is_grid_layer(layer, field):
            raise ValueError(f"{layer.name()} is not a labelling grid with a {field} field")
        self.layer = layer
        self.field = field
        self.field_index = layer.fields().indexFromName(field)
        self.index = QgsSpatialIndex()
        self.boxes: dict[int, QgsRectangle] = {}
        self.values: dict[int, int | None] = {}
        # One wrapper of the layer's stack for our lifetime: the commands pushed through a
        # temporary wrapper die with it on the Python side, and the stack would then call
        # QUndoCommand's empty undo() instead of ours.
        self.stack = layer.undoStack()
        self._commands: list[LabelCommand] = []
        self.reload()
        layer.afterCommitChanges.connect(self.reload)
        layer.afterRollBack.connect(self.reload)
        self.stack.indexChanged.connect(self._keep_clean)

    def can_write(self) -> bool:
        capabilities = self.layer.dataProvider().capabilities()
        return bool(capabilities & QgsVectorDataProvider.Capability.ChangeAttributeValues)

    def reload(self) -> None:
        """Read the tiles and their labels again (after edits made elsewhere)."""
        self.index = QgsSpatialIndex()
        self.boxes.clear()
        self.values.clear()
        for feature in self.layer.getFeatures():
            geometry = feature.geometry()
            if geometry is None or geometry.isEmpty():
                continue
            self.boxes[feature.id()] = geometry.boundingBox()
            self.values[feature.id()] = _label(feature[self.field])
            self.index.addFeature(feature)
        self.countsChanged.emit(self.counts())

    def counts(self) -> LabelCounts:
        values = list(self.values.values())
        changed = sum(1 for v in values if v == CHANGED)
        unchanged = sum(1 for v in values if v == UNCHANGED)
        return LabelCounts(changed, unchanged, len(values) - changed - unchanged)

    # ------------------------------------------------------------------ where tiles are

    def tile_at(self, point: QgsPointXY) -> int | None:
        """The tile under ``point`` (layer coordinates). Where the last row or column of the
        grid overlaps the one before it, the tile whose centre is nearest wins."""
        best: tuple[float, int] | None = None
        for fid in self.index.intersects(QgsRectangle(point, point)):
            box = self.boxes.get(fid)
            if box is None or not box.contains(point):
                continue
            distance = box.center().sqrDist(point)
            if best is None or distance < best[0]:
                best = (distance, fid)
        return best[1] if best is not None else None

    def tiles_along(self, start: QgsPointXY, end: QgsPointXY) -> list[int]:
        """The tiles under the segment ``start``-``end``, in order (a fast drag skips none)."""
        step = self._sampling_step()
        length = start.distance(end)
        count = max(int(length / step), 0) + 1
        found: list[int] = []
        for i in range(count + 1):
            t = i / count
            point = QgsPointXY(
                start.x() + t * (end.x() - start.x()), start.y() + t * (end.y() - start.y())
            )
            fid = self.tile_at(point)
            if fid is not None and fid not in found:
                found.append(fid)
        return found

    def _sampling_step(self) -> float:
        sizes = [min(b.width(), b.height()) for b in list(self.boxes.values())[:50]]
        return max(min(sizes) / 4.0 if sizes else 1.0, 1e-9)

    def tile_geometry(self, fid: int) -> QgsGeometry:
        return QgsGeometry.fromRect(self.boxes[fid])

    # ------------------------------------------------------------------ labelling

    def label(self, fids: list[int], value: int | None) -> int:
        """Give ``value`` to the tiles ``fids`` as one undoable step, written at once.

        Returns:
            the number of tiles whose label changed (0: nothing to do, nothing pushed).
        """
        changes = {
            fid: (self.values.get(fid), value) for fid in fids if self.values.get(fid) != value
        }
        if not changes:
            return 0
        if not self.can_write():
            raise PermissionError(
                tr("{} cannot be changed (read-only file); save the grid as a GeoPackage").format(
                    self.layer.name()
                )
            )
        if not self.layer.isEditable():
            # QGIS's Undo and Redo act on the layer in editing mode
            self.layer.startEditing()
        what = {CHANGED: tr("changed"), UNCHANGED: tr("unchanged"), CLEAR: tr("not labelled")}
        text = tr("Mark {} tile(s) {}").format(len(changes), what[value])
        command = LabelCommand(self, changes, text)
        self._commands = [c for c in self._commands if not sip.isdeleted(c)] + [command]
        self.stack.push(command)
        return len(changes)

    def write(self, values: dict[int, int | None]) -> None:
        """Write labels to the file (used by :class:`LabelCommand`)."""
        attributes = {
            fid: {self.field_index: NULL if value is None else int(value)}
            for fid, value in values.items()
        }
        if not self.layer.dataProvider().changeAttributeValues(attributes):
            errors = "; ".join(self.layer.dataProvider().errors()) or "unknown error"
            logger.warning("could not save tile labels: %s", errors)
            raise OSError(tr("could not save the tile labels: {}").format(errors))
        for fid, value in values.items():
            self.values[fid] = value
            # an open attribute table follows the change
            self.layer.attributeValueChanged.emit(fid, self.field_index, _variant(value))
        self.layer.triggerRepaint()
        self.countsChanged.emit(self.counts())

    def _keep_clean(self, _index: int) -> None:
        """Our steps are saved already: while the stack holds only them, nothing is unsaved
        (QGIS then neither shows the layer as modified nor asks to save it)."""
        if sip.isdeleted(self.stack):  # the stack empties as its layer goes
            return
        stack = self.stack
        ours = all(isinstance(stack.command(i), LabelCommand) for i in range(stack.count()))
        if ours and not stack.isClean():
            stack.setClean()


def _label(value: Any) -> int | None:
    if value is None or value == NULL:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _variant(value: int | None) -> Any:
    return NULL if value is None else int(value)


class TileLabelTool(QgsMapTool):
    """The map tool: click changed, right click unchanged, shift-click clear, drag paints.

    A gesture runs from a button press to its release; the tiles it crosses are previewed in
    the label's colour and written as one step when the button is released. Escape drops the
    gesture in progress.

    Signals:
        labelled: tiles changed by a finished gesture.
        failed: a message when the labels could not be saved.
    """

    labelled = pyqtSignal(int)
    failed = pyqtSignal(str)

    def __init__(self, canvas: QgsMapCanvas, grid: GridLabels) -> None:
        super().__init__(canvas)
        self.grid = grid
        self.setCursor(Qt.CursorShape.CrossCursor)
        self._value: int | None = None
        self._active = False
        self._painted: list[int] = []
        self._last: QgsPointXY | None = None
        self._band: QgsRubberBand | None = None

    @staticmethod
    def value_for(button: Qt.MouseButton, modifiers: Qt.KeyboardModifiers) -> tuple[bool, Any]:
        """``(True, label)`` for a button that labels, ``(False, None)`` for one that does not."""
        if modifiers & Qt.KeyboardModifier.ShiftModifier and button in (
            Qt.MouseButton.LeftButton,
            Qt.MouseButton.RightButton,
        ):
            return True, CLEAR
        if button == Qt.MouseButton.LeftButton:
            return True, CHANGED
        if button == Qt.MouseButton.RightButton:
            return True, UNCHANGED
        return False, None

    def canvasPressEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802 (QGIS API)
        labels, value = self.value_for(event.button(), event.modifiers())
        if not labels or self._active:
            return
        self._active = True
        self._value = value
        self._painted = []
        point = self._layer_point(event)
        self._last = point
        self._paint(self.grid.tiles_along(point, point))

    def canvasMoveEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802
        # the gesture, not event.buttons(): a drag is whatever happens between press and release
        if not self._active or self._last is None:
            return
        point = self._layer_point(event)
        self._paint(self.grid.tiles_along(self._last, point))
        self._last = point

    def canvasReleaseEvent(self, event: QgsMapMouseEvent) -> None:  # noqa: N802
        if not self._active:
            return
        labels, _value = self.value_for(event.button(), Qt.KeyboardModifier.NoModifier)
        if not labels:
            return
        if self._last is not None:
            self._paint(self.grid.tiles_along(self._last, self._layer_point(event)))
        painted, value = list(self._painted), self._value
        self._reset()
        try:
            changed = self.grid.label(painted, value)
        except (OSError, PermissionError) as exc:
            self.failed.emit(str(exc))
            return
        self.labelled.emit(changed)

    def keyPressEvent(self, event: QKeyEvent) -> None:  # noqa: N802
        if event.key() == Qt.Key.Key_Escape and self._active:
            self._reset()
            event.accept()
            return
        event.ignore()

    def deactivate(self) -> None:
        self._reset()
        super().deactivate()

    def _layer_point(self, event: QgsMapMouseEvent) -> QgsPointXY:
        return self.toLayerCoordinates(self.grid.layer, event.mapPoint())

    def _paint(self, fids: list[int]) -> None:
        new = [fid for fid in fids if fid not in self._painted]
        if not new:
            return
        if self._band is None:
            self._band = QgsRubberBand(self.canvas(), QgsWkbTypes.GeometryType.PolygonGeometry)
            # a dashed outline: the tiles of a gesture still in progress
            colour = QColor(PAINT_COLOURS[self._value])
            self._band.setStrokeColor(colour)
            self._band.setLineStyle(Qt.PenStyle.DashLine)
            colour.setAlpha(120)
            self._band.setFillColor(colour)
            self._band.setWidth(3)
        for fid in new:
            self._painted.append(fid)
            self._band.addGeometry(self.grid.tile_geometry(fid), self.grid.layer)

    def _reset(self) -> None:
        self._active = False
        self._value = None
        self._painted = []
        self._last = None
        if self._band is not None:
            self.canvas().scene().removeItem(self._band)
            self._band = None
