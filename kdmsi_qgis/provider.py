"""The Processing provider ``kdmsi``."""

from __future__ import annotations

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtCore import QCoreApplication
from qgis.PyQt.QtGui import QIcon

from kdmsi_qgis import layers
from kdmsi_qgis.algorithms import ALGORITHM_CLASSES

PROVIDER_ID = "kdmsi"


class KdmsiProvider(QgsProcessingProvider):
    """Offers the KD-MSI jobs as Processing algorithms (toolbox, models, batch, qgis_process)."""

    def id(self) -> str:
        return PROVIDER_ID

    def name(self) -> str:
        return QCoreApplication.translate("KdmsiProvider", "KD-MSI change detection")

    def longName(self) -> str:  # noqa: N802 (QGIS API)
        return QCoreApplication.translate(
            "KdmsiProvider", "KD-MSI weakly supervised change detection"
        )

    def icon(self) -> QIcon:
        return QIcon(str(layers.resource_path("icons", "kdmsi.svg")))

    def svgIconPath(self) -> str:  # noqa: N802
        return str(layers.resource_path("icons", "kdmsi.svg"))

    def loadAlgorithms(self) -> None:  # noqa: N802
        for cls in ALGORITHM_CLASSES:
            self.addAlgorithm(cls())

    def supportsNonFileBasedOutput(self) -> bool:  # noqa: N802
        """The engine writes files: temporary outputs become temporary files."""
        return False

    def supportedOutputRasterLayerExtensions(self) -> list[str]:  # noqa: N802
        return ["tif"]

    def supportedOutputVectorLayerExtensions(self) -> list[str]:  # noqa: N802
        return ["gpkg"]

    def defaultVectorFileExtension(self, hasGeometry: bool = True) -> str:  # noqa: N802, N803
        return "gpkg"

    def defaultRasterFileExtension(self) -> str:  # noqa: N802
        return "tif"
