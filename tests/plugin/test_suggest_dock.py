"""'Tiles to label next' in the dock (headless QGIS): before any training the button makes the
quick preview through its algorithm, then ranks the unlabelled tiles of the labelling grid with
``kdmsi:suggesttiles``; the styled layer lands on top of the result group; "Next tile" zooms to
each tile in rank order, skips the ones labelled meanwhile with "Label tiles" still on, and a
second request replaces the layer. Real data: the Taizhou sample pair (400 x 400 px, 30 m, 49
tiles of 64 px). The run's map after Run all is tested in ``test_dock.py``."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from qgis_env import wait_for

from kdmsi_engine import defaults

TILE = 64
COUNT = 5
#: Tiles the analyst marked before asking (row_off, col_off) -> label.
MARKED = {(0, 0): 1, (128, 192): 1, (256, 64): 0, (336, 336): 0}


def labels_in(path: Path) -> dict[tuple[int, int], object]:
    """The grid's labels as the file holds them (sqlite, not QGIS)."""
    with sqlite3.connect(str(path)) as connection:
        rows = connection.execute("SELECT row_off, col_off, change FROM tiles").fetchall()
    return {(row, col): value for row, col, value in rows}


@pytest.fixture(scope="module")
def scene(plugin, repo_root, tmp_path_factory):
    """The sample pair and its labelling grid (made by the plugin's algorithm) with four tiles
    marked, in the project."""
    from qgis.core import QgsProject, QgsRasterLayer, QgsVectorLayer
    from qgis_env import run_algorithm

    folder = tmp_path_factory.mktemp("suggest_dock")
    sample = folder / "sample"  # a copy: QGIS writes .aux.xml statistics beside the rasters
    sample.mkdir()
    for name in ("taizhou_2000.tif", "taizhou_2003.tif"):
        shutil.copy(repo_root / "resources" / "sample" / name, sample / name)
    grid_path = folder / "grid.gpkg"
    run_algorithm(
        "labellinggrid",
        {
            "BEFORE": str(sample / "taizhou_2000.tif"),
            "AFTER": str(sample / "taizhou_2003.tif"),
            "TILE_SIZE": TILE,
            "OUTPUT": str(grid_path),
        },
    )
    grid = QgsVectorLayer(str(grid_path), "grid", "ogr")
    column = grid.fields().indexFromName("change")
    marks = {
        feature.id(): {column: MARKED[(feature["row_off"], feature["col_off"])]}
        for feature in grid.getFeatures()
        if (feature["row_off"], feature["col_off"]) in MARKED
    }
    assert len(marks) == len(MARKED) and grid.dataProvider().changeAttributeValues(marks)
    assert len(labels_in(grid_path)) == 49
    project = QgsProject.instance()
    before = QgsRasterLayer(str(sample / "taizhou_2000.tif"), "Taizhou 2000", "gdal")
    after = QgsRasterLayer(str(sample / "taizhou_2003.tif"), "Taizhou 2003", "gdal")
    assert before.isValid() and after.isValid() and grid.isValid()
    project.addMapLayers([before, after, grid])
    yield {"before": before, "after": after, "grid": grid, "path": grid_path, "dir": folder}
    plugin.dock.stop_labelling()
    project.removeAllMapLayers()
    project.layerTreeRoot().removeAllChildren()


@pytest.fixture(scope="module")
def dock(plugin, scene, iface):
    dock = plugin.ensure_dock()
    dock.stop_labelling()
    dock.before_combo.setLayer(scene["before"])
    dock.after_combo.setLayer(scene["after"])
    dock.labels_combo.setLayer(scene["grid"])
    dock.field_combo.setField("change")
    dock.tile_spin.setValue(TILE)
    dock.output_widget.setFilePath(str(scene["dir"] / "out"))
    dock.overwrite_check.setChecked(False)
    iface.mainWindow().show()
    canvas = iface.mapCanvas()
    canvas.setDestinationCrs(scene["grid"].crs())
    canvas.setLayers([scene["grid"], scene["after"]])
    canvas.setExtent(scene["grid"].extent())
    yield dock
    dock.suggest_count_spin.setValue(defaults.SUGGEST_COUNT)


def ask(dock, timeout: float = 120.0):
    """Press 'Tiles to label next' and wait for its result."""
    finished: list = []
    dock.jobFinished.connect(finished.append)
    try:
        dock.suggest_button.click()
        assert dock.is_running() and not dock.suggest_button.isEnabled()
        wait_for(lambda: bool(finished), timeout)
    finally:
        dock.jobFinished.disconnect(finished.append)
    return finished[0]


