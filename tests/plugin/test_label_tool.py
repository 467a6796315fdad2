"""'Label tiles' in headless QGIS (offscreen; ``test_desktop.py`` repeats the gestures in the
real desktop under Xvfb): the panel's map tool on a grid made by the plugin's own algorithm
over the real Taizhou pair, the labels read back from the GeoPackage, undo and redo, the counts
and the engine's own rule for "enough to train"."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from qgis_env import wait_for

TILE = 64


def saved(path: Path) -> dict[int, object]:
    """The labels as the file holds them (sqlite, not QGIS)."""
    with sqlite3.connect(str(path)) as connection:
        return dict(connection.execute("SELECT fid, change FROM tiles").fetchall())


@pytest.fixture
def scene(plugin, taizhou, grid_gpkg, tmp_path):
    """The Taizhou crop and a fresh copy of its 3 x 3 labelling grid in the project."""
    from qgis.core import QgsProject, QgsRasterLayer, QgsVectorLayer

    from kdmsi_qgis import layers

    grid_path = tmp_path / "grid.gpkg"
    shutil.copy(grid_gpkg, grid_path)
    project = QgsProject.instance()
    before = QgsRasterLayer(taizhou["before"], "taizhou 2000", "gdal")
    after = QgsRasterLayer(taizhou["after"], "taizhou 2003", "gdal")
    grid = QgsVectorLayer(str(grid_path), "grid", "ogr")
    layers.apply_style(grid, "grid")
    project.addMapLayers([before, after, grid])
    yield {"before": before, "after": after, "grid": grid, "path": grid_path, "dir": tmp_path}
    plugin.dock.stop_labelling()
    project.removeAllMapLayers()
    project.layerTreeRoot().removeAllChildren()


@pytest.fixture
def dock(plugin, scene, iface):
    dock = plugin.ensure_dock()
    dock.before_combo.setLayer(scene["before"])
    dock.after_combo.setLayer(scene["after"])
    dock.tile_spin.setValue(TILE)
    dock.output_widget.setFilePath(str(scene["dir"] / "out"))
    window = iface.mainWindow()
    window.show()
    canvas = iface.mapCanvas()
    canvas.setDestinationCrs(scene["grid"].crs())
    canvas.setLayers([scene["grid"], scene["after"]])
    canvas.setExtent(scene["grid"].extent())
    canvas.refresh()
    return dock


class Mouse:
    """QTest on the canvas. Offscreen Qt has no pointer to move, so a drag's moves are sent as
    mouse events; the desktop test moves the X server's pointer instead."""

    def __init__(self, canvas, grid) -> None:
        self.canvas = canvas
        self.grid = grid

    def at(self, row: int, col: int):
        from qgis.core import QgsPointXY
        from qgis.PyQt.QtCore import QPoint

        for feature in self.grid.getFeatures():
            if (feature["row_off"], feature["col_off"]) == (row * TILE, col * TILE):
                centre = feature.geometry().boundingBox().center()
                point = self.canvas.getCoordinateTransform().transform(QgsPointXY(centre))
                return feature.id(), QPoint(int(point.x()), int(point.y()))
        raise KeyError((row, col))

    def click(self, row: int, col: int, button, modifier=None) -> int:
        from qgis.PyQt.QtCore import Qt
        from qgis.PyQt.QtTest import QTest

        fid, point = self.at(row, col)
        QTest.mouseClick(
            self.canvas.viewport(), button, modifier or Qt.KeyboardModifier.NoModifier, point
        )
        return fid

    def drag(self, cells: list[tuple[int, int]], button) -> list[int]:
        from qgis.PyQt.QtCore import QEvent, Qt
        from qgis.PyQt.QtGui import QMouseEvent
        from qgis.PyQt.QtTest import QTest
        from qgis.PyQt.QtWidgets import QApplication

        viewport = self.canvas.viewport()
        stops = [self.at(row, col) for row, col in cells]
        none = Qt.KeyboardModifier.NoModifier
        QTest.mousePress(viewport, button, none, stops[0][1])
        for _fid, point in stops[1:]:
            move = QMouseEvent(QEvent.Type.MouseMove, point, Qt.MouseButton.NoButton, button, none)
            QApplication.sendEvent(viewport, move)
        QTest.mouseRelease(viewport, button, none, stops[-1][1])
        return [fid for fid, _point in stops]


def test_counts_say_when_training_has_enough() -> None:
    from kdmsi_qgis.contract import D
    from kdmsi_qgis.labeltool import LabelCounts

    assert not LabelCounts(3, 0, 10).ready and "unchanged tile" in LabelCounts(3, 0, 10).advice()
    assert not LabelCounts(0, 2, 10).ready and "changed tile" in LabelCounts(0, 2, 10).advice()
    few = LabelCounts(1, D.MIN_HELD_OUT_UNCHANGED - 1, 5)
    assert few.ready and not few.calibrated and str(D.MIN_HELD_OUT_UNCHANGED) in few.advice()
    enough = LabelCounts(2, D.MIN_HELD_OUT_UNCHANGED, 0)
    assert enough.calibrated and enough.advice().startswith("Enough changed and unchanged")


