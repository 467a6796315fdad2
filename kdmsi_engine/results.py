"""What each job returns: typed records (``TypedDict``), one per job.

A job's result is a JSON object: the command line prints it (``--progress json`` sends it as the
``result`` event), the QGIS plugin reads it from there, and ``run``/``batch`` write theirs as
``run.json``/``batch.json``. Plain dictionaries at run time, so they cross those boundaries
unchanged; typed here so that ``mypy`` checks every key a job writes and every key a caller
reads. ``total=False`` marks results whose keys depend on the options.
"""

from __future__ import annotations

from typing import Any, TypedDict


class GridResult(TypedDict):
    """``kdmsi grid``: the labelling grid written."""

    grid: str
    tiles: int
    crs: str | None
    width: int
    height: int
    resolution: list[float]


class LabelsResult(TypedDict):
    """``kdmsi labels``: the tile labels written and their counts."""

    output: str
    tiles: int
    changed: int
    unchanged: int
    unlabelled: int


class CvaResult(TypedDict):
    """``kdmsi cva``: the no-training change map (and change raster)."""

    output: str
    change: str | None
    method: str
    otsu_threshold: float | None
    threshold: float
    threshold_method: str
    changed_fraction: float
    bands: Any
    scaling: Any
    grid: Any
    seconds: float


class EvidenceResult(TypedDict):
    """The calibrated change vector analysis of the chain (``change_evidence.tif``)."""

    output: str
    method: str
    calibration: str
    statistics: dict[str, Any]
    seconds: float


class InferResult(TypedDict):
    """``kdmsi infer``: a KD-MSI change-probability map."""

    output: str
    method: str
    scales: list[float]
    tile_size: int
    overlap: int
    device: str
    grid: dict[str, Any]
    seconds: float


class TrainResult(TypedDict, total=False):
    """``kdmsi train``: the KD-MSI model; ``networks`` and ``metadata`` stay in Python."""

    model: str
    tiles: int
    changed_tiles: int
    unchanged_tiles: int
    epochs: int
    device: str
    precision: str
    seconds: float
    final_loss: float | None
    teacher_separation: dict[str, Any] | None
    processes: int
    per_process_batch: int | None
    global_batch: int | None
    networks: dict[str, Any]
    metadata: dict[str, Any]


class DetectorTrainResult(TypedDict):
    """``kdmsi train-detector``: the detector model."""

    model: str
    tiles: int
    epochs: int
    final_loss: float | None
    device: str
    seconds: float
    processes: int
    per_process_batch: int | None
    global_batch: int | None


class PseudoResult(TypedDict, total=False):
    """``kdmsi pseudo``: the pseudo-label raster; ``threshold_info`` for automatic thresholds."""

    output: str
    threshold: float
    threshold_method: str
    tile_size: int
    tiles: dict[str, int]
    held_out_tiles: int
    pixels: dict[str, int]
    threshold_info: dict[str, Any]


class VectorizeResult(TypedDict):
    """``kdmsi vectorize``: the change polygons written."""

    polygons: int
    change_area_m2: float
    crs: str | None
    layer: str
    #: the GeoPackage written
    changes: str
