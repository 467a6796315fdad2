"""KD-MSI change detection engine.

Weakly supervised change detection for pairs of georeferenced rasters: knowledge distillation
from a CAM teacher to a sigmoid student, multiscale sigmoid inference (MSI) to make pseudo pixel
labels, and a Siamese DeepLabV3+ change detector trained on them. The engine has no QGIS imports;
the QGIS plugin runs it in a separate worker process through the ``kdmsi`` command line.
Importing it changes no process setting: the command line does that
(:func:`kdmsi_engine.environment.configure_process`).
"""

from __future__ import annotations

__version__ = "0.1.0"
