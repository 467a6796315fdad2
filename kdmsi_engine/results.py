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


class Metrics(TypedDict, total=False):
    """The paper's change metrics from confusion counts (``nochange_*``: the other class)."""

    oa: float | None
    precision: float | None
    recall: float | None
    f1: float | None
    iou: float | None
    nochange_precision: float | None
    nochange_recall: float | None
    nochange_f1: float | None
    nochange_iou: float | None
    miou: float | None
    mean_f1: float | None
    fp_share: float | None
    fn_share: float | None
    counts: dict[str, int]
    pixels: int
    change_fraction_truth: float | None
    change_fraction_pred: float | None


class EvaluateResult(Metrics, total=False):
    """``kdmsi evaluate``: metrics of a map against a truth raster (``sweep``/``best`` with a
    threshold sweep)."""

    pred: str
    truth: str
    pred_kind: str
    threshold: float | None
    truth_reprojected: bool
    sweep: list[dict[str, Any]]
    best: dict[str, Any]


class SuggestResult(TypedDict, total=False):
    """``kdmsi suggest``: the tiles to label next (``tiles``: their ids, best first)."""

    output: str
    layer: str
    suggested: int
    requested: int
    candidates: int
    changed: int
    unchanged: int
    unlabelled: int
    threshold: float
    threshold_method: str
    measure: str
    measure_formula: str
    explore: float
    random_tiles: int
    tile_size: int
    min_gap: float
    tiles: list[int]


class ExportResult(TypedDict, total=False):
    """``kdmsi export``: the ONNX file (and VRT), checked against torch on a probe tile."""

    onnx: str
    vrt: str
    verified_max_abs_diff: float
    probe: str
    model: str
    tile_size: int
    opset: int
    bands: list[int]
    scaling: str
    resolution_cm: float | None
    vrt_resolution: list[float]
    metadata: dict[str, Any]


class RunRecord(TypedDict, total=False):
    """``kdmsi run``: the record written to ``run.json`` (``metrics`` with a truth raster)."""

    job: str
    status: str
    scene: str
    inputs: dict[str, Any]
    parameters: dict[str, Any]
    backbone_choice: dict[str, str]
    device: str
    versions: dict[str, str]
    grid: dict[str, Any]
    stages: dict[str, Any]
    trust: dict[str, Any] | None
    polygons: int
    change_area_m2: float
    outputs: dict[str, str]
    metrics: dict[str, Any]
    timings: dict[str, float]


class BatchRecord(TypedDict, total=False):
    """``kdmsi batch``: the record written to ``batch.json`` (per scene: ``complete``,
    ``skipped`` or ``failed`` with the reason; ``cluster`` when run on Dask)."""

    job: str
    status: str
    manifest: str
    parameters: dict[str, Any]
    device: str
    versions: dict[str, str]
    training: dict[str, Any]
    scenes: list[dict[str, Any]]
    cluster: dict[str, Any]
    counts: dict[str, int]
    seconds: float
    batch_record: str


class DetectRecord(TypedDict, total=False):
    """``kdmsi detect``: the record written to ``run.json`` (``fusion`` when the map is fused
    with the calibrated change vector analysis)."""

    job: str
    status: str
    inputs: dict[str, Any]
    scene: dict[str, Any]
    grid: dict[str, Any]
    model: dict[str, Any]
    parameters: dict[str, Any]
    device: str
    versions: dict[str, str]
    timings: dict[str, float]
    fusion: dict[str, Any] | None
    polygons: int
    change_area_m2: float
    outputs: dict[str, str]
