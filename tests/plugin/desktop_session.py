"""A session in the real QGIS desktop: what an analyst does with "Label tiles", by mouse.

QGIS runs this file at start-up (``qgis --code desktop_session.py``, started by
:mod:`desktop` under Xvfb, with the plugin installed from its zip in a fresh profile). It opens
the sample scene, opens the KD-MSI panel, presses "Label tiles" (no grid yet: the panel makes
one with the "Create labelling grid" algorithm), then clicks, right-clicks, shift-clicks and
drags on the map canvas with QTest, reading the GeoPackage back with sqlite3 after each
gesture, and takes the last gesture back and forth with QGIS's own Undo and Redo actions. Then
it asks for the tiles to label next and steps through them with "Next tile". It
saves screenshots of the tool in use and writes what it saw to a JSON file; the test asserts
on that file. Settings come from the environment (``KDMSI_DESKTOP_*``).
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sqlite3
import time
import traceback
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsApplication,
    QgsContrastEnhancement,
    QgsMultiBandColorRenderer,
    QgsProject,
    QgsRasterLayer,
    QgsRasterMinMaxOrigin,
    QgsRectangle,
)
from qgis.PyQt.QtCore import QPoint, Qt, QTimer
from qgis.PyQt.QtTest import QTest
from qgis.PyQt.QtWidgets import QAction, QDockWidget
from qgis.utils import iface, plugins

SAMPLE = Path(os.environ["KDMSI_DESKTOP_SAMPLE"])
OUT = Path(os.environ["KDMSI_DESKTOP_OUT"])
SHOTS = Path(os.environ.get("KDMSI_DESKTOP_SHOTS") or OUT / "screenshots")
RESULT = OUT / "session.json"
#: Relative, so that no machine path shows in the screenshots (QGIS runs in OUT).
OUTPUT_FOLDER = "kdmsi-output"
TILE = 64


def wait_for(condition, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        QgsApplication.processEvents()
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout} s")
        time.sleep(0.02)


def pause(seconds: float = 0.15) -> None:
    QTest.qWait(int(seconds * 1000))


def landsat(path: Path, name: str) -> QgsRasterLayer:
    layer = QgsRasterLayer(str(path), name, "gdal")
    # Landsat bands 1, 2, 3, 4, 5, 7: true colour is 3, 2, 1
    layer.setRenderer(QgsMultiBandColorRenderer(layer.dataProvider(), 3, 2, 1))
    layer.setContrastEnhancement(
        QgsContrastEnhancement.ContrastEnhancementAlgorithm.StretchToMinimumMaximum,
        QgsRasterMinMaxOrigin.Limits.CumulativeCut,
    )
    return layer


def saved_labels(grid_path: Path) -> dict[int, Any]:
    """The labels as the file holds them (read by sqlite, not through QGIS)."""
    with sqlite3.connect(str(grid_path)) as connection:
        rows = connection.execute("SELECT fid, change FROM tiles").fetchall()
    return {int(fid): change for fid, change in rows}


class Session:
    def __init__(self) -> None:
        self.result: dict[str, Any] = {"steps": {}}
        self.dock: Any = None
        self.canvas = iface.mapCanvas()

    # -------------------------------------------------------------- set-up

    def open_scene(self) -> None:
        window = iface.mainWindow()
        window.resize(1500, 950)
        window.showNormal()
        for dock in window.findChildren(QDockWidget):
            # the browser lists this machine's folders: not in the screenshots
            if dock.objectName() not in ("Layers", "KdmsiDock") and dock.isVisible():
                dock.hide()
        project = QgsProject.instance()
        after = landsat(SAMPLE / "taizhou_2003.tif", "Taizhou 2003")
        before = landsat(SAMPLE / "taizhou_2000.tif", "Taizhou 2000")
        project.addMapLayers([after, before])
        pause(0.5)
        plugins["kdmsi_qgis"].show_dock()
        self.dock = plugins["kdmsi_qgis"].dock
        dock = self.dock
        window.resizeDocks([dock], [480], Qt.Orientation.Horizontal)
        self.result["pair"] = [
            dock.before_combo.currentLayer().name(),
            dock.after_combo.currentLayer().name(),
        ]
        self.result["tile_size"] = dock.tile_spin.value()
        self.result["backbone"] = dock.backbone_combo.currentText()
        dock.python_widget.setFilePath("python3")  # KDMSI_PYTHON runs the engine here
        dock.output_widget.setFilePath(OUTPUT_FOLDER)

    def start_labelling(self) -> None:
        dock = self.dock
        QTest.mouseClick(dock.label_button, Qt.MouseButton.LeftButton)
        wait_for(lambda: dock.label_tool is not None or dock.last_result is not None, 120)
        if dock.label_tool is None:
            raise RuntimeError(f"no labelling tool: {dock.last_result.error}")
        self.grid = dock.grid_labels
        self.grid_path = Path(self.grid.layer.source().split("|", 1)[0]).resolve()
        self.result["grid"] = {
            "made_by": dock.last_result.outputs.get("grid", {}).get("OUTPUT"),
            "name": self.grid.layer.name(),
            "tiles": len(self.grid.boxes),
            "active_tool": self.canvas.mapTool() is dock.label_tool,
            "active_layer": iface.activeLayer() is self.grid.layer,
            "editable": self.grid.layer.isEditable(),
        }
        self.result["messages_after_grid"] = [i.text() for i in iface.messageBar().items()]
        self.canvas.setExtent(self.grid.layer.extent())
        self.canvas.refresh()
        wait_for(lambda: not self.canvas.isDrawing(), 30)
        pause(0.3)

    # -------------------------------------------------------------- gestures

    def tile(self, row: int, col: int) -> int:
        """The tile at grid position (row, col) of the 64 px tiles."""
        layer = self.grid.layer
        for feature in layer.getFeatures():
            if (feature["row_off"], feature["col_off"]) == (row * TILE, col * TILE):
                return feature.id()
        raise KeyError((row, col))

    def pixel(self, fid: int, dx: float = 0.0, dy: float = 0.0) -> QPoint:
        box = self.grid.boxes[fid]
        x = box.center().x() + dx * box.width()
        y = box.center().y() + dy * box.height()
        from qgis.core import QgsPointXY

        point = self.canvas.getCoordinateTransform().transform(QgsPointXY(x, y))
        return QPoint(int(round(point.x())), int(round(point.y())))

    def click(self, fid: int, button: Qt.MouseButton, modifier=Qt.KeyboardModifier.NoModifier):
        QTest.mouseClick(self.canvas.viewport(), button, modifier, self.pixel(fid))
        pause()

    def drag_closeup(self) -> None:
        """Zoomed in, a drag in progress over tiles not labelled yet (its dashed preview)."""
        values = saved_labels(self.grid_path)
        for row in (3, 2, 4, 1):  # a middle row, so the image fills the view
            path = [self.tile(row, col) for col in range(1, 4)]
            if all(values[fid] is None for fid in path):
                break
        extent = QgsRectangle(self.grid.boxes[path[0]])
        for fid in path[1:]:
            extent.combineExtentWith(self.grid.boxes[fid])
        self.canvas.setExtent(extent.buffered(extent.height() * 0.8))
        view = self.canvas.extent()  # widened to the canvas's shape
        whole = self.grid.layer.extent()
        # moved inside the image, so that no blank shows around it
        dx = max(whole.xMinimum() - view.xMinimum(), 0) - max(view.xMaximum() - whole.xMaximum(), 0)
        dy = max(whole.yMinimum() - view.yMinimum(), 0) - max(view.yMaximum() - whole.yMaximum(), 0)
        view = QgsRectangle(
            view.xMinimum() + dx, view.yMinimum() + dy, view.xMaximum() + dx, view.yMaximum() + dy
        )
        self.canvas.setExtent(view)
        self.canvas.refresh()
        wait_for(lambda: not self.canvas.isDrawing(), 30)
        self.drag(path, Qt.MouseButton.LeftButton, shot="label_tiles_drag.png")
        self.result["closeup"] = path
        self.canvas.setExtent(self.grid.layer.extent())

    def drag(self, path: list[int], button: Qt.MouseButton, shot: str = "") -> None:
        """Press on the first tile, move the pointer through the others, release on the last
        (QTest moves the real pointer of the X server: the canvas gets motion events)."""
        viewport = self.canvas.viewport()
        QTest.mousePress(viewport, button, Qt.KeyboardModifier.NoModifier, self.pixel(path[0]))
        pause()
        for fid in path[1:]:
            QTest.mouseMove(viewport, self.pixel(fid))
            pause()
        if shot:
            self.screenshot(shot, self.canvas)
        QTest.mouseRelease(viewport, button, Qt.KeyboardModifier.NoModifier, self.pixel(path[-1]))
        pause()

    def record(self, name: str, fids: list[int]) -> None:
        labels = saved_labels(self.grid_path)
        self.result["steps"][name] = {
            "tiles": {str(fid): labels[fid] for fid in fids},
            "labelled": sum(1 for value in labels.values() if value is not None),
            "counts": self.dock.counts_label.text(),
            "modified": self.grid.layer.isModified(),
        }

    def gestures(self) -> None:
        a, b = self.tile(1, 1), self.tile(1, 2)
        self.click(a, Qt.MouseButton.LeftButton)
        self.record("click", [a])
        self.click(b, Qt.MouseButton.RightButton)
        self.record("right_click", [b])
        self.click(a, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.ShiftModifier)
        self.record("shift_click", [a])
        # an L: down column 3 from row 0 to row 2, then along row 2 to column 5
        ell = [self.tile(0, 3), self.tile(1, 3), self.tile(2, 3), self.tile(2, 4), self.tile(2, 5)]
        corner = [self.tile(0, 4), self.tile(0, 5), self.tile(1, 4), self.tile(1, 5)]
        self.drag(ell, Qt.MouseButton.LeftButton)
        self.record("drag", ell + corner)
        row = [self.tile(4, col) for col in range(0, 4)]
        self.drag(row, Qt.MouseButton.RightButton)
        self.record("right_drag", row)
        self.result["steps"]["right_drag"]["all"] = {
            str(k): v for k, v in saved_labels(self.grid_path).items()
        }
        window = iface.mainWindow()
        undo = window.findChild(QAction, "mActionUndo")
        redo = window.findChild(QAction, "mActionRedo")
        self.result["undo_enabled"] = bool(undo is not None and undo.isEnabled())
        undo.trigger()
        pause()
        self.record("undo", row)
        undo.trigger()
        pause()
        self.record("undo_twice", ell)
        redo.trigger()
        redo.trigger()
        pause()
        self.record("redo", ell + row)

    # -------------------------------------------------------------- tiles to label next

    def tiles_to_label_next(self) -> None:
        """Press "Tiles to label next" (no map yet: the quick preview is made first), see the
        ranked tiles, mark rank 2's tile by mouse, then step with Next: rank 1, then rank 3."""
        dock = self.dock
        done: list = []
        dock.jobFinished.connect(done.append)
        QTest.mouseClick(dock.suggest_button, Qt.MouseButton.LeftButton)
        wait_for(lambda: bool(done), 120)
        dock.jobFinished.disconnect(done.append)
        layer = dock.suggestions_layer
        ranked = sorted(layer.getFeatures(), key=lambda f: f["rank"]) if layer is not None else []
        group = QgsProject.instance().layerTreeRoot().findGroup(dock.group_name())
        info: dict[str, Any] = {
            "success": done[0].success,
            "error": done[0].error,
            "steps": list(done[0].outputs),
            "requested": dock.suggest_count_spin.value(),
            "windows": [[int(f["row_off"]), int(f["col_off"])] for f in ranked],
            "top_of_group": group is not None and group.findLayers()[0].layer() is layer,
            "text": dock.suggest_label.text(),
        }
        self.result["suggest"] = info
        values = saved_labels(self.grid_path)
        by_window = {
            (int(f["row_off"]), int(f["col_off"])): values[f.id()]
            for f in self.grid.layer.getFeatures()
        }
        info["labels_of_suggested"] = [by_window.get(tuple(w), "missing") for w in info["windows"]]
        if len(ranked) < 3:
            return
        # the engine's command lines name this machine's folders: not in the screenshot
        lines = dock.log_view.toPlainText().splitlines()
        dock.log_view.setPlainText("\n".join(line for line in lines if "$ " not in line))
        self.canvas.setExtent(self.grid.layer.extent())
        self.screenshot("tiles_to_label_next.png")
        boxes = [f.geometry().boundingBox() for f in ranked]
        second = self.grid.tile_at(boxes[1].center())
        self.click(second, Qt.MouseButton.RightButton)
        info["second_label"] = saved_labels(self.grid_path)[second]
        for name, rank in (("next_1", 0), ("next_2", 2)):
            QTest.mouseClick(dock.next_button, Qt.MouseButton.LeftButton)
            pause(0.3)
            info[name] = {
                "text": dock.suggest_label.text(),
                "contains": self.canvas.extent().contains(boxes[rank]),
                "tiles_wide": min(self.canvas.extent().width(), self.canvas.extent().height())
                / boxes[rank].width(),
                "label_tool": self.canvas.mapTool() is dock.label_tool,
            }

    # -------------------------------------------------------------- screenshots

    def label_like_an_analyst(self) -> None:
        """Mark tiles by what the sample reference shows (as an analyst would by eye)."""
        from osgeo import gdal

        truth = gdal.Open(str(SAMPLE / "taizhou_truth.tif")).ReadAsArray()
        changed, unchanged = [], []
        for feature in self.grid.layer.getFeatures():
            if feature["change"] is not None and str(feature["change"]) != "NULL":
                continue
            row, col = int(feature["row_off"]), int(feature["col_off"])
            block = truth[row : row + TILE, col : col + TILE]
            if (block == 1).sum() > 40:
                changed.append(feature.id())
            elif (block == 1).sum() == 0 and (block == 0).sum() > 40:
                unchanged.append(feature.id())
        for fid in changed[:6]:
            self.click(fid, Qt.MouseButton.LeftButton)
        for fid in unchanged[:5]:
            self.click(fid, Qt.MouseButton.RightButton)
        self.result["analyst"] = {"changed": len(changed[:6]), "unchanged": len(unchanged[:5])}

    def screenshot(self, name: str, widget: Any = None) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.canvas.refresh()
        wait_for(lambda: not self.canvas.isDrawing(), 30)
        pause(0.3)
        texts = _visible_texts(iface.mainWindow())
        leaks = [t for t in texts if "/" in t and any(p in t for p in _MACHINE_PATHS)]
        self.result.setdefault("path_leaks", []).extend(leaks)
        image = (widget or iface.mainWindow()).grab()
        image.save(str(SHOTS / name))
        self.result.setdefault("screenshots", []).append(name)

    def run(self) -> None:
        self.result["stage"] = "open"
        self.open_scene()
        self.result["stage"] = "labelling"
        self.start_labelling()
        self.dock.log_view.clear()  # the engine's command lines name this machine's folders
        self.result["stage"] = "gestures"
        self.gestures()
        self.result["stage"] = "screenshots"
        self.label_like_an_analyst()
        self.drag_closeup()
        self.screenshot("label_tiles.png")
        self.result["advice"] = self.dock.advice_label.text()
        self.result["stage"] = "tiles to label next"
        self.tiles_to_label_next()
        bar = iface.messageBar()
        self.result["messages"] = [item.text() for item in bar.items()]
        self.result["final_counts"] = self.dock.counts_label.text()