def windows(layer) -> list[tuple[int, int]]:
    """The suggested tiles' windows (row_off, col_off), in rank order."""
    features = sorted(layer.getFeatures(), key=lambda feature: feature["rank"])
    return [(int(f["row_off"]), int(f["col_off"])) for f in features]


def engine_suggestions(preview: Path, labels: Path, tmp_path: Path) -> list[tuple[int, int]]:
    """What the engine itself suggests for the same map and labels (its defaults)."""
    import geopandas as gpd

    from kdmsi_engine.suggest import suggest_tiles

    out = tmp_path / "engine.gpkg"
    suggest_tiles(preview, out, labels=labels, count=COUNT, overwrite=True)
    frame = gpd.read_file(out, layer="suggestions").sort_values("rank")
    return list(zip(frame["row_off"].astype(int), frame["col_off"].astype(int)))


def group_nodes(dock) -> list:
    from qgis.core import QgsProject

    group = QgsProject.instance().layerTreeRoot().findGroup(dock.group_name())
    assert group is not None
    return group.findLayers()


def test_before_training_the_button_makes_the_preview_then_ranks_unlabelled_tiles(
    dock, scene, tmp_path
) -> None:
    out = Path(dock.output_widget.filePath())
    preview = out / "preview" / "cva.tif"
    assert not preview.exists()
    assert dock.suggest_count_spin.value() == defaults.SUGGEST_COUNT
    dock.suggest_count_spin.setValue(COUNT)
    result = ask(dock)
    assert result.success, result.error
    # the preview ran first, through its own algorithm, then the suggestions from it
    assert list(result.outputs) == ["cva", "suggest"]
    assert preview.is_file()
    assert "the quick change preview" in dock.log_view.toPlainText()
    layer = dock.suggestions_layer
    assert layer is not None and layer.isValid() and layer.name() == "Tiles to label next"
    assert Path(layer.source().split("|")[0]) == out / "tiles_to_label_next.gpkg"
    assert layer.featureCount() == COUNT
    ranks = sorted(int(f["rank"]) for f in layer.getFeatures())
    assert ranks == list(range(1, COUNT + 1))
    suggested = windows(layer)
    labels = labels_in(scene["path"])
    assert all(labels[window] is None for window in suggested)  # unlabelled tiles only
    assert not set(suggested) & set(MARKED)
    # the same tiles in the same order as the engine gives for the preview and the grid
    assert suggested == engine_suggestions(preview, scene["path"], tmp_path)
    assert f"{COUNT} tiles to label next" in dock.suggest_label.text()
    assert dock.next_button.isEnabled() and dock.suggest_button.isEnabled()


def test_the_suggestions_are_styled_on_top_of_the_result_group(dock) -> None:
    from qgis.core import QgsProject

    layer = dock.suggestions_layer
    nodes = group_nodes(dock)
    assert nodes[0].layer() is layer and nodes[0].isVisible()
    # the preview made for it is there, switched off: it hides neither the grid nor the image
    previews = [node for node in nodes if node.layer().name().startswith("Quick change preview")]
    assert len(previews) == 2 and not any(node.isVisible() for node in previews)
    # outlined tiles (no fill) with their rank as label, from resources/styles/suggestions.qml
    assert layer.renderer().type() == "singleSymbol"
    symbol = layer.renderer().symbol()
    assert symbol.symbolLayerCount() == 2
    assert all(s.properties()["style"] == "no" for s in symbol.symbolLayers())
    assert symbol.symbolLayer(1).strokeColor().name() == "#ff00c8"
    assert layer.labelsEnabled() and layer.labeling().settings().fieldName == "rank"
    assert QgsProject.instance().mapLayersByName("Tiles to label next") == [layer]


def test_next_zooms_to_each_tile_in_rank_order_and_wraps(dock, iface) -> None:
    canvas = iface.mapCanvas()
    layer = dock.suggestions_layer
    features = sorted(layer.getFeatures(), key=lambda feature: feature["rank"])
    whole = canvas.extent()
    for feature in [*features, features[0]]:  # after the last, round to the first
        dock.next_button.click()
        tile = feature.geometry().boundingBox()
        extent = canvas.extent()
        assert extent.contains(tile), (feature["rank"], extent.toString(), tile.toString())
        # zoomed in on it (the tile and about a neighbour each side), centred on it
        assert min(extent.width(), extent.height()) <= 3.01 * tile.width()
        assert extent.width() * extent.height() < whole.width() * whole.height() / 4
        assert extent.center().distance(tile.center()) < 0.01 * tile.width()
        assert layer.selectedFeatureIds() == [feature.id()]
        assert dock.suggest_label.text().startswith(f"Tile {feature['rank']} of {COUNT}")


