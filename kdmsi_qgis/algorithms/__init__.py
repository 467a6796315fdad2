"""The KD-MSI Processing algorithms, one class per engine job."""

from __future__ import annotations

from kdmsi_qgis.algorithms.detection import (
    DetectChangesAlgorithm,
    RunChainAlgorithm,
    VectorizeAlgorithm,
)
from kdmsi_qgis.algorithms.evaluation import EvaluateAlgorithm
from kdmsi_qgis.algorithms.export import ExportDetectorAlgorithm
from kdmsi_qgis.algorithms.maps import (
    ChangeProbabilityAlgorithm,
    PseudoLabelsAlgorithm,
    QuickPreviewAlgorithm,
)
from kdmsi_qgis.algorithms.prepare import LabellingGridAlgorithm
from kdmsi_qgis.algorithms.suggest import SuggestTilesAlgorithm
from kdmsi_qgis.algorithms.training import TrainDetectorAlgorithm, TrainModelAlgorithm

#: Every algorithm the provider offers, in workflow order.
ALGORITHM_CLASSES = (
    LabellingGridAlgorithm,
    QuickPreviewAlgorithm,
    TrainModelAlgorithm,
    ChangeProbabilityAlgorithm,
    PseudoLabelsAlgorithm,
    TrainDetectorAlgorithm,
    DetectChangesAlgorithm,
    RunChainAlgorithm,
    VectorizeAlgorithm,
    EvaluateAlgorithm,
    ExportDetectorAlgorithm,
    SuggestTilesAlgorithm,
)

__all__ = ["ALGORITHM_CLASSES"]
