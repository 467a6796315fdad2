"""The plugin object QGIS creates: provider, dock widget, menu and toolbar entries."""

from __future__ import annotations

import logging
from typing import Any

from qgis.core import QgsApplication
from qgis.PyQt.QtCore import QCoreApplication, Qt
from qgis.PyQt.QtGui import QIcon
from qgis.PyQt.QtWidgets import QAction

from kdmsi_qgis import layers
from kdmsi_qgis.provider import KdmsiProvider

logger = logging.getLogger(__name__)

MENU = "&KD-MSI change detection"


def tr(text: str) -> str:
    return QCoreApplication.translate("KdmsiPlugin", text)


class KdmsiPlugin:
    """QGIS plugin entry: ``initProcessing`` (also headless), ``initGui`` and ``unload``."""

    def __init__(self, iface: Any) -> None:
        self.iface = iface
        self.provider: KdmsiProvider | None = None
        self.dock: Any = None
        self.actions: list[QAction] = []
        self.toolbar: Any = None

    # ------------------------------------------------------------------ Processing

    def initProcessing(self) -> None:  # noqa: N802 (QGIS API)
        """Register the ``kdmsi`` provider (QGIS calls this for qgis_process too)."""
        if self.provider is None:
            self.provider = KdmsiProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    # ------------------------------------------------------------------ GUI

    def initGui(self) -> None:  # noqa: N802
        self.initProcessing()
        if self.iface is None:
            return
        icon = QIcon(str(layers.resource_path("icons", "kdmsi.svg")))
        main_window = self.iface.mainWindow()
        show_dock = QAction(icon, tr("KD-MSI change detection"), main_window)
        show_dock.setObjectName("kdmsiShowDock")
        show_dock.setToolTip(tr("Show the KD-MSI change detection panel"))
        show_dock.triggered.connect(self.show_dock)
        check_env = QAction(icon, tr("Check environment"), main_window)
        check_env.setObjectName("kdmsiCheckEnvironment")
        check_env.setToolTip(tr("Report Python, torch, device/GPU and what is missing"))
        check_env.triggered.connect(self.check_environment)
        self.actions = [show_dock, check_env]
        self.toolbar = self.iface.addToolBar(tr("KD-MSI"))
        self.toolbar.setObjectName("kdmsiToolbar")
        self.toolbar.addAction(show_dock)
        for action in self.actions:
            self.iface.addPluginToMenu(MENU, action)

    def unload(self) -> None:
        for action in self.actions:
            if self.iface is not None:
                self.iface.removePluginMenu(MENU, action)
            action.deleteLater()
        self.actions = []
        if self.toolbar is not None:
            self.toolbar.deleteLater()
            self.toolbar = None
        if self.dock is not None:
            self.dock.shutdown()
            if self.iface is not None:
                self.iface.removeDockWidget(self.dock)
            self.dock.deleteLater()
            self.dock = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None

    def ensure_dock(self) -> Any:
        """The dock widget, created on first use."""
        if self.dock is None:
            from kdmsi_qgis.dock import KdmsiDock

            self.dock = KdmsiDock(self.iface)
            self.iface.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.dock)
        return self.dock

    def show_dock(self) -> None:
        dock = self.ensure_dock()
        dock.show()
        dock.raise_()

    def check_environment(self) -> None:
        dock = self.ensure_dock()
        dock.show()
        dock.check_environment()
