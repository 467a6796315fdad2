"""Training: the KD-MSI teacher/student model, and the change detector on pseudo labels."""

from __future__ import annotations

from typing import Any

from qgis.core import (
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterRasterLayer,
)

from kdmsi_qgis import layers
from kdmsi_qgis.algorithms.base import BACKBONES, MODEL_FILTER, WEIGHTS, EngineCall, KdmsiAlgorithm
from kdmsi_qgis.contract import D


class _TrainingAlgorithm(KdmsiAlgorithm):
    BACKBONE = "BACKBONE"
    WEIGHTS = "WEIGHTS"
    EPOCHS = "EPOCHS"
    BATCH_SIZE = "BATCH_SIZE"
    LEARNING_RATE = "LEARNING_RATE"
    GROUP = "2. Train"
    GROUP_ID = "train"
    DEFAULT_EPOCHS = D.KD_EPOCHS
    DEFAULT_BATCH = D.KD_BATCH_SIZE
    DEFAULT_LR = D.KD_LR

    def add_training_parameters(self) -> None:
        self.add_enum(self.BACKBONE, self.tr("Backbone"), BACKBONES)
        self.add_enum(
            self.WEIGHTS,
            self.tr("Start from weights (ResNet imagenet weights need internet once)"),
            WEIGHTS,
        )
        self.add_int(self.EPOCHS, self.tr("Epochs"), self.DEFAULT_EPOCHS)
        self.add_int(self.BATCH_SIZE, self.tr("Batch size"), self.DEFAULT_BATCH, adv=True)
        self.add_float(
            self.LEARNING_RATE, self.tr("Learning rate"), self.DEFAULT_LR, minimum=1e-7, adv=True
        )

    def training_arguments(
        self, parameters: dict[str, Any], context: QgsProcessingContext
    ) -> list[str]:
        return [
            "--backbone",
            self.enum_value(parameters, self.BACKBONE, BACKBONES, context),
            "--weights",
            self.enum_value(parameters, self.WEIGHTS, WEIGHTS, context),
            "--epochs",
            self.number(parameters, self.EPOCHS, context),
            "--batch-size",
            self.number(parameters, self.BATCH_SIZE, context),
            "--lr",
            self.number(parameters, self.LEARNING_RATE, context),
            "--tile-size",
            self.number(parameters, self.TILE_SIZE, context),
        ]

    def add_model_output(self, description: str) -> None:
        self.addParameter(
            QgsProcessingParameterFileDestination(self.OUTPUT, description, MODEL_FILTER)
        )


class TrainModelAlgorithm(_TrainingAlgorithm):
    """``kdmsi train``: teacher (CAM) and student networks from weak tile labels."""

    ID = "trainmodel"
    DISPLAY = "Train KD-MSI model"
    KD_WEIGHT = "KD_WEIGHT"
    HELP = (
        "Trains the KD-MSI teacher (tile classifier whose class activation map shows where the "
        "change is) and the student (which learns the teacher's map) from weak labels: "
        "polygons or points with an integer field, 1 = changed, 0 = unchanged. A tile is "
        "changed if it touches a changed feature, unchanged if it touches only unchanged "
        "ones; other tiles are not used. You need both classes.\n\n"
        "Make labels with 'Create labelling grid', or draw polygons. Backbone 'auto' starts "
        "from efficientnet-lite0's ImageNet weights, which ship with the engine (the paper's "
        "resnet50 is used on a GPU when its ImageNet weights are on this machine).\n\n"
        "The model file (.kdmsi) keeps both networks, the bands and their scaling; use it in "
        "'Change probability map'."
    )

    def initAlgorithm(self, configuration: dict[str, Any] | None = None) -> None:  # noqa: N802
        self.add_scene_parameters()
        self.add_labels_parameters()
        self.add_training_parameters()
        self.add_float(
            self.KD_WEIGHT,
            self.tr("Distillation weight (lambda)"),
            D.KD_WEIGHT,
            minimum=0.0,
            adv=True,
        )
        self.add_tile_size_parameter()
        self.add_bands_parameter()
        self.add_device_parameter()
        self.add_resume_parameter()
        self.add_model_output(self.tr("KD-MSI model file"))

    def build_call(
        self,
        parameters: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> EngineCall:
        arguments = self.scene_arguments(parameters, context)
        arguments += self.labels_arguments(parameters, context, feedback)
        output = self.output_file(parameters, self.OUTPUT, context)
        arguments += ["-o", output]
        arguments += self.training_arguments(parameters, context)
        arguments += ["--kd-weight", self.number(parameters, self.KD_WEIGHT, context)]
        arguments += self.bands_arguments(parameters, context)
        arguments += self.resume_arguments(parameters, context)
        device = self.device(parameters, context)
        return EngineCall("train", arguments, device, {self.OUTPUT: output})


class TrainDetectorAlgorithm(_TrainingAlgorithm):
    """``kdmsi train-detector``: Siamese DeepLabV3+ on pseudo labels."""

    ID = "traindetector"
    DISPLAY = "Train change detector"
    PSEUDO = "PSEUDO"
    DEFAULT_EPOCHS = D.DETECTOR_EPOCHS
    DEFAULT_BATCH = D.DETECTOR_BATCH_SIZE
    DEFAULT_LR = D.DETECTOR_LR
    HELP = (
        "Trains the Siamese DeepLabV3+ change detector on the pseudo labels made by 'Pseudo "
        "labels' (1 change, 0 no change, 255 ignored). The detector learns sharper, more "
        "complete change areas than the probability map it was taught from.\n\n"
        "Use the same before/after images as for the pseudo labels. Then run 'Detect "
        "changes' with the detector file, on these images or on new ones with the same bands."
    )

    def initAlgorithm(self, configuration: dict[str, Any] | None = None) -> None:  # noqa: N802
        self.add_scene_parameters()
        self.addParameter(
            QgsProcessingParameterRasterLayer(
                self.PSEUDO, self.tr("Pseudo labels (1 change, 0 none, 255 ignored)")
            )
        )
        self.add_training_parameters()
        self.add_tile_size_parameter()
        self.add_bands_parameter()
        self.add_device_parameter()
        self.add_resume_parameter()
        self.add_model_output(self.tr("Change detector file"))

    def build_call(
        self,
        parameters: dict[str, Any],
        context: QgsProcessingContext,
        feedback: QgsProcessingFeedback,
    ) -> EngineCall:
        arguments = self.scene_arguments(parameters, context)
        pseudo = layers.raster_source(
            self.parameterAsRasterLayer(parameters, self.PSEUDO, context), self.tr("Pseudo labels")
        )
        output = self.output_file(parameters, self.OUTPUT, context)
        arguments += ["--pseudo", pseudo, "-o", output]
        arguments += self.training_arguments(parameters, context)
        arguments += self.bands_arguments(parameters, context)
        arguments += self.resume_arguments(parameters, context)
        device = self.device(parameters, context)
        return EngineCall("train-detector", arguments, device, {self.OUTPUT: output})
