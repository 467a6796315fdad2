"""Screenshot of the KD-MSI dock and the map after a dock run (headless, offscreen rendering).

Usage (from the repository root)::

    QT_QPA_PLATFORM=offscreen .venv/bin/python tests/plugin/screenshot.py \
        [--output resources/screenshots/kdmsi_dock_map.png] [--epochs 2]

Loads the plugin, puts the real Landsat Taizhou pair and weak labels (the labelling grid
filled from the sparse reference samples) in the project, presses the dock's "Labelling grid"
and "Run all" buttons with the dock's defaults and 2 epochs a stage, waits, then renders the
map (after image,
change probability, change polygons) with QgsMapRendererParallelJob and grabs the dock with
QWidget.grab(), side by side in one PNG.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("KDMSI_PYTHON", sys.executable)

from qgis_env import StubIface, make_weak_labels, start_qgis, wait_for  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "landsat-taizhou-nanjing"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output", type=Path, default=REPO / "resources" / "screenshots" / "kdmsi_dock_map.png"
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--tile-size", type=int, default=64)
    parser.add_argument("--backbone", default="auto")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--panel", type=int, default=400, help="map panel size in pixels")
    args = parser.parse_args()
    start_qgis()
    import qgis.utils
    from qgis.core import (
        QgsContrastEnhancement,
        QgsMapRendererParallelJob,
        QgsMapSettings,
        QgsMultiBandColorRenderer,
        QgsProject,
        QgsRasterLayer,
        QgsRasterMinMaxOrigin,
        QgsVectorLayer,
    )
    from qgis.PyQt.QtCore import QSize
    from qgis.PyQt.QtGui import QColor, QImage, QPainter

    iface = StubIface()
    qgis.utils.iface = iface
    from kdmsi_qgis import classFactory

    plugin = classFactory(iface)
    plugin.initGui()
    args.output = args.output.resolve()
    work = Path(tempfile.mkdtemp(prefix="kdmsi-shot-"))
    os.chdir(work)  # the dock shows a relative output folder: no machine path in the picture
    project = QgsProject.instance()
    before = QgsRasterLayer(str(DATA / "A" / "taizhou.tif"), "Taizhou 2000", "gdal")
    after = QgsRasterLayer(str(DATA / "B" / "taizhou.tif"), "Taizhou 2003", "gdal")
    for layer in (before, after):
        # Landsat bands 1,2,3,4,5,7: true colour is 3,2,1
        renderer = QgsMultiBandColorRenderer(layer.dataProvider(), 3, 2, 1)
        layer.setRenderer(renderer)
        layer.setContrastEnhancement(
            QgsContrastEnhancement.ContrastEnhancementAlgorithm.StretchToMinimumMaximum,
            QgsRasterMinMaxOrigin.Limits.CumulativeCut,
        )
    project.addMapLayers([before, after])

    dock = plugin.ensure_dock()
    dock.before_combo.setLayer(before)
    dock.after_combo.setLayer(after)
    dock.output_widget.setFilePath("kdmsi-output")
    dock.python_widget.blockSignals(True)  # KDMSI_PYTHON runs the engine; not in the settings
    dock.python_widget.setFilePath("python3")
    dock.python_widget.blockSignals(False)
    dock.tile_spin.setValue(args.tile_size)
    dock.backbone_combo.setCurrentText(args.backbone)
    dock.weights_combo.setCurrentText(args.weights)
    dock.epochs_spin.setValue(args.epochs)
    dock.detector_epochs_spin.setValue(args.epochs)
    dock.device_combo.setCurrentText("cpu")
    dock.scales_edit.setText("0.5,1")

    def press(button, timeout: float) -> None:
        done: list = []
        dock.jobFinished.connect(done.append)
        button.click()
        wait_for(lambda: bool(done), timeout)
        dock.jobFinished.disconnect(done.append)
        if not done[0].success:
            raise SystemExit(f"{button.text()} failed: {done[0].error}")

    press(dock.grid_button, 120)
    labels_path = str(work / "weak_labels.gpkg")
    make_weak_labels(
        str(work / "kdmsi-output" / "labelling_grid.gpkg"),
        str(DATA / "label" / "taizhou.tif"),
        labels_path,
        args.tile_size,
    )
    labels = QgsVectorLayer(labels_path, "weak labels (analyst)", "ogr")
    from kdmsi_qgis import layers as plugin_layers

    plugin_layers.apply_style(labels, "grid")
    project.addMapLayer(labels)
    dock.labels_combo.setLayer(labels)
    dock.field_combo.setField("change")
    press(dock.run_button, 900)

    group = project.layerTreeRoot().findGroup(dock.group_name())
    results = {node.layer().name(): node.layer() for node in group.findLayers()}
    print("group", group.name(), "holds", sorted(results))
    panels = [
        ("Weak labels (1 red, 0 green)", [labels, after]),
        ("KD-MSI: MSI change probability", [results.get("MSI change probability (KD-MSI)"), after]),
        (
            "Detector: change probability and polygons",
            [results.get("Change polygons"), results.get("Change probability"), after],
        ),
    ]
    images = []
    for title, map_layers in panels:
        settings = QgsMapSettings()
        settings.setLayers([layer for layer in map_layers if layer is not None])
        settings.setDestinationCrs(before.crs())
        settings.setExtent(before.extent())
        settings.setOutputSize(QSize(args.panel, args.panel))
        settings.setBackgroundColor(QColor("white"))
        job = QgsMapRendererParallelJob(settings)
        job.start()
        job.waitForFinished()
        images.append((title, job.renderedImage()))

    # the log's command lines name this machine's folders: keep the other lines
    lines = dock.log_view.toPlainText().splitlines()
    dock.log_view.setPlainText("\n".join(line for line in lines if str(REPO.parent) not in line
                                          and "/tmp" not in line and "$ " not in line))  # fmt: skip
    dock.log_view.verticalScrollBar().setValue(dock.log_view.verticalScrollBar().maximum())
    # the panel's whole body, not the part its scroll area shows on a small offscreen screen
    body = dock.widget().takeWidget()
    body.resize(470, body.sizeHint().height())
    dock_image = body.grab().toImage()
    width = 3 * (args.panel + 10) + dock_image.width() + 20
    height = max(args.panel + 40, dock_image.height()) + 20
    canvas = QImage(width, height, QImage.Format.Format_ARGB32)
    canvas.fill(QColor("#f0f0f0"))
    painter = QPainter(canvas)
    for index, (title, image) in enumerate(images):
        x = 10 + index * (args.panel + 10)
        painter.drawText(x, 25, title)
        painter.drawImage(x, 35, image)
    painter.drawImage(3 * (args.panel + 10) + 10, 10, dock_image)
    painter.end()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(str(args.output))
    print("saved", args.output)
    plugin.unload()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
