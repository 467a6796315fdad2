"""Layers in and out: QGIS layers to files the engine reads, engine outputs to styled layers.

The engine reads files, so a raster layer becomes its source path and a vector layer that is
not a plain file (a memory layer, a layer with unsaved edits or a filter, one layer of a
multi-layer GeoPackage) is exported to a temporary GeoPackage first. Results are added to the
project in one layer group, styled with the QML files in ``resources/styles``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from qgis.core import (
    QgsCoordinateTransformContext,
    QgsLayerTreeGroup,
    QgsMapLayer,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingUtils,
    QgsProject,
    QgsProviderRegistry,
    QgsRasterLayer,
    QgsVectorFileWriter,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import QCoreApplication

logger = logging.getLogger(__name__)

PLUGIN_DIR = Path(__file__).resolve().parent

#: Output kind -> (QML style file, layer name).
STYLES = {
    "probability": ("probability.qml", "Change probability"),
    "change": ("change.qml", "Change"),
    "changes": ("changes.qml", "Change polygons"),
    "msi": ("probability.qml", "MSI change probability (KD-MSI)"),
    "evidence": ("probability.qml", "Calibrated change vector analysis"),
    "preview": ("probability.qml", "Quick change preview (CVA, no training)"),
    "preview_change": ("change.qml", "Quick change preview: change (Otsu)"),
    "pseudo": ("pseudo.qml", "Pseudo labels"),
    "grid": ("grid.qml", "Labelling grid"),
}


#: Output kinds that show the answer: switched on when added. The others (the change raster,
#: MSI map, calibrated CVA, pseudo labels) are added switched off, so they do not hide it.
SHOWN_FIRST = frozenset({"changes", "probability", "preview", "preview_change", "grid"})

#: A year (or a yyyymmdd date) in a layer or file name: orders the dates of an image pair.
DATE_PATTERN = re.compile(r"(?<!\d)((?:19|20)\d{2})(\d{4})?(?!\d)")


def tr(text: str) -> str:
    return QCoreApplication.translate("KdmsiLayers", text)


def raster_layers(project: QgsProject) -> list[QgsRasterLayer]:
    """The project's valid raster layers, in the order they were added (bottom of the tree
    first)."""
    nodes = project.layerTreeRoot().findLayers()
    found = [n.layer() for n in reversed(nodes) if isinstance(n.layer(), QgsRasterLayer)]
    return [layer for layer in found if layer.isValid()]


def _date_key(layer: QgsMapLayer) -> str | None:
    for text in (layer.name(), Path(layer.source().split("|", 1)[0]).stem):
        match = DATE_PATTERN.search(text)
        if match:
            return match.group(1) + (match.group(2) or "0000")
    return None


def guess_pair(
    project: QgsProject,
) -> tuple[QgsRasterLayer | None, QgsRasterLayer | None]:
    """The likely before and after rasters of a project: two different layers, ordered by the
    date in their names when both have one, else by the order they were added; ``(None, None)``
    with fewer than two rasters."""
    candidates = raster_layers(project)
    if len(candidates) < 2:
        return None, None
    dated = [layer for layer in candidates if _date_key(layer) is not None]
    if len(dated) >= 2:
        dated.sort(key=lambda layer: _date_key(layer) or "")
        return dated[0], dated[-1]
    return candidates[0], candidates[1]


def resource_path(*parts: str) -> Path:
    """A file of ``resources/`` (inside the packaged plugin, or beside it in a checkout)."""
    for root in (PLUGIN_DIR / "resources", PLUGIN_DIR.parent / "resources"):
        candidate = root.joinpath(*parts)
        if candidate.exists():
            return candidate
    return PLUGIN_DIR.joinpath("resources", *parts)


# ----------------------------------------------------------------------------- inputs


def raster_source(layer: QgsRasterLayer | None, what: str) -> str:
    """The file (or GDAL dataset name) behind a raster layer.

    Raises:
        QgsProcessingException: no layer, or a layer that GDAL cannot read (a web service).
    """
    if layer is None or not layer.isValid():
        raise QgsProcessingException(
            tr("{} is missing or not a valid raster; choose a raster layer or file").format(what)
        )
    if layer.providerType() != "gdal":
        raise QgsProcessingException(
            tr(
                "{} ({}) is a {} layer, not a file; save it as a GeoTIFF first "
                "(Raster > Conversion > Translate)"
            ).format(what, layer.name(), layer.providerType())
        )
    return layer.source()


def vector_source(
    layer: QgsVectorLayer | None,
    what: str,
    context: QgsProcessingContext | None = None,
    feedback: QgsProcessingFeedback | None = None,
) -> str:
    """A file the engine can read for a vector layer, exporting it to a GeoPackage if needed.

    Raises:
        QgsProcessingException: no layer, or the export failed.
    """
    if layer is None or not layer.isValid():
        raise QgsProcessingException(
            tr("{} is missing or not a valid vector layer; choose a layer or file").format(what)
        )
    path = plain_file(layer)
    if path is not None:
        return path
    target = QgsProcessingUtils.generateTempFilename("kdmsi_labels.gpkg")
    if feedback is not None:
        feedback.pushInfo(
            tr("{} is not a plain file; exporting it to {}").format(layer.name(), target)
        )
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    options.layerName = "labels"
    transform_context = (
        context.transformContext()
        if context is not None
        else QgsProject.instance().transformContext() or QgsCoordinateTransformContext()
    )
    error = QgsVectorFileWriter.writeAsVectorFormatV3(layer, target, transform_context, options)
    code = error[0] if isinstance(error, tuple) else error
    if code != QgsVectorFileWriter.WriterError.NoError:
        message = error[1] if isinstance(error, tuple) and len(error) > 1 else str(code)
        raise QgsProcessingException(
            tr("could not export {} to a GeoPackage: {}").format(layer.name(), message)
        )
    return target


def plain_file(layer: QgsVectorLayer) -> str | None:
    """The path of a single-layer file behind ``layer``, or ``None`` if it must be exported."""
    if layer.providerType() != "ogr" or layer.isModified() or layer.subsetString():
        return None
    parts = QgsProviderRegistry.instance().decodeUri("ogr", layer.source())
    path = parts.get("path") or ""
    if not path or not Path(path).is_file():
        return None
    if parts.get("layerName") or parts.get("layerId") not in (None, 0, "0") or parts.get("subset"):
        return None
    return path


# ----------------------------------------------------------------------------- outputs


def destination_path(value: str) -> str:
    """A Processing destination as a plain path (drops ``|layername=...``, ``ogr:`` prefixes)."""
    text = str(value)
    if text.startswith("ogr:"):
        text = text[4:]
    return text.split("|", 1)[0]


def apply_style(layer: QgsMapLayer, kind: str) -> bool:
    """Apply the QML style for ``kind`` (see :data:`STYLES`); ``False`` if it did not load."""
    if kind not in STYLES:
        return False
    qml = resource_path("styles", STYLES[kind][0])
    if not qml.is_file():
        logger.warning("style %s not found", qml)
        return False
    _message, ok = layer.loadNamedStyle(str(qml))
    layer.triggerRepaint()
    return bool(ok)


def result_group(project: QgsProject, name: str) -> QgsLayerTreeGroup:
    """The group ``name`` at the top of the layer tree (created if missing)."""
    root = project.layerTreeRoot()
    group = root.findGroup(name)
    if group is None:
        group = root.insertGroup(0, name)
    return group


def load_layer(path: str, kind: str, name: str | None = None) -> QgsMapLayer | None:
    """A styled layer for an engine output file, or ``None`` if it is missing or invalid."""
    if not path or not Path(path).exists():
        return None
    title = name or STYLES.get(kind, ("", Path(path).stem))[1]
    layer: QgsMapLayer
    if kind in ("changes", "grid") or path.lower().endswith((".gpkg", ".shp", ".geojson")):
        layer = QgsVectorLayer(path, title, "ogr")
    else:
        layer = QgsRasterLayer(path, title, "gdal")
    if not layer.isValid():
        logger.warning("output %s did not load as a layer", path)
        return None
    apply_style(layer, kind)
    return layer


def add_results(
    project: QgsProject,
    outputs: list[tuple[str, str]],
    group_name: str,
    shown: frozenset[str] | set[str] = SHOWN_FIRST,
) -> list[QgsMapLayer]:
    """Add ``(kind, path)`` outputs to ``project`` in the group ``group_name``, styled.

    Layers from an earlier run in the same group are replaced; new layers go to the top of
    the group, polygons above rasters. Kinds in ``shown`` are switched on, the others off.
    """
    group = result_group(project, group_name)
    added: list[QgsMapLayer] = []
    order = {
        "changes": 0,
        "grid": 0,
        "change": 1,
        "preview_change": 1,
        "pseudo": 2,
        "probability": 3,
        "preview": 3,
        "msi": 4,
        "evidence": 4,
    }
    for kind, path in sorted(outputs, key=lambda item: -order.get(item[0], 9)):
        layer = load_layer(path, kind)
        if layer is None:
            continue
        for node in list(group.findLayers()):
            if node.layer() is not None and node.layer().name() == layer.name():
                project.removeMapLayer(node.layerId())
        project.addMapLayer(layer, False)
        node = group.insertLayer(0, layer)
        node.setItemVisibilityChecked(kind in shown)
        added.insert(0, layer)
    group.setItemVisibilityChecked(True)
    return added


class StyleAndGroup(QgsProcessingLayerPostProcessorInterface):
    """Styles a Processing output layer once it is loaded and moves it into our group."""

    #: Processing keeps raw pointers to post-processors: keep them alive here.
    _alive: list[StyleAndGroup] = []

    def __init__(self, kind: str, group_name: str = "KD-MSI") -> None:
        super().__init__()
        self.kind = kind
        self.group_name = group_name

    @classmethod
    def create(cls, kind: str, group_name: str = "KD-MSI") -> StyleAndGroup:
        instance = cls(kind, group_name)
        cls._alive = cls._alive[-50:] + [instance]
        return instance

    def postProcessLayer(  # noqa: N802 (Qt API)
        self, layer: QgsMapLayer, context: QgsProcessingContext, feedback: QgsProcessingFeedback
    ) -> None:
        apply_style(layer, self.kind)
        project = context.project()
        if project is None:
            return
        root = project.layerTreeRoot()
        node = root.findLayer(layer.id())
        group = result_group(project, self.group_name)
        if node is None:
            return
        if node.parent() is not group:
            group.insertChildNode(0, node.clone())
            parent = node.parent()
            if parent is not None:
                parent.removeChildNode(node)
            node = group.findLayer(layer.id())
        if node is not None:
            node.setItemVisibilityChecked(self.kind in SHOWN_FIRST)
