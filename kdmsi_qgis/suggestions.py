"""Tiles to label next, in the dock: which map to ask, the suggestions layer, and "Next".

The ranking is the engine's (``kdmsi suggest``, run through the ``kdmsi:suggesttiles``
algorithm); this module is what the dock does around it: choose the best change map of the
output folder (:func:`change_map`), put the ranked tiles on the map in place of the previous
ones (:func:`show_suggestions`), and step through them in rank order (:class:`SuggestionSteps`,
:func:`zoom_to`), skipping the tiles the analyst has labelled since (:func:`is_labelled`, the
engine's touching rule on the current labels).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qgis.core import (
    NULL,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeatureRequest,
    QgsGeometry,
    QgsProject,
    QgsVectorLayer,
    QgsWkbTypes,
)
from qgis.PyQt.QtCore import QCoreApplication

from kdmsi_qgis import layers
from kdmsi_qgis.contract import D

logger = logging.getLogger(__name__)

#: The suggestions GeoPackage, in the dock's output folder (replaced by every new request).
SUGGEST_FILE = "tiles_to_label_next.gpkg"
#: Its layer in the project, and its style in ``resources/styles``.
LAYER_NAME = "Tiles to label next"
STYLE_FILE = "suggestions.qml"
#: Folders of the dock's output folder whose change map a suggestion can start from.
CHANGE_MAP_FOLDERS = ("run", "detection")
#: Next shows the tile this many tile widths wide: the tile and a neighbour on each side.
ZOOM_TILES = 3.0
#: The engine's ``data.labels.AREA_EPSILON``: a polygon overlapping a tile by less than this
#: share of its area only touches its edge (a neighbouring grid cell), so does not label it.
AREA_EPSILON = 1e-9


def tr(text: str) -> str:
    return QCoreApplication.translate("KdmsiSuggestions", text)


@dataclass(frozen=True)
class ChangeMap:
    """The map suggestions start from.

    Attributes:
        path: the probability raster.
        what: what it is, in words for the log (``the run's change map``).
    """

    path: Path
    what: str


def change_map(folder: Path, preview: Path) -> ChangeMap | None:
    """The best change map of the dock's output folder, ``None`` when there is none yet.

    A trained chain's map first: the newest ``change_probability.tif`` of ``run/`` (Run all;
    the engine reads the run's own threshold from the ``run.json`` beside it) or of
    ``detection/`` (Train, then Detect). Before any training, the quick preview ``preview``.
    """
    trained = [folder / sub / D.PROBABILITY_NAME for sub in CHANGE_MAP_FOLDERS]
    found = [path for path in trained if path.is_file()]
    if found:
        newest = max(found, key=lambda path: path.stat().st_mtime)
        words = {
            "run": tr("the change map of Run all"),
            "detection": tr("the change map of Detect"),
        }
        return ChangeMap(newest, words[newest.parent.name])
    if preview.is_file():
        return ChangeMap(preview, tr("the quick change preview (no training yet)"))
    return None


@dataclass(frozen=True)
class Suggestion:
    """One suggested tile.

    Attributes:
        fid: its feature id in the suggestions layer.
        rank: 1 = label first.
        geometry: its footprint, in the suggestions layer's CRS.
    """

    fid: int
    rank: int
    geometry: QgsGeometry


def read_suggestions(layer: QgsVectorLayer) -> list[Suggestion]:
    """The tiles of a suggestions layer, in rank order."""
    found = [
        Suggestion(feature.id(), int(feature["rank"]), QgsGeometry(feature.geometry()))
        for feature in layer.getFeatures()
        if feature.hasGeometry()
    ]
    return sorted(found, key=lambda suggestion: suggestion.rank)


def source_path(layer: Any) -> Path | None:
    """The file behind a layer (without ``|layername=...``), resolved; ``None`` if none."""
    try:
        text = layer.source().split("|", 1)[0]
    except (AttributeError, RuntimeError):
        return None
    return Path(text).resolve() if text else None


def show_suggestions(project: QgsProject, path: Path, group_name: str) -> QgsVectorLayer | None:
    """Load the suggestions file as the styled layer on top of the result group, in place of
    any earlier layer of the same file; ``None`` if it does not load.

    The earlier layer goes first: QGIS shares open files between layers of one source, and a
    layer added while the old one is open could read the replaced file's old tiles.
    """
    target = path.resolve()
    for layer in list(project.mapLayers().values()):
        if source_path(layer) == target:
            project.removeMapLayer(layer.id())
    layer = QgsVectorLayer(str(path), LAYER_NAME, "ogr")
    if not layer.isValid():
        logger.warning("suggestions %s did not load as a layer", path)
        return None
    qml = layers.resource_path("styles", STYLE_FILE)
    _message, styled = layer.loadNamedStyle(str(qml))
    if not styled:
        logger.warning("style %s did not load", qml)
    project.addMapLayer(layer, False)
    group = layers.result_group(project, group_name)
    group.insertLayer(0, layer).setItemVisibilityChecked(True)
    group.setItemVisibilityChecked(True)
    return layer


def raise_layer(project: QgsProject, layer: QgsVectorLayer) -> None:
    """Move ``layer`` back to the top of its group (results added later went above it)."""
    node = project.layerTreeRoot().findLayer(layer.id())
    parent = node.parent() if node is not None else None
    if parent is None or parent.children().index(node) == 0:
        return
    clone = node.clone()
    parent.insertChildNode(0, clone)
    parent.removeChildNode(node)


def _has_label(value: Any) -> bool:
    return value is not None and value != NULL


def is_labelled(
    suggestion: Suggestion,
    crs: QgsCoordinateReferenceSystem,
    labels: QgsVectorLayer | None,
    field: str,
    project: QgsProject,
) -> bool:
    """Whether the labels now label the suggested tile, by the engine's touching rule: a
    labelled point in it or on its edge, a labelled polygon reaching into it (not only sharing
    an edge: a neighbouring grid cell), a labelled line crossing it."""
    if labels is None or not labels.isValid() or labels.fields().indexFromName(field) < 0:
        return False
    tile = QgsGeometry(suggestion.geometry)
    if labels.crs() != crs:
        tile.transform(QgsCoordinateTransform(crs, labels.crs(), project))
    request = QgsFeatureRequest().setFilterRect(tile.boundingBox())
    request.setSubsetOfAttributes([field], labels.fields())
    for feature in labels.getFeatures(request):
        if not _has_label(feature[field]) or not feature.hasGeometry():
            continue
        if _touches(tile, feature.geometry()):
            return True
    return False


def _touches(tile: QgsGeometry, other: QgsGeometry) -> bool:
    kind = other.type()
    if kind == QgsWkbTypes.GeometryType.PointGeometry:
        return tile.intersects(other)
    if kind == QgsWkbTypes.GeometryType.PolygonGeometry:
        return tile.intersection(other).area() > AREA_EPSILON * tile.area()
    return tile.intersects(other) and not tile.touches(other)


class SuggestionSteps:
    """Where "Next" is in the ranked tiles: in rank order, wrapping round after the last,
    skipping the tiles labelled meanwhile."""

    def __init__(self, suggestions: list[Suggestion]) -> None:
        self.suggestions = suggestions
        self.position = -1  # none shown yet

    def __len__(self) -> int:
        return len(self.suggestions)

    @property
    def current(self) -> Suggestion | None:
        return self.suggestions[self.position] if self.position >= 0 else None

    def next(self, labelled: Callable[[Suggestion], bool]) -> Suggestion | None:
        """The next unlabelled tile after the current one (round to the first after the last);
        ``None`` when every suggested tile is labelled."""
        count = len(self.suggestions)
        for step in range(1, count + 1):
            index = (self.position + step) % count
            if not labelled(self.suggestions[index]):
                self.position = index
                return self.suggestions[index]
        return None

    def remaining(self, labelled: Callable[[Suggestion], bool]) -> int:
        """How many suggested tiles are still unlabelled."""
        return sum(1 for suggestion in self.suggestions if not labelled(suggestion))


def zoom_to(canvas: Any, layer: QgsVectorLayer, suggestion: Suggestion) -> None:
    """Centre the canvas on the tile, :data:`ZOOM_TILES` tile widths wide, select it (the
    selection colour marks it) and flash it."""
    destination = canvas.mapSettings().destinationCrs()
    box = suggestion.geometry.boundingBox()
    if destination.isValid() and layer.crs().isValid() and destination != layer.crs():
        transform = QgsCoordinateTransform(layer.crs(), destination, QgsProject.instance())
        box = transform.transformBoundingBox(box)
    box.scale(ZOOM_TILES)
    canvas.setExtent(box)
    canvas.refresh()
    layer.selectByIds([suggestion.fid])
    canvas.flashGeometries([suggestion.geometry], layer.crs())
