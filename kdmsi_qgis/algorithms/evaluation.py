"""Evaluate a change probability or change raster against a reference raster."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingOutputNumber,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
)

from kdmsi_qgis import layers
from kdmsi_qgis.algorithms.base import EngineCall, KdmsiAlgorithm

#: Metrics returned as Processing numbers (engine key -> output name).
METRICS = ("iou", "f1", "precision", "recall", "oa", "miou", "mean_f1", "threshold")


class EvaluateAlgorithm(KdmsiAlgorithm):
    """``kdmsi evaluate``: confusion-based metrics over the whole area."""

    ID = "evaluate"
    DISPLAY = "Evaluate against a reference raster"
    GROUP = "6. Evaluate"
    GROUP_ID = "evaluate"
    PREDICTION = "PREDICTION"
    REFERENCE = "REFERENCE"
    THRESHOLD = "THRESHOLD"
    SWEEP = "SWEEP"
    HELP = (
        "Compares a change probability raster (thresholded) or a change raster (1 = change) "
        "with a reference change raster (values > 0 = change; its nodata is ignored) over the "
        "whole area, and reports overall accuracy, change precision, recall, F1, change IoU "
        "(cIoU), mean IoU and the mean F1 of both classes.\n\n"
        "Tick 'sweep thresholds' to find the threshold with the best change IoU (only fair "
        "when the reference is not your test area). The metrics are written to a JSON file "
        "and shown in the log."
    )

    def initAlgorithm(self, configuration: dict[str, Any] | None = None) -> None:  # noqa: N802
        self.addParameter(
            QgsProcessingParameterRasterLayer(
                self.PREDICTION, self.tr("Prediction (change probability or change raster)")
            )
        )
        self.addParameter(
            QgsProcessingParameterRasterLayer(self.REFERENCE, self.tr("Reference change raster"))
        )
        self.addParameter(
            QgsProcessingParameterNumber(
                self.THRESHOLD,
                self.tr("Threshold for a probability raster (empty: 0.5; leave empty for classes)"),
                type=QgsProcessingParameterNumber.Type.Double,
                optional=True,
                minValue=0.0,
                maxValue=0.999,
            )
        )
        self.addParameter(
            QgsProcessingParameterBoolean(self.SWEEP, self.tr("Sweep thresholds"), False)
        )
        self.addParameter(
            QgsProcessingParameterFileDestination(
                self.OUTPUT, self.tr("Metrics (JSON)"), "JSON files (*.json)"
            )
        )
        for key in METRICS:
            self.addOutput(QgsProcessingOutputNumber(key.upper(), key))
        for key in ("BEST_THRESHOLD", "BEST_IOU"):
            self.addOutput(QgsProcessingOutputNumber(key, key.lower().replace("_", " ")))

    def build_call(
        self,
        parameters: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> EngineCall:
        prediction = layers.raster_source(
            self.parameterAsRasterLayer(parameters, self.PREDICTION, context),
            self.tr("Prediction"),
        )
        reference = layers.raster_source(
            self.parameterAsRasterLayer(parameters, self.REFERENCE, context),
            self.tr("Reference"),
        )
        output = self.output_file(parameters, self.OUTPUT, context)
        arguments = [prediction, reference]
        if self.parameterAsBoolean(parameters, self.SWEEP, context):
            arguments.append("--sweep")
        elif parameters.get(self.THRESHOLD) not in (None, ""):
            arguments += ["--threshold", self.number(parameters, self.THRESHOLD, context)]
        return EngineCall("evaluate", arguments, outputs={self.OUTPUT: output})

    def finish(
        self,
        call: EngineCall,
        result: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> dict[str, Any]:
        metrics = result
        if not metrics:
            raise QgsProcessingException(self.tr("the engine returned no metrics"))
        write_json(call.outputs[self.OUTPUT], metrics)
        outputs: dict[str, Any] = dict(call.outputs)
        best = metrics.get("best") if isinstance(metrics.get("best"), dict) else {}
        for key in METRICS:
            value = metrics.get(key)
            if isinstance(value, (int, float)):
                outputs[key.upper()] = float(value)
                feedback.pushInfo(f"{key}: {value:.4f}")
        for key in ("threshold", "iou"):
            if isinstance(best.get(key), (int, float)):
                outputs[f"BEST_{key.upper()}"] = float(best[key])
                feedback.pushInfo(f"best {key}: {best[key]:.4f}")
        return outputs


def write_json(path: str, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` under a temporary name, then rename it (never half a file)."""
    target = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=".partial-", suffix=".json", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(data, stream, indent=2, default=str)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
