"""Change detection outputs: detect with a trained detector, the whole chain, vectorising."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qgis.core import (
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProcessingOutputFile,
    QgsProcessingOutputRasterLayer,
    QgsProcessingOutputVectorLayer,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterFolderDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
)

from kdmsi_qgis import layers
from kdmsi_qgis.algorithms.base import BACKBONES, WEIGHTS, EngineCall, KdmsiAlgorithm, advanced
from kdmsi_qgis.algorithms.maps import check_scales, threshold_argument
from kdmsi_qgis.contract import D

#: Files an output folder of ``detect`` / ``run`` holds (DESIGN.md).
FOLDER_OUTPUTS = (
    ("PROBABILITY", "probability", D.PROBABILITY_NAME),
    ("CHANGE", "change", D.CHANGE_NAME),
    ("CHANGES", "changes", D.CHANGES_NAME),
)
REPORT_NAME = D.RECORD_NAME
#: What ``run`` writes besides the detection outputs.
RUN_EXTRA_OUTPUTS = (
    ("STUDENT_MODEL", D.STUDENT_NAME),
    ("MSI_PROBABILITY", D.MSI_NAME),
    ("CHANGE_EVIDENCE", D.EVIDENCE_NAME),
    ("PSEUDO_LABELS", D.PSEUDO_NAME),
    ("DETECTOR_MODEL", D.DETECTOR_NAME),
)


class _FolderOutputAlgorithm(KdmsiAlgorithm):
    OUTPUT_FOLDER = "OUTPUT_FOLDER"
    PROBABILITY = "PROBABILITY"
    CHANGE = "CHANGE"
    CHANGES = "CHANGES"
    REPORT = "REPORT"
    MIN_AREA = "MIN_AREA"
    GROUP = "4. Detect"
    GROUP_ID = "detect"

    def add_folder_outputs(self) -> None:
        self.addParameter(
            QgsProcessingParameterFolderDestination(self.OUTPUT_FOLDER, self.tr("Output folder"))
        )
        self.addOutput(
            QgsProcessingOutputRasterLayer(self.PROBABILITY, self.tr("Change probability"))
        )
        self.addOutput(QgsProcessingOutputRasterLayer(self.CHANGE, self.tr("Change")))
        self.addOutput(QgsProcessingOutputVectorLayer(self.CHANGES, self.tr("Change polygons")))
        self.addOutput(QgsProcessingOutputFile(self.REPORT, self.tr("Run record (JSON)")))

    def folder_results(
        self, folder: str, context: QgsProcessingContext, result: dict[str, Any]
    ) -> dict[str, Any]:
        outputs: dict[str, Any] = {self.OUTPUT_FOLDER: folder}
        for name, kind, filename in FOLDER_OUTPUTS:
            path = str(Path(folder) / filename)
            outputs[name] = path if Path(path).exists() else None
            self.add_to_load(context, path, kind, name)
        report = Path(folder) / REPORT_NAME
        outputs[self.REPORT] = str(report) if report.exists() else None
        for key, value in result.items():
            if key.upper() not in outputs and isinstance(value, (int, float, str)):
                outputs[key.upper()] = value
        return outputs


class DetectChangesAlgorithm(_FolderOutputAlgorithm):
    """``kdmsi detect``: change probability, change raster and polygons with a detector."""

    ID = "detectchanges"
    DISPLAY = "Detect changes"
    HELP = (
        "Runs a change detector from 'Train change detector' over the whole overlap of the "
        "before and after images and writes, in the output folder: change_probability.tif "
        "(0..1), change.tif (1 change, 0 none, 255 nodata), changes.gpkg (change polygons "
        "with area and mean/max probability) and run.json (inputs, parameters, timings).\n\n"
        "The images need the bands the detector was trained on. Use a GPU (device cuda) for "
        "large scenes; on a CPU it works, just slower."
    )

    def initAlgorithm(self, configuration: dict[str, Any] | None = None) -> None:  # noqa: N802
        self.add_scene_parameters()
        self.add_model_parameter(self.tr("Change detector file (.kdmsi)"))
        self.add_device_parameter()
        self.add_folder_outputs()

    def build_call(
        self,
        parameters: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> EngineCall:
        arguments = self.scene_arguments(parameters, context)
        model = self.parameterAsFile(parameters, self.MODEL, context)
        folder = layers.destination_path(
            self.parameterAsFileOutput(parameters, self.OUTPUT_FOLDER, context)
        )
        arguments += ["--model", model, "-o", folder]
        device = self.device(parameters, context)
        return EngineCall("detect", arguments, device, {self.OUTPUT_FOLDER: folder})

    def finish(
        self,
        call: EngineCall,
        result: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> dict[str, Any]:
        return self.folder_results(call.outputs[self.OUTPUT_FOLDER], context, result)


class RunChainAlgorithm(_FolderOutputAlgorithm):
    """``kdmsi run``: weak labels to change polygons in one go."""

    ID = "runchain"
    DISPLAY = "Run the whole chain"
    GROUP = "5. Chain"
    GROUP_ID = "chain"
    BACKBONE = "BACKBONE"
    WEIGHTS = "WEIGHTS"
    EPOCHS = "EPOCHS"
    DETECTOR_EPOCHS = "DETECTOR_EPOCHS"
    METHOD = "METHOD"
    SCALES = "SCALES"
    THRESHOLD = "THRESHOLD"
    AUTO_THRESHOLD = "AUTO_THRESHOLD"
    PSEUDO_SOURCE = "PSEUDO_SOURCE"
    KEEP_LABELS_OUT = "KEEP_LABELS_OUT"
    HELP = (
        "The whole KD-MSI chain on one image pair: trains the teacher/student model on the "
        "weak labels and computes its MSI change map; calibrates change vector analysis on the "
        "tiles labelled unchanged and makes pseudo labels on the tiles labelled changed; "
        "trains the change detector on them and detects changes, thresholded so that about 1 % "
        "of known unchanged land is flagged. The output folder gets the two model files, the "
        "intermediate rasters, change_probability.tif, change.tif, changes.gpkg and run.json "
        "with a trust report (how well the map agrees with your labels, and warnings).\n\n"
        "Weak labels: polygons or points with an integer field, 1 = changed, 0 = unchanged "
        "(make them with 'Create labelling grid'); you need both classes. The defaults are the "
        "settings measured best on real scenes (README); for 10-30 m imagery use 64 px tiles.\n\n"
        f"Backbone {D.BACKBONE} (the default) picks efficientnet-lite0, whose ImageNet weights "
        "ship with the engine, so it works offline on a CPU; the paper's resnet50 is picked on a "
        "GPU when its ImageNet weights are on this machine. A cancelled run keeps its training "
        "checkpoints: run again with 'Continue an interrupted training' to go on from them."
    )

    def initAlgorithm(self, configuration: dict[str, Any] | None = None) -> None:  # noqa: N802
        self.add_scene_parameters()
        self.add_labels_parameters()
        self.add_enum(self.BACKBONE, self.tr("Backbone"), BACKBONES)
        self.add_enum(self.WEIGHTS, self.tr("Start from weights"), WEIGHTS)
        self.add_int(self.EPOCHS, self.tr("KD-MSI epochs"), D.KD_EPOCHS)
        self.add_int(self.DETECTOR_EPOCHS, self.tr("Detector epochs"), D.DETECTOR_EPOCHS)
        self.add_tile_size_parameter()
        self.addParameter(
            advanced(
                QgsProcessingParameterString(
                    self.SCALES, self.tr("MSI scales"), defaultValue=D.MSI_SCALES_TEXT
                )
            )
        )
        self.add_enum(self.PSEUDO_SOURCE, self.tr("Pseudo labels from"), D.PSEUDO_SOURCES)
        self.addParameter(
            advanced(
                QgsProcessingParameterString(
                    self.THRESHOLD,
                    self.tr("Pseudo-label threshold (a number, unchanged-q, otsu or auto)"),
                    defaultValue=D.PSEUDO_THRESHOLD,
                )
            )
        )
        self.addParameter(
            advanced(
                QgsProcessingParameterBoolean(
                    self.KEEP_LABELS_OUT,
                    self.tr("Keep tiles labelled unchanged out of the change map"),
                    D.KEEP_UNCHANGED_OUT,
                )
            )
        )
        self.addParameter(
            advanced(
                QgsProcessingParameterBoolean(
                    self.AUTO_THRESHOLD, self.tr("Choose the threshold automatically"), False
                )
            )
        )
        self.add_bands_parameter()
        self.add_device_parameter()
        self.add_resume_parameter()
        self.add_folder_outputs()
        self.addOutput(QgsProcessingOutputFile("STUDENT_MODEL", self.tr("KD-MSI model")))
        self.addOutput(QgsProcessingOutputRasterLayer("MSI_PROBABILITY", self.tr("MSI map")))
        self.addOutput(QgsProcessingOutputRasterLayer("PSEUDO_LABELS", self.tr("Pseudo labels")))
        self.addOutput(QgsProcessingOutputFile("DETECTOR_MODEL", self.tr("Change detector")))

    def build_call(
        self,
        parameters: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> EngineCall:
        arguments = self.scene_arguments(parameters, context)
        arguments += self.labels_arguments(parameters, context, feedback)
        folder = layers.destination_path(
            self.parameterAsFileOutput(parameters, self.OUTPUT_FOLDER, context)
        )
        auto = self.parameterAsBoolean(parameters, self.AUTO_THRESHOLD, context)
        arguments += ["-o", folder]
        arguments += ["--backbone", self.enum_value(parameters, self.BACKBONE, BACKBONES, context)]
        arguments += ["--weights", self.enum_value(parameters, self.WEIGHTS, WEIGHTS, context)]
        tile = self.number(parameters, self.TILE_SIZE, context)
        scales = check_scales(self.parameterAsString(parameters, self.SCALES, context))
        threshold = threshold_argument(
            self.parameterAsString(parameters, self.THRESHOLD, context), D.PSEUDO_THRESHOLDS
        )
        source = self.enum_value(parameters, self.PSEUDO_SOURCE, D.PSEUDO_SOURCES, context)
        arguments += ["--kd-epochs", self.number(parameters, self.EPOCHS, context)]
        arguments += ["--detector-epochs", self.number(parameters, self.DETECTOR_EPOCHS, context)]
        arguments += ["--tile-size", tile, "--detector-tile-size", tile]
        arguments += ["--msi-scales", scales, "--pseudo-source", source]
        arguments += ["--pseudo-threshold", "auto" if auto else threshold]
        if not self.parameterAsBoolean(parameters, self.KEEP_LABELS_OUT, context):
            arguments.append("--no-keep-labels-out")
        arguments += self.bands_arguments(parameters, context)
        arguments += self.resume_arguments(parameters, context)
        device = self.device(parameters, context)
        return EngineCall("run", arguments, device, {self.OUTPUT_FOLDER: folder})

    def finish(
        self,
        call: EngineCall,
        result: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> dict[str, Any]:
        folder = call.outputs[self.OUTPUT_FOLDER]
        outputs = self.folder_results(folder, context, result)
        for name, filename in RUN_EXTRA_OUTPUTS:
            path = Path(folder) / filename
            outputs[name] = str(path) if path.exists() else None
        return outputs


class VectorizeAlgorithm(KdmsiAlgorithm):
    """``kdmsi vectorize``: change polygons from a change raster."""

    ID = "vectorize"
    DISPLAY = "Vectorise a change raster"
    GROUP = "4. Detect"
    GROUP_ID = "detect"
    CHANGE = "CHANGE"
    PROBABILITY = "PROBABILITY"
    MIN_AREA = "MIN_AREA"
    SIMPLIFY = "SIMPLIFY"
    HELP = (
        "Turns the change pixels (value 1) of a change raster into polygons with their area "
        "(m²) and, if you give the change probability raster, their mean and max probability.\n\n"
        "Minimum area drops small specks (e.g. 100 m² for 10 m imagery removes single "
        "pixels); simplify smooths the pixel edges (in map units, topology is kept)."
    )

    def initAlgorithm(self, configuration: dict[str, Any] | None = None) -> None:  # noqa: N802
        self.addParameter(
            QgsProcessingParameterRasterLayer(self.CHANGE, self.tr("Change raster (1 = change)"))
        )
        self.addParameter(
            QgsProcessingParameterRasterLayer(
                self.PROBABILITY, self.tr("Change probability (optional)"), optional=True
            )
        )
        self.add_float(self.MIN_AREA, self.tr("Minimum area (m²)"), 0.0)
        self.add_float(self.SIMPLIFY, self.tr("Simplify tolerance (map units)"), 0.0)
        self.addParameter(
            QgsProcessingParameterVectorDestination(
                self.OUTPUT,
                self.tr("Change polygons"),
                type=QgsProcessing.SourceType.TypeVectorPolygon,
            )
        )

    def build_call(
        self,
        parameters: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> EngineCall:
        change = layers.raster_source(
            self.parameterAsRasterLayer(parameters, self.CHANGE, context), self.tr("Change raster")
        )
        output = self.output_layer(parameters, self.OUTPUT, context)
        arguments = [change, "-o", output]
        probability_layer = self.parameterAsRasterLayer(parameters, self.PROBABILITY, context)
        if probability_layer is not None:
            arguments += [
                "--probability",
                layers.raster_source(probability_layer, self.tr("Change probability")),
            ]
        arguments += ["--min-area", self.number(parameters, self.MIN_AREA, context)]
        arguments += ["--simplify", self.number(parameters, self.SIMPLIFY, context)]
        return EngineCall("vectorize", arguments, outputs={self.OUTPUT: output})

    def finish(
        self,
        call: EngineCall,
        result: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> dict[str, Any]:
        self.style_on_load(context, call.outputs[self.OUTPUT], "changes")
        return dict(call.outputs)
