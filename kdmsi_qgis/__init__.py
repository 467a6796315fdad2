"""KD-MSI change detection for QGIS.

QGIS calls :func:`classFactory` with its interface object. The plugin adds the Processing
provider ``kdmsi``, a dock widget, menu and toolbar entries, and a "Check environment" action.
The engine runs in a separate Python process (see :mod:`kdmsi_qgis.worker`); this package never
imports torch.
"""

from __future__ import annotations


def classFactory(iface):  # noqa: N802 (QGIS API), ANN001
    """Create the plugin for QGIS (``iface`` may be ``None`` in ``qgis_process``)."""
    from kdmsi_qgis.plugin import KdmsiPlugin

    return KdmsiPlugin(iface)
