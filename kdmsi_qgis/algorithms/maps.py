"""Change probability maps (CAM, student, MI, MSI) and pseudo labels from them."""

from __future__ import annotations

from typing import Any

from qgis.core import (
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
)

from kdmsi_qgis import layers
from kdmsi_qgis.algorithms.base import METHODS, EngineCall, KdmsiAlgorithm, advanced
from kdmsi_qgis.contract import D


def check_scales(text: str) -> str:
    """``0.5,1,1.5,2`` -> the same text, or QgsProcessingException (the engine's rule)."""
    try:
        D.parse_scales(text)
    except ValueError as exc:
        raise QgsProcessingException(str(exc)) from exc
    return text.replace(" ", "")


def threshold_argument(text: str, named: tuple[str, ...]) -> str:
    """A threshold typed by the user: a number in (0, 1) or one of ``named``."""
    cleaned = (text or "").strip().lower()
    if cleaned in named:
        return cleaned
    try:
        value = float(cleaned)
    except ValueError:
        value = -1.0
    if not 0.0 < value < 1.0:
        raise QgsProcessingException(
            f"threshold {text!r} is neither a number in (0, 1) nor one of {', '.join(named)}; "
            f"give e.g. 0.3 or {named[0]}"
        )
    return repr(value)


class QuickPreviewAlgorithm(KdmsiAlgorithm):
    """``kdmsi cva``: change vector analysis, no labels and no training."""

    ID = "quickpreview"
    DISPLAY = "Quick change preview (no training)"
    GROUP = "3. Maps"
    GROUP_ID = "maps"
    THRESHOLD = "THRESHOLD"
    CHANGE = "CHANGE"
    HELP = (
        "Change vector analysis: each band is scaled to 0..1 by its 2nd-98th percentiles over "
        "both dates, and each pixel gets the root mean square of its band differences (0..1). "
        "The change raster marks the pixels above the threshold: otsu (the default) picks it "
        "from the map itself.\n\n"
        "No labels and no training: seconds even on large scenes. Look at it first to see "
        "where the images differ; the trained chain ('Run the whole chain') learns from your "
        "labels which differences are change that matters to you (season, haze and sensor "
        "differences are not)."
    )

    def initAlgorithm(self, configuration: dict[str, Any] | None = None) -> None:  # noqa: N802
        self.add_scene_parameters()
        self.addParameter(
            QgsProcessingParameterString(
                self.THRESHOLD,
                self.tr("Threshold of the change raster (a number or otsu)"),
                defaultValue=D.CVA_THRESHOLD,
            )
        )
        self.add_bands_parameter()
        self.addParameter(
            QgsProcessingParameterRasterDestination(
                self.OUTPUT, self.tr("Change magnitude (CVA, 0..1)")
            )
        )
        self.addParameter(
            QgsProcessingParameterRasterDestination(self.CHANGE, self.tr("Change (thresholded)"))
        )

    def build_call(
        self,
        parameters: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> EngineCall:
        arguments = self.scene_arguments(parameters, context)
        output = self.output_layer(parameters, self.OUTPUT, context)
        change = self.output_layer(parameters, self.CHANGE, context)
        threshold = threshold_argument(
            self.parameterAsString(parameters, self.THRESHOLD, context), ("otsu",)
        )
        arguments += ["-o", output, "--change", change, "--threshold", threshold]
        arguments += self.bands_arguments(parameters, context)
        return EngineCall("cva", arguments, outputs={self.OUTPUT: output, self.CHANGE: change})

    def finish(
        self,
        call: EngineCall,
        result: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> dict[str, Any]:
        self.style_on_load(context, call.outputs[self.OUTPUT], "preview")
        self.style_on_load(context, call.outputs[self.CHANGE], "preview_change")
        return {
            **call.outputs,
            "THRESHOLD_USED": result.get("threshold"),
            "CHANGED_FRACTION": result.get("changed_fraction"),
        }


class ChangeProbabilityAlgorithm(KdmsiAlgorithm):
    """``kdmsi infer``: a change probability raster (0..1) from a KD-MSI model."""

    ID = "changeprobability"
    DISPLAY = "Change probability map (CAM / student / MI / MSI)"
    GROUP = "3. Maps"
    GROUP_ID = "maps"
    METHOD = "METHOD"
    SCALES = "SCALES"
    HELP = (
        "Computes a change probability raster (float, 0 = no change, 1 = change, nodata where "
        "either image has none) over the whole overlap of the two images with a model from "
        "'Train KD-MSI model'.\n\n"
        "Method: msi (recommended) averages the student's sigmoid maps over the scales and "
        "horizontal flips; mi sums raw maps over scales (the baseline); student is one pass at "
        "scale 1 (fastest); cam is the teacher's class activation map.\n\n"
        "The images must have the bands the model was trained on. Next: 'Pseudo labels'."
    )

    def initAlgorithm(self, configuration: dict[str, Any] | None = None) -> None:  # noqa: N802
        self.add_scene_parameters()
        self.add_model_parameter(self.tr("KD-MSI model file (.kdmsi)"))
        self.add_enum(self.METHOD, self.tr("Method"), METHODS)
        self.addParameter(
            advanced(
                QgsProcessingParameterString(
                    self.SCALES, self.tr("Scales (msi and mi)"), defaultValue=D.MSI_SCALES_TEXT
                )
            )
        )
        self.add_device_parameter()
        self.addParameter(
            QgsProcessingParameterRasterDestination(self.OUTPUT, self.tr("Change probability"))
        )

    def build_call(
        self,
        parameters: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> EngineCall:
        arguments = self.scene_arguments(parameters, context)
        model = self.parameterAsFile(parameters, self.MODEL, context)
        output = self.output_layer(parameters, self.OUTPUT, context)
        scales = check_scales(self.parameterAsString(parameters, self.SCALES, context))
        arguments += ["--model", model, "-o", output]
        arguments += ["--method", self.enum_value(parameters, self.METHOD, METHODS, context)]
        arguments += ["--scales", scales]
        device = self.device(parameters, context)
        return EngineCall("infer", arguments, device, {self.OUTPUT: output})

    def finish(
        self,
        call: EngineCall,
        result: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> dict[str, Any]:
        self.style_on_load(context, call.outputs[self.OUTPUT], "probability")
        return dict(call.outputs)


class PseudoLabelsAlgorithm(KdmsiAlgorithm):
    """``kdmsi pseudo``: pixel pseudo labels from a change probability raster."""

    ID = "pseudolabels"
    DISPLAY = "Pseudo labels"
    GROUP = "3. Maps"
    GROUP_ID = "maps"
    PROBABILITY = "PROBABILITY"
    THRESHOLD = "THRESHOLD"
    AUTO_THRESHOLD = "AUTO_THRESHOLD"
    UNMARKED_UNCHANGED = "UNMARKED_UNCHANGED"
    HELP = (
        "Turns a change probability raster into pixel pseudo labels for the change detector. "
        "On tiles the weak labels mark as changed: 1 where the probability is above the "
        "threshold, else 0; tiles marked unchanged are all 0; unlabelled tiles and nodata are "
        "255 (ignored). Use the weak labels the model was trained with.\n\n"
        "Threshold: a number (0.3 is the paper's value for MSI maps) or a rule that needs no "
        "pixel truth: unchanged-q (the default: the 99th percentile of the map on tiles "
        "labelled unchanged, so about 1 % false positives there), otsu (Otsu on the changed "
        "tiles) or auto (the higher of the two). 'Choose the threshold automatically' is "
        "auto. Look at the result over the after image: if real changes are missing lower the "
        "threshold, if noise is labelled as change raise it. Next: 'Train change detector'."
    )

    def initAlgorithm(self, configuration: dict[str, Any] | None = None) -> None:  # noqa: N802
        self.addParameter(
            QgsProcessingParameterRasterLayer(
                self.PROBABILITY, self.tr("Change probability (from 'Change probability map')")
            )
        )
        self.add_labels_parameters()
        self.addParameter(
            QgsProcessingParameterBoolean(
                self.UNMARKED_UNCHANGED, self.tr("Tiles without a label are unchanged"), False
            )
        )
        self.addParameter(
            QgsProcessingParameterString(
                self.THRESHOLD,
                self.tr("Threshold (a number, unchanged-q, otsu or auto)"),
                defaultValue=D.PSEUDO_THRESHOLD,
            )
        )
        self.addParameter(
            QgsProcessingParameterBoolean(
                self.AUTO_THRESHOLD, self.tr("Choose the threshold automatically"), False
            )
        )
        self.addParameter(
            QgsProcessingParameterRasterDestination(self.OUTPUT, self.tr("Pseudo labels"))
        )

    def build_call(
        self,
        parameters: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> EngineCall:
        probability = layers.raster_source(
            self.parameterAsRasterLayer(parameters, self.PROBABILITY, context),
            self.tr("Change probability"),
        )
        if self.parameterAsBoolean(parameters, self.AUTO_THRESHOLD, context):
            threshold_text = "auto"
        else:
            threshold_text = threshold_argument(
                self.parameterAsString(parameters, self.THRESHOLD, context),
                D.PSEUDO_THRESHOLDS,
            )
        output = self.output_layer(parameters, self.OUTPUT, context)
        arguments = [probability, "-o", output, "--threshold", threshold_text]
        arguments += self.labels_arguments(parameters, context, feedback)
        if self.parameterAsBoolean(parameters, self.UNMARKED_UNCHANGED, context):
            arguments.append("--unmarked-unchanged")
        return EngineCall("pseudo", arguments, outputs={self.OUTPUT: output})

    def finish(
        self,
        call: EngineCall,
        result: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> dict[str, Any]:
        self.style_on_load(context, call.outputs[self.OUTPUT], "pseudo")
        return dict(call.outputs)
