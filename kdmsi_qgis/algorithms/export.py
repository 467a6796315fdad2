"""Export a trained change detector to ONNX for the Deepness plugin (``kdmsi export``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qgis.core import (
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputNumber,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
)

from kdmsi_qgis import layers
from kdmsi_qgis.algorithms.base import EngineCall, KdmsiAlgorithm
from kdmsi_qgis.contract import D


class ExportDetectorAlgorithm(KdmsiAlgorithm):
    """``kdmsi export``: the detector as one ONNX segmentation model, and the stacked VRT."""

    ID = "exportdetector"
    DISPLAY = "Export detector to ONNX (Deepness)"
    GROUP = "7. Export"
    GROUP_ID = "export"
    VRT = "VRT"
    OPSET = "OPSET"
    HELP = (
        "Writes a change detector from 'Train change detector' as an ONNX segmentation model "
        "that the Deepness plugin (and any onnxruntime program) runs without KD-MSI.\n\n"
        "The model takes ONE raster: the detector's bands of the before image followed by the "
        "same bands of the after image, as raw values (the band scaling is inside the model). "
        "Give the before and after images and a VRT file to get that raster as a virtual "
        "stack of both dates (it is added to the project). The model outputs, per pixel, the "
        "probability of 'unchanged' and of 'changed'.\n\n"
        "Its metadata sets Deepness's model type (segmentation), class names, resolution "
        "(that of the training images), tile size and standardisation, so 'Load default "
        "parameters' in Deepness fills them in. A detector trained on several scenes needs the "
        "image pair (its scaling is computed from it). The export is checked against the "
        "detector before it is written. Needs the Python packages onnx, onnxscript and "
        "onnxruntime in the engine's Python."
    )

    def initAlgorithm(self, configuration: dict[str, Any] | None = None) -> None:  # noqa: N802
        self.add_model_parameter(self.tr("Change detector file (.kdmsi)"))
        self.addParameter(
            QgsProcessingParameterRasterLayer(
                self.BEFORE, self.tr("Before image (date 1), for the VRT"), optional=True
            )
        )
        self.addParameter(
            QgsProcessingParameterRasterLayer(
                self.AFTER, self.tr("After image (date 2), for the VRT"), optional=True
            )
        )
        self.addParameter(
            QgsProcessingParameterNumber(
                self.TILE_SIZE,
                self.tr("Tile size (pixels; empty: the window 'Detect changes' uses)"),
                type=QgsProcessingParameterNumber.Type.Integer,
                optional=True,
                minValue=32,
                maxValue=4096,
            )
        )
        self.add_int(self.OPSET, self.tr("ONNX opset"), D.EXPORT_OPSET, minimum=18, adv=True)
        self.addParameter(
            QgsProcessingParameterFileDestination(
                self.OUTPUT, self.tr("ONNX model"), self.tr("ONNX models (*.onnx)")
            )
        )
        self.addParameter(
            QgsProcessingParameterFileDestination(
                self.VRT,
                self.tr("Before + after stack for Deepness (VRT)"),
                self.tr("Virtual rasters (*.vrt)"),
                optional=True,
                createByDefault=False,
            )
        )
        self.addOutput(QgsProcessingOutputNumber("MAX_DIFFERENCE", self.tr("max difference")))

    def build_call(
        self,
        parameters: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> EngineCall:
        model = self.parameterAsFile(parameters, self.MODEL, context)
        output = self.output_file(parameters, self.OUTPUT, context)
        arguments = [model, "-o", output, "--opset", self.number(parameters, self.OPSET, context)]
        if parameters.get(self.TILE_SIZE) not in (None, ""):
            arguments += ["--tile-size", self.number(parameters, self.TILE_SIZE, context)]
        outputs: dict[str, Any] = {self.OUTPUT: output}
        vrt = self._vrt_arguments(parameters, context)
        if vrt:
            arguments += ["--vrt", *vrt]
            outputs[self.VRT] = vrt[2]
        return EngineCall("export", arguments, None, outputs)

    def _vrt_arguments(self, parameters: dict[str, Any], context: QgsProcessingContext) -> list:
        """``[BEFORE, AFTER, STACK.vrt]``, or ``[]`` when no VRT is asked for."""
        vrt = layers.destination_path(self.parameterAsFileOutput(parameters, self.VRT, context))
        given = [parameters.get(name) not in (None, "") for name in (self.BEFORE, self.AFTER)]
        if not vrt and not any(given):
            return []
        if not (vrt and all(given)):
            raise QgsProcessingException(
                self.tr("for the VRT give the before image, the after image and the VRT file")
            )
        Path(vrt).parent.mkdir(parents=True, exist_ok=True)
        return [*self.scene_arguments(parameters, context), vrt]

    def finish(
        self,
        call: EngineCall,
        result: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> dict[str, Any]:
        outputs = dict(call.outputs)
        difference = result.get("verified_max_abs_diff")
        if isinstance(difference, (int, float)):
            outputs["MAX_DIFFERENCE"] = float(difference)
            feedback.pushInfo(
                self.tr("the ONNX model matches the detector within {:.2g} (probability)").format(
                    difference
                )
            )
        vrt = outputs.get(self.VRT)
        if vrt and Path(vrt).exists():
            details = QgsProcessingContext.LayerDetails(
                self.tr("Before + after stack (Deepness input)"), context.project(), self.VRT
            )
            context.addLayerToLoadOnCompletion(vrt, details)
        return outputs
