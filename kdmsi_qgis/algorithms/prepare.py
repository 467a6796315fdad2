"""Create the labelling grid: the tiles an analyst marks as changed or unchanged."""

from __future__ import annotations

from typing import Any

from qgis.core import (
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProcessingParameterVectorDestination,
)

from kdmsi_qgis.algorithms.base import EngineCall, KdmsiAlgorithm


class LabellingGridAlgorithm(KdmsiAlgorithm):
    """``kdmsi grid``: the tile grid of an image pair as a GeoPackage with an empty field."""

    ID = "labellinggrid"
    DISPLAY = "Create labelling grid"
    GROUP = "1. Prepare"
    GROUP_ID = "prepare"
    OVERLAP = "OVERLAP"
    HELP = (
        "Cuts the overlap of the before and after images into square tiles (the size the "
        "model will be trained on) and writes them as polygons with an empty integer field "
        "'change'.\n\n"
        "Next: mark tiles with the KD-MSI panel's 'Label tiles' tool (click: changed, right "
        "click: unchanged, shift-click: clear, drag: several; saved as you go), or open the "
        "grid's attribute table and set change = 1 on tiles where something changed and "
        "change = 0 on tiles where nothing did. Leave the others empty (they are not used). "
        "Then run 'Train KD-MSI model' or 'Run the whole chain' with the grid as weak labels. "
        "A few dozen tiles of each class are enough to start.\n\n"
        "Tiles with less than half of their pixels valid on both dates are left out."
    )

    def initAlgorithm(self, configuration: dict[str, Any] | None = None) -> None:  # noqa: N802
        self.add_scene_parameters()
        self.add_tile_size_parameter()
        self.add_int(self.OVERLAP, self.tr("Tile overlap (pixels)"), 0, minimum=0, adv=True)
        self.add_bands_parameter()
        self.addParameter(
            QgsProcessingParameterVectorDestination(
                self.OUTPUT,
                self.tr("Labelling grid"),
                type=QgsProcessing.SourceType.TypeVectorPolygon,
            )
        )

    def build_call(
        self,
        parameters: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> EngineCall:
        arguments = self.scene_arguments(parameters, context)
        output = self.output_layer(parameters, self.OUTPUT, context)
        arguments += ["-o", output, "--tile-size", self.number(parameters, self.TILE_SIZE, context)]
        arguments += ["--overlap", self.number(parameters, self.OVERLAP, context)]
        arguments += self.bands_arguments(parameters, context)
        return EngineCall("grid", arguments, outputs={self.OUTPUT: output})

    def finish(
        self,
        call: EngineCall,
        result: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> dict[str, Any]:
        self.style_on_load(context, call.outputs[self.OUTPUT], "grid")
        return dict(call.outputs)