def test_clicks_and_drags_label_tiles_saved_as_they_go(dock, scene, iface) -> None:
    from qgis.PyQt.QtCore import Qt

    left, right = Qt.MouseButton.LeftButton, Qt.MouseButton.RightButton
    grid, path = scene["grid"], scene["path"]
    dock.labels_combo.setLayer(grid)
    dock.label_button.click()
    assert dock.label_tool is not None and iface.mapCanvas().mapTool() is dock.label_tool
    assert (
        grid.isEditable() and dock.counts_label.text() == "0 changed, 0 unchanged, 9 not labelled"
    )
    mouse = Mouse(iface.mapCanvas(), grid)
    a = mouse.click(0, 0, left)
    assert saved(path)[a] == 1
    b = mouse.click(0, 1, right)
    assert saved(path)[b] == 0
    mouse.click(0, 0, left, Qt.KeyboardModifier.ShiftModifier)
    assert saved(path)[a] is None
    # an L through the grid: down the first column, then along the last row
    ell = mouse.drag([(0, 0), (1, 0), (2, 0), (2, 1), (2, 2)], left)
    labels = saved(path)
    assert [labels[fid] for fid in ell] == [1] * 5
    assert [labels[mouse.at(1, c)[0]] for c in (1, 2)] == [None, None]  # inside the corner
    assert dock.counts_label.text() == "5 changed, 1 unchanged, 3 not labelled"
    assert "Enough to train" in dock.advice_label.text()
    assert "Enough to train" in dock.log_view.toPlainText()  # said once, when it became true
    assert not grid.isModified()  # nothing for QGIS to save or ask about
    # undo takes the whole drag back, in the file too; redo brings it again
    assert dock.undo_button.isEnabled()
    dock.undo_button.click()
    assert [saved(path)[fid] for fid in ell] == [None] * 5
    assert dock.counts_label.text() == "0 changed, 1 unchanged, 8 not labelled"
    grid.undoStack().undo()  # what QGIS's Undo action does
    assert saved(path)[a] == 1
    grid.undoStack().redo()
    assert saved(path)[a] is None
    dock.redo_button.click()  # the drag again, which started on tile a
    assert [saved(path)[fid] for fid in ell] == [1] * 5 and ell[0] == a


def test_the_engine_reads_the_painted_grid_as_the_panel_counts_it(dock, scene, taizhou):
    """Training starts exactly when the panel says so: the engine's own tile labels from the
    saved grid match the panel's counts, and it refuses one kind only."""
    from qgis.PyQt.QtCore import Qt

    from kdmsi_engine.errors import LabelError
    from kdmsi_engine.training.samples import scene_training_set

    grid, path = scene["grid"], scene["path"]
    dock.labels_combo.setLayer(grid)
    dock.label_button.click()
    mouse = Mouse(dock.iface.mapCanvas(), grid)
    mouse.drag([(0, 0), (0, 1), (0, 2)], Qt.MouseButton.LeftButton)
    assert not dock.grid_labels.counts().ready
    with pytest.raises(LabelError, match="changed and unchanged"):
        scene_training_set(taizhou["before"], taizhou["after"], path, tile_size=TILE)
    mouse.drag([(2, 0), (2, 1)], Qt.MouseButton.RightButton)
    counts = dock.grid_labels.counts()
    assert counts.ready
    training = scene_training_set(taizhou["before"], taizhou["after"], path, tile_size=TILE)
    assert (training.num_changed, training.num_unchanged) == (counts.changed, counts.unchanged)


def test_label_tiles_makes_a_grid_when_there_is_none(dock, scene, iface, repo_root) -> None:
    from qgis.core import QgsProject, QgsVectorLayer
    from qgis.PyQt.QtCore import Qt

    # weak labels drawn as polygons are no grid: the panel makes one with the algorithm
    polygons = QgsVectorLayer(
        str(repo_root / "resources" / "sample" / "taizhou_labels.gpkg"), "polygons", "ogr"
    )
    QgsProject.instance().addMapLayer(polygons)
    dock.labels_combo.setLayer(polygons)
    finished: list = []
    dock.jobFinished.connect(finished.append)
    try:
        dock.label_button.click()
        wait_for(lambda: bool(finished), 120)
    finally:
        dock.jobFinished.disconnect(finished.append)
    made = Path(finished[0].outputs["grid"]["OUTPUT"])
    assert made == scene["dir"] / "out" / "labelling_grid.gpkg" and made.is_file()
    grid = dock.grid_labels.layer
    assert Path(grid.source().split("|")[0]) == made
    assert dock.labels_combo.currentLayer().id() == grid.id()
    assert iface.mapCanvas().mapTool() is dock.label_tool
    iface.mapCanvas().setLayers([grid])
    fid = Mouse(iface.mapCanvas(), grid).click(1, 1, Qt.MouseButton.RightButton)
    assert saved(made)[fid] == 0
    # another tool takes the canvas: labelling stops, the labels stay saved
    from qgis.gui import QgsMapToolPan

    pan = QgsMapToolPan(iface.mapCanvas())
    iface.mapCanvas().setMapTool(pan)
    assert dock.label_tool is None and not dock.label_button.isChecked()
    assert not grid.isEditable() and saved(made)[fid] == 0
    # pressed again, it labels the same file: the analyst's labels are never replaced
    dock.labels_combo.setLayer(None)
    dock.label_button.click()
    assert dock.label_tool is not None and dock.grid_labels.layer.id() == grid.id()
    assert saved(made)[fid] == 0
