"""One exception hierarchy for everything the engine refuses.

Every error a user can cause derives from :class:`KdmsiError`. Its message is one line that says
what is wrong and what to do; the command line prints it and exits non-zero, the QGIS plugin
shows it. Anything that is not a ``KdmsiError`` is a bug.

Messages describe parameters in words ("the learning rate must be..."), never as command-line
flags, because a QGIS user never sees the flags. An error names the engine parameters it is
about in ``parameters`` (the names of the job's keyword arguments, e.g. ``("lr",)``); the command
line adds each one's flag when it prints the message (``[--lr]``), the plugin its own label.
"""

from __future__ import annotations

from collections.abc import Iterable


class KdmsiError(Exception):
    """Base class: a problem with the user's input, files or environment.

    Args:
        message: one line: what is wrong and what to do.
        parameters: the engine parameters (keyword-argument names) the message is about.
    """

    exit_code = 2

    def __init__(self, message: str = "", *, parameters: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.parameters: tuple[str, ...] = tuple(parameters)


class InputError(KdmsiError):
    """A parameter or combination of parameters is invalid."""


class RasterError(KdmsiError):
    """A raster is missing, unreadable, not georeferenced or otherwise unusable."""


class GridError(RasterError):
    """The two dates cannot be put on one grid (no overlap, no valid pixels, too small)."""


class LabelError(KdmsiError):
    """A weak-label file or folder dataset is unusable (no features, bad field, one class)."""


class ManifestError(KdmsiError):
    """A scene manifest is unusable (missing columns or files, duplicate names)."""


class ModelFileError(KdmsiError):
    """A model file is not ours, was altered, or does not fit the data."""


class OutputError(KdmsiError):
    """An output cannot be written (exists and may not be replaced, not writable, disk full)."""


class TrainingError(KdmsiError):
    """Training cannot go on (the loss became NaN or infinite)."""


class DeviceError(KdmsiError):
    """The requested compute device is not available."""


class CancelledError(KdmsiError):
    """The job was cancelled by the user; outputs of this job were not written."""

    exit_code = 130