def test_a_tile_labelled_meanwhile_is_skipped_with_label_tiles_on(dock, scene, iface) -> None:
    from qgis.core import QgsPointXY
    from qgis.PyQt.QtCore import QPoint, Qt
    from qgis.PyQt.QtTest import QTest

    canvas = iface.mapCanvas()
    layer = dock.suggestions_layer
    suggested = windows(layer)
    assert dock.suggest_label.text().startswith("Tile 1 of")  # where the last test left it
    dock.label_button.click()
    tool = dock.label_tool
    assert tool is not None and canvas.mapTool() is tool
    # the analyst labels rank 2's tile on the map (a right click: unchanged) ...
    canvas.setExtent(scene["grid"].extent())
    canvas.refresh()
    rank2 = sorted(layer.getFeatures(), key=lambda feature: feature["rank"])[1]
    centre = canvas.getCoordinateTransform().transform(
        QgsPointXY(rank2.geometry().boundingBox().center())
    )
    QTest.mouseClick(
        canvas.viewport(),
        Qt.MouseButton.RightButton,
        Qt.KeyboardModifier.NoModifier,
        QPoint(int(centre.x()), int(centre.y())),
    )
    assert labels_in(scene["path"])[suggested[1]] == 0
    # ... so Next goes from rank 1 to rank 3, and the tool stays on
    dock.next_button.click()
    assert dock.suggest_label.text() == f"Tile 3 of {COUNT} ({COUNT - 1} still to label)"
    rank3 = sorted(layer.getFeatures(), key=lambda feature: feature["rank"])[2]
    assert canvas.extent().contains(rank3.geometry().boundingBox())
    assert canvas.mapTool() is tool and dock.label_button.isChecked()
    # every suggested tile labelled: Next says so and stops; a label cleared brings it back
    grid = dock.grid_labels
    fids = [grid.tile_at(f.geometry().centroid().asPoint()) for f in layer.getFeatures()]
    grid.label(fids, 1)
    assert not dock.next_button.isEnabled()
    dock.next_tile()
    assert dock.suggest_label.text().startswith(f"All {COUNT} suggested tiles are labelled")
    dock.undo_button.click()  # takes that step back: rank 2 unchanged, the others clear
    assert dock.next_button.isEnabled()
    dock.next_button.click()  # on from rank 3, past the labelled rank 2 when it wraps
    assert dock.suggest_label.text() == f"Tile 4 of {COUNT} ({COUNT - 1} still to label)"
    assert canvas.mapTool() is tool


def test_a_second_request_replaces_the_layer_and_leaves_out_new_labels(
    dock, scene, iface, tmp_path
) -> None:
    from qgis.core import QgsProject

    old = dock.suggestions_layer
    old_id, old_windows = old.id(), windows(old)
    labelled = labels_in(scene["path"])
    assert labelled[old_windows[1]] == 0  # labelled in the last test
    result = ask(dock)
    assert result.success, result.error
    assert list(result.outputs) == ["suggest"]  # the preview is there: not made again
    new = dock.suggestions_layer
    assert new.id() != old_id and QgsProject.instance().mapLayer(old_id) is None
    path = Path(dock.output_widget.filePath()) / "tiles_to_label_next.gpkg"
    sources = [
        layer
        for layer in QgsProject.instance().mapLayers().values()
        if Path(layer.source().split("|")[0]) == path
    ]
    assert sources == [new]
    assert [n.layer() for n in group_nodes(dock)].count(new) == 1
    assert group_nodes(dock)[0].layer() is new and new.renderer().type() == "singleSymbol"
    suggested = windows(new)
    assert old_windows[1] not in suggested
    assert all(labelled[window] is None for window in suggested)
    preview = Path(dock.output_widget.filePath()) / "preview" / "cva.tif"
    assert suggested == engine_suggestions(preview, scene["path"], tmp_path)
    # Next starts again from rank 1 of the new ranking, the label tool still on
    assert dock.label_tool is not None and iface.mapCanvas().mapTool() is dock.label_tool
    dock.next_button.click()
    assert dock.suggest_label.text().startswith(f"Tile 1 of {len(suggested)}")


def test_removing_the_layer_turns_next_off(dock) -> None:
    from qgis.core import QgsProject

    QgsProject.instance().removeMapLayer(dock.suggestions_layer.id())
    assert dock.suggestions_layer is None and not dock.next_button.isEnabled()
    dock.next_tile()  # nothing to step through: no error
    assert dock.suggest_label.text() == ""