_MACHINE_PATHS = ("/work", "/root", "/tmp", "/home", str(OUT))


def _visible_texts(window: Any) -> list[str]:
    """The text of every visible line edit, label, combo box and text box."""
    from qgis.PyQt.QtWidgets import QComboBox, QLabel, QLineEdit, QPlainTextEdit

    texts = []
    for kind, read in (
        (QLineEdit, lambda w: w.text()),
        (QLabel, lambda w: w.text()),
        (QComboBox, lambda w: w.currentText()),
        (QPlainTextEdit, lambda w: w.toPlainText()),
    ):
        for widget in window.findChildren(kind):
            if widget.isVisible():
                texts.append(read(widget))
    return texts


#: Seconds after which the session gives up (a dialog waiting for an answer, a hang).
WATCHDOG_S = float(os.environ.get("KDMSI_DESKTOP_WATCHDOG", "150"))


def finish(session: Session, code: int) -> None:
    RESULT.write_text(json.dumps(session.result, indent=1, default=str), encoding="utf-8")
    # close the project while the window is there, as QGIS's own exit does (File > Exit closes
    # it first): cleared from QGIS's destructor, a layer removed can make the layer tree move
    # its current layer and QGIS 3.22 then calls into its styling panel, already deleted
    QgsProject.instance().clear()
    QgsApplication.exit(code)


def watchdog(session: Session) -> None:
    """Timers still fire under a modal dialog: say what is on the screen, then stop."""
    from qgis.PyQt.QtWidgets import QApplication

    windows = [
        f"{type(w).__name__}: {w.windowTitle()}"
        for w in QApplication.topLevelWidgets()
        if w.isVisible() and w is not iface.mainWindow()
    ]
    session.result["error"] = f"watchdog after {WATCHDOG_S:.0f} s; open windows: {windows}"
    finish(session, 2)


def main() -> None:
    session = Session()
    timer = QTimer()
    timer.setSingleShot(True)
    timer.timeout.connect(lambda: watchdog(session))
    timer.start(int(WATCHDOG_S * 1000))
    code = 0
    try:
        session.run()
    except Exception:  # the test reads the traceback from the result file
        session.result["error"] = traceback.format_exc()
        code = 1
    timer.stop()
    finish(session, code)


# the launcher asks for every thread's stack (SIGUSR1) before it kills a session that hangs
STACKS = (OUT / "stacks.txt").open("w")
faulthandler.register(signal.SIGUSR1, file=STACKS, all_threads=True)
QTimer.singleShot(500, main)
