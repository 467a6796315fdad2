"""Headless QGIS for the plugin tests: one QgsApplication, Processing, and a minimal iface."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

PROCESSING_PLUGINS = Path("/usr/share/qgis/python/plugins")

_APP = None


def start_qgis():
    """Start QGIS once per test session (Processing initialised); return the application."""
    global _APP
    if _APP is not None:
        return _APP
    from qgis.core import QgsApplication

    if str(PROCESSING_PLUGINS) not in sys.path and PROCESSING_PLUGINS.is_dir():
        sys.path.append(str(PROCESSING_PLUGINS))
    app = QgsApplication([], True)
    app.initQgis()
    from processing.core.Processing import Processing

    Processing.initialize()
    _APP = app
    return app


class StubIface:
    """The parts of QgisInterface the plugin uses, backed by real widgets (no QGIS GUI here)."""

    def __init__(self) -> None:
        from qgis.gui import QgsMapCanvas, QgsMessageBar
        from qgis.PyQt.QtWidgets import QMainWindow

        self._window = QMainWindow()
        self._window.resize(1400, 900)
        self._canvas = QgsMapCanvas(self._window)
        self._window.setCentralWidget(self._canvas)
        self._bar = QgsMessageBar(self._window)
        self.menus: dict[str, list] = {}
        self.docks: list = []
        self.toolbars: list = []

    def mainWindow(self):  # noqa: N802 (QGIS API)
        return self._window

    def mapCanvas(self):  # noqa: N802
        return self._canvas

    def messageBar(self):  # noqa: N802
        return self._bar

    def addToolBar(self, name: str):  # noqa: N802
        toolbar = self._window.addToolBar(name)
        self.toolbars.append(toolbar)
        return toolbar

    def addPluginToMenu(self, menu: str, action) -> None:  # noqa: N802
        self.menus.setdefault(menu, []).append(action)

    def removePluginMenu(self, menu: str, action) -> None:  # noqa: N802
        if action in self.menus.get(menu, []):
            self.menus[menu].remove(action)

    def addDockWidget(self, area, dock) -> None:  # noqa: N802
        self._window.addDockWidget(area, dock)
        self.docks.append(dock)

    def removeDockWidget(self, dock) -> None:  # noqa: N802
        self._window.removeDockWidget(dock)
        if dock in self.docks:
            self.docks.remove(dock)


def wait_for(condition, timeout: float = 120.0) -> None:
    """Process Qt events until ``condition()`` is true (fails after ``timeout`` seconds)."""
    import time

    from qgis.core import QgsApplication

    end = time.monotonic() + timeout
    while not condition():
        QgsApplication.processEvents()
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s")
        time.sleep(0.02)


def run_algorithm(algorithm: str, parameters: dict, feedback=None) -> dict:
    """``processing.run("kdmsi:ALGORITHM", parameters)`` with the current project."""
    import processing
    from qgis.core import QgsProcessingContext, QgsProcessingFeedback, QgsProject

    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    return processing.run(
        f"kdmsi:{algorithm}",
        parameters,
        context=context,
        feedback=feedback or QgsProcessingFeedback(),
    )


#: Exceptions raised in Qt slots during the tests (PyQt would abort the process otherwise).
SLOT_ERRORS: list[str] = []


def _record_slot_error(kind, value, tb) -> None:
    import traceback

    text = "".join(traceback.format_exception(kind, value, tb))
    SLOT_ERRORS.append(text)
    sys.stderr.write(text)


sys.excepthook = _record_slot_error


def tile_labels(label_path: str, tile: int) -> dict[tuple[int, int], int]:
    """Weak tile labels from the sparse reference: 1 = over 20 changed sample pixels,
    0 = unchanged samples and at most 5 changed pixels; other tiles stay unlabelled."""
    from osgeo import gdal

    data = gdal.Open(label_path).ReadAsArray()
    labels = {}
    for row in range(0, data.shape[0], tile):
        for col in range(0, data.shape[1], tile):
            block = data[row : row + tile, col : col + tile]
            if (block == 1).sum() > 20:
                labels[(row, col)] = 1
            elif (block == 1).sum() <= 5 and (block == 0).sum() > 20:  # a speck is no change
                labels[(row, col)] = 0
    return labels


def make_weak_labels(grid_path: str, label_path: str, out_path: str, tile: int):
    """Fill the grid's ``change`` field from the sparse reference, as an analyst would.

    Returns the labels as a memory layer (not file-backed) and writes them to ``out_path``.
    """
    from qgis.core import QgsFeature, QgsVectorFileWriter, QgsVectorLayer

    labels = tile_labels(label_path, tile)
    grid = QgsVectorLayer(grid_path, "grid", "ogr")
    uri = f"Polygon?crs={grid.crs().authid()}&field=change:integer"
    memory = QgsVectorLayer(uri, "labels", "memory")
    features = []
    for feature in grid.getFeatures():
        value = labels.get((int(feature["row_off"]), int(feature["col_off"])))
        if value is None:
            continue
        new = QgsFeature(memory.fields())
        new.setGeometry(feature.geometry())
        new["change"] = value
        features.append(new)
    memory.dataProvider().addFeatures(features)
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    error = QgsVectorFileWriter.writeAsVectorFormatV3(
        memory, out_path, memory.transformContext(), options
    )
    if error[0] != QgsVectorFileWriter.WriterError.NoError:
        raise RuntimeError(f"could not write {out_path}: {error}")
    return memory
