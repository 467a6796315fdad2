"""Tiles to label next: the unlabelled tiles where a change map is least sure."""

from __future__ import annotations

from typing import Any

from qgis.core import (
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProcessingParameterField,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
    QgsProcessingParameterVectorLayer,
)

from kdmsi_qgis import layers
from kdmsi_qgis.algorithms.base import EngineCall, KdmsiAlgorithm, advanced
from kdmsi_qgis.algorithms.maps import threshold_argument
from kdmsi_qgis.contract import D

#: Named thresholds of ``kdmsi suggest`` (besides a number).
THRESHOLDS = ("auto", "otsu", "unchanged-q")


class SuggestTilesAlgorithm(KdmsiAlgorithm):
    """``kdmsi suggest``: a layer of the unlabelled tiles to label next, ranked."""

    ID = "suggesttiles"
    DISPLAY = "Tiles to label next"
    GROUP = "1. Prepare"
    GROUP_ID = "prepare"
    PROBABILITY = "PROBABILITY"
    COUNT = "COUNT"
    THRESHOLD = "THRESHOLD"
    MIN_GAP = "MIN_GAP"
    MEASURE = "MEASURE"
    EXPLORE = "EXPLORE"
    HELP = (
        "Which tiles to label next: the unlabelled tiles where a change map is least sure, "
        "ranked (rank 1 first).\n\n"
        "Give the quick change preview before any training, or the change probability of "
        "'Run the whole chain' after it, and the weak labels so far (the labelling grid, or "
        "polygons/points; none before you start). Each tile's change_share is the share of its "
        "pixels the map puts above its decision threshold (the run's own threshold, or Otsu's "
        "for the preview). The default measure, uncertainty (1 - |2 change_share - 1|), ranks "
        "first the tiles the map calls half change. The false-alarms measure ranks first the "
        "tiles where the map calls much change but which look unchanged by the tiles labelled "
        "so far (change_share times the chance that the tile is unchanged, learned from the "
        "labelled tiles): labelled unchanged, their false alarms leave the map and calibrate "
        "the chain; labelled changed, they are changes the map half saw. By default half of "
        "the tiles are drawn at random instead (after the ranked ones; the share is an "
        "advanced option), so that the labelled tiles stay a fair sample of the scene: "
        "measured, that paid off more surely than ranked tiles alone. Suggestions keep the "
        "minimum gap (in tile widths) apart, so they are not neighbours in one blob.\n\n"
        "Next: label the suggested tiles (change = 1 or 0 in the labelling grid) and run the "
        "chain again."
    )

    def initAlgorithm(self, configuration: dict[str, Any] | None = None) -> None:  # noqa: N802
        self.addParameter(
            QgsProcessingParameterRasterLayer(
                self.PROBABILITY,
                self.tr("Change map (quick preview, or a run's change probability)"),
            )
        )
        self.addParameter(
            QgsProcessingParameterVectorLayer(
                self.LABELS,
                self.tr("Weak labels so far (labelling grid, polygons or points)"),
                [
                    QgsProcessing.SourceType.TypeVectorPolygon,
                    QgsProcessing.SourceType.TypeVectorPoint,
                ],
                optional=True,
            )
        )
        self.addParameter(
            QgsProcessingParameterField(
                self.LABEL_FIELD,
                self.tr("Label field (integer: 1 changed, 0 unchanged)"),
                defaultValue=D.LABEL_FIELD,
                parentLayerParameterName=self.LABELS,
                type=QgsProcessingParameterField.DataType.Numeric,
                optional=True,
            )
        )
        self.add_int(self.COUNT, self.tr("Number of tiles"), D.SUGGEST_COUNT)
        self.add_int(
            self.TILE_SIZE,
            self.tr("Tile size (pixels; 0: the labelling grid's)"),
            0,
            minimum=0,
        )
        self.addParameter(
            advanced(
                QgsProcessingParameterString(
                    self.THRESHOLD,
                    self.tr("Decision threshold of the map (auto, otsu, unchanged-q or a number)"),
                    defaultValue=D.SUGGEST_THRESHOLD,
                )
            )
        )
        self.add_enum(
            self.MEASURE,
            self.tr("Rank tiles by"),
            D.SUGGEST_MEASURES,
            default=D.SUGGEST_MEASURE,
            adv=True,
        )
        self.add_float(
            self.EXPLORE,
            self.tr("Share of the tiles drawn at random (0 to 1)"),
            float(D.SUGGEST_EXPLORE),
            adv=True,
        )
        self.add_float(
            self.MIN_GAP,
            self.tr("Minimum gap between suggested tiles (tile widths)"),
            float(D.SUGGEST_MIN_GAP),
            adv=True,
        )
        self.addParameter(
            QgsProcessingParameterVectorDestination(
                self.OUTPUT,
                self.tr("Tiles to label next"),
                type=QgsProcessing.SourceType.TypeVectorPolygon,
            )
        )

    def _resolve_labels(
        self,
        parameters: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> list[str]:
        """No weak labels yet (before any labelling) is allowed here: every tile is a candidate."""
        if self.parameterAsVectorLayer(parameters, self.LABELS, context) is None:
            return []
        return super()._resolve_labels(parameters, context, feedback)

    def build_call(
        self,
        parameters: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> EngineCall:
        probability = layers.raster_source(
            self.parameterAsRasterLayer(parameters, self.PROBABILITY, context),
            self.tr("Change map"),
        )
        output = self.output_layer(parameters, self.OUTPUT, context)
        arguments = [probability, "-o", output]
        arguments += self.labels_arguments(parameters, context, feedback)
        arguments += ["--count", self.number(parameters, self.COUNT, context)]
        tile_size = self.parameterAsInt(parameters, self.TILE_SIZE, context)
        if tile_size > 0:
            arguments += ["--tile-size", str(tile_size)]
        threshold = threshold_argument(
            self.parameterAsString(parameters, self.THRESHOLD, context), THRESHOLDS
        )
        arguments += ["--threshold", threshold]
        arguments += ["--min-gap", self.number(parameters, self.MIN_GAP, context)]
        measure = self.enum_value(parameters, self.MEASURE, D.SUGGEST_MEASURES, context)
        arguments += ["--measure", measure]
        arguments += ["--explore", self.number(parameters, self.EXPLORE, context)]
        return EngineCall("suggest", arguments, outputs={self.OUTPUT: output})
