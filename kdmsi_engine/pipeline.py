"""The whole chain for one scene (:func:`run_scene`) and for many (:func:`batch_scenes`).

``run``: weak labels -> KD-MSI teacher/student (``student.kdmsi``) -> MSI change probability
(``msi_probability.tif``) -> pseudo labels (``pseudo_labels.tif``) -> Siamese DeepLabV3+
(``detector.kdmsi``) -> detection (``change_probability.tif``, ``change.tif``,
``changes.gpkg``) and ``run.json`` (inputs, parameters, versions, device, timings per stage,
and with a truth raster the metrics of the MSI map, the pseudo labels and the final change
map). Every file stays in ``OUTDIR``; all outputs are checked before the first stage starts.

``batch``: a manifest (``name,before,after,labels``). Missing files are refused before any work
(one line, nothing written); then every scene is opened, and a scene that cannot be used
(unreadable or truncated raster, no overlap, bad labels) is reported and left out. KD-MSI and the detector are trained once, over all
labelled scenes (``OUTDIR/student.kdmsi``, ``OUTDIR/detector.kdmsi``; MSI maps and pseudo labels
in ``OUTDIR/<name>/``), then every scene is detected into ``OUTDIR/<name>/`` with its own
``run.json``. A scene that fails is reported (``batch.json`` and the progress log) and the
others go on. A rerun continues: models and per-scene files that exist are reused (they are
written atomically, so a file that exists is complete), and scenes whose ``run.json`` says
``complete`` are skipped. ``overwrite=True`` starts again from scratch.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdmsi_engine import defaults
from kdmsi_engine.atomic import check_output, check_output_dir, write_text_atomic
from kdmsi_engine.detect import OUTPUT_NAMES, detect_scene, software_versions
from kdmsi_engine.device import describe_device, resolve_device
from kdmsi_engine.errors import CancelledError, InputError, KdmsiError, RasterError
from kdmsi_engine.progress import Progress
from kdmsi_engine.training.common import checkpoint_path

logger = logging.getLogger(__name__)

STUDENT_NAME = defaults.STUDENT_NAME
MSI_NAME = defaults.MSI_NAME
EVIDENCE_NAME = defaults.EVIDENCE_NAME
PSEUDO_NAME = defaults.PSEUDO_NAME
DETECTOR_NAME = defaults.DETECTOR_NAME
BATCH_RECORD = "batch.json"
TRAIN_MANIFEST = "training_scenes.csv"


@dataclass
class RunConfig:
    """Parameters of the whole chain; every default comes from :mod:`kdmsi_engine.defaults`."""

    # stage 1: KD-MSI
    kd_backbone: str = defaults.BACKBONE
    kd_weights: str = defaults.WEIGHTS_DEFAULT
    kd_epochs: int = defaults.KD_EPOCHS
    kd_batch_size: int = defaults.KD_BATCH_SIZE
    kd_lr: float = defaults.KD_LR
    kd_weight: float = defaults.KD_WEIGHT
    tile_size: int = defaults.TILE_SIZE
    label_field: str = defaults.LABEL_FIELD
    unmarked_unchanged: bool = False
    # MSI and pseudo labels
    msi_scales: tuple[float, ...] = defaults.MSI_SCALES
    pseudo_source: str = defaults.PSEUDO_SOURCE
    pseudo_threshold: float | str = defaults.PSEUDO_THRESHOLD
    unchanged_quantile: float = defaults.UNCHANGED_QUANTILE
    calibration_fraction: float = defaults.CALIBRATION_FRACTION
    # stage 2: detector
    detector_backbone: str = defaults.BACKBONE
    detector_weights: str = defaults.WEIGHTS_DEFAULT
    detector_epochs: int = defaults.DETECTOR_EPOCHS
    detector_batch_size: int = defaults.DETECTOR_BATCH_SIZE
    detector_lr: float = defaults.DETECTOR_LR
    detector_tile_size: int | None = defaults.DETECTOR_TILE_SIZE
    min_labelled: float = defaults.MIN_LABELLED
    detector_class_weights: str = defaults.DETECTOR_CLASS_WEIGHTS
    detector_from_student: bool = defaults.DETECTOR_FROM_STUDENT
    # detection and polygons
    threshold: float | str = defaults.RUN_THRESHOLD
    detect_quantile: float = defaults.DETECT_QUANTILE
    fuse_evidence: bool = defaults.FUSE_EVIDENCE
    evidence_gate: float = defaults.EVIDENCE_GATE
    fusion_detector_weight: float = defaults.FUSION_DETECTOR_WEIGHT
    keep_unchanged_out: bool = defaults.KEEP_UNCHANGED_OUT
    detect_tile_size: int | None = None
    detect_scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    min_area: float = defaults.MIN_AREA
    simplify: float = defaults.SIMPLIFY
    fill_holes: float = defaults.FILL_HOLES
    # common
    bands: str | None = defaults.BANDS
    batch_size: int = defaults.INFER_BATCH_SIZE
    seed: int = defaults.SEED

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["msi_scales"] = list(self.msi_scales)
        data["detect_scales"] = list(self.detect_scales)
        return data

    def check(self) -> None:
        from kdmsi_engine.pseudo import parse_threshold
        from kdmsi_engine.thresholds import parse_threshold_spec

        self.threshold = parse_threshold_spec(self.threshold)
        self.pseudo_threshold = parse_threshold(self.pseudo_threshold)
        if self.pseudo_source not in defaults.PSEUDO_SOURCES:
            raise InputError(
                f"pseudo-label source {self.pseudo_source!r} unknown; choose one of "
                f"{', '.join(defaults.PSEUDO_SOURCES)}"
            )
        if not 0.0 <= float(self.calibration_fraction) < 1.0:
            raise InputError(
                f"calibration fraction {self.calibration_fraction} must be in [0, 1), e.g. 0.2"
            )
        if not 0.0 <= float(self.fusion_detector_weight) <= 1.0:
            raise InputError(
                f"fusion weight {self.fusion_detector_weight} must be in [0, 1], e.g. 0.25"
            )
        if not 0.0 < float(self.evidence_gate) <= 1.0:
            raise InputError(f"evidence gate {self.evidence_gate} must be in (0, 1], e.g. 0.1")
        for name in ("unchanged_quantile", "detect_quantile"):
            if not 0.5 <= float(getattr(self, name)) < 1.0:
                raise InputError(
                    f"{name.replace('_', ' ')} {getattr(self, name)} must be in [0.5, 1), e.g. 0.99"
                )
        for name in ("kd_epochs", "detector_epochs", "kd_batch_size", "detector_batch_size"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name.replace('_', ' ')} must be at least 1")

    def resolve(self, device: Any) -> dict[str, str]:
        """Turn ``auto`` backbones into the one this machine can start from; say which."""
        from kdmsi_engine.models.backbones import resolve_backbone

        notes: dict[str, str] = {}
        for stage in ("kd", "detector"):
            name = getattr(self, f"{stage}_backbone")
            weights = str(getattr(self, f"{stage}_weights"))
            chosen, reason = resolve_backbone(name, weights, device)
            if chosen != name:
                setattr(self, f"{stage}_backbone", chosen)
                notes[stage] = reason
        return notes


def _metrics(pred: Path, truth: Path, *, threshold: float | None = None) -> dict[str, Any]:
    from kdmsi_engine.metrics import evaluate_rasters

    result = evaluate_rasters(pred, truth, threshold=threshold)
    return {k: v for k, v in result.items() if k not in ("sweep", "pred", "truth")}


def _timed(timings: dict[str, float], name: str, func: Callable[[], Any]) -> Any:
    started = time.monotonic()
    try:
        return func()
    finally:
        timings[name] = round(time.monotonic() - started, 2)


def run_scene(
    before: str | os.PathLike[str],
    after: str | os.PathLike[str],
    labels: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    config: RunConfig | None = None,
    truth: str | os.PathLike[str] | None = None,
    name: str | None = None,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run the whole chain on one scene pair with weak labels; write everything to ``out_dir``.

    Args:
        before, after: the two dates.
        labels: weak-label vector file (field ``config.label_field``: 1 changed, 0 unchanged).
        out_dir: output folder (created if missing).
        config: parameters (:class:`RunConfig`; defaults of :mod:`kdmsi_engine.defaults`).
        truth: optional pixel truth raster (change > 0, nodata excluded) for metrics.
        name: scene name (polygons' ``scene`` attribute; default: before file's stem).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        resume: continue an interrupted run: stage files that exist are reused, training
            continues from its checkpoint, the remaining outputs are (re)written.
        overwrite: replace existing outputs (start again).
        progress: progress and cancellation.

    Returns:
        the run record written to ``OUTDIR/run.json``, with its ``trust`` report.
    """
    progress = progress or Progress()
    config = config or RunConfig()
    config.check()
    for path, what in ((before, "before raster"), (after, "after raster"), (labels, "labels")):
        if not Path(path).is_file():
            raise (RasterError if "raster" in what else InputError)(
                f"{what} {path} does not exist; check the path"
            )
    if truth is not None and not Path(truth).is_file():
        raise RasterError(f"truth raster {truth} does not exist; check the path")
    folder = check_output_dir(out_dir)
    paths = {
        "student": folder / STUDENT_NAME,
        "msi_probability": folder / MSI_NAME,
        "change_evidence": folder / EVIDENCE_NAME,
        "pseudo_labels": folder / PSEUDO_NAME,
        "detector": folder / DETECTOR_NAME,
        "detector_probability": folder / defaults.DETECTOR_PROBABILITY_NAME,
        **{key: folder / file for key, file in OUTPUT_NAMES.items()},
    }
    for path in paths.values():
        # --resume continues an interrupted run: finished stage files are reused, the rest redone.
        check_output(path, overwrite=overwrite or resume)
    torch_device = resolve_device(device)
    choices = config.resolve(torch_device)
    for stage, reason in choices.items():
        progress.log(f"{stage} backbone: {reason}")
    scene_name = name or Path(before).stem
    timings: dict[str, float] = {}
    started = time.monotonic()
    stages, scene_tiles = _train_stages(
        [(scene_name, Path(before), Path(after), Path(labels), folder)],
        paths["student"],
        paths["detector"],
        config,
        device=device,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        timings=timings,
        reuse=resume and not overwrite,
    )
    tiles, held_out = scene_tiles[scene_name]
    detection = _timed(
        timings,
        "detect_s",
        lambda: _detect(before, after, paths["detector"], folder, config, tiles, held_out,
                        scene_name, device=device, overwrite=overwrite or resume,
                        progress=progress),
    )  # fmt: skip
    from kdmsi_engine.trust import trust_report

    trust = trust_report(
        paths["change_probability"],
        detection["parameters"]["threshold"],
        tiles,
        quantile=config.detect_quantile,
        teacher=stages.get("kd", {}).get("teacher_separation"),
    )
    for warning in trust["warnings"]:
        progress.log(f"warning: {warning}", warning=warning)
    record: dict[str, Any] = {
        "job": "run",
        "status": "complete",
        "scene": scene_name,
        "inputs": {
            "before": str(Path(before).absolute()),
            "after": str(Path(after).absolute()),
            "labels": str(Path(labels).absolute()),
            "truth": str(Path(truth).absolute()) if truth is not None else None,
        },
        "parameters": config.to_dict(),
        "backbone_choice": choices,
        "device": describe_device(torch_device),
        "versions": software_versions(),
        "grid": detection["grid"],
        "stages": {**stages, "detect": _detect_summary(detection)},
        "trust": trust,
        "polygons": detection["polygons"],
        "change_area_m2": detection["change_area_m2"],
        "outputs": {key: str(path) for key, path in paths.items() if path.exists()},
    }
    if truth is not None:
        progress.stage("metrics", message="comparing with the truth raster")
        record["metrics"] = _timed(
            timings,
            "metrics_s",
            lambda: _truth_metrics(paths, Path(truth), stages, detection["parameters"]),
        )
    timings["total_s"] = round(time.monotonic() - started, 2)
    record["timings"] = timings
    write_text_atomic(
        paths["run"], json.dumps(record, indent=2, default=str), overwrite=overwrite or resume
    )
    progress.log(f"outputs in {folder}")
    return record


def _detect(
    before: str | os.PathLike[str],
    after: str | os.PathLike[str],
    detector: Path,
    folder: Path,
    config: RunConfig,
    tiles: Any,
    held_out: Any,
    scene_name: str,
    *,
    device: str,
    overwrite: bool,
    progress: Progress,
    threshold: float | str | None = None,
) -> dict[str, Any]:
    """The chain's detection of one scene: its tile labels set the threshold and keep-out.

    The threshold ``unchanged-q`` is taken on the unchanged tiles the detector did not train on
    (``held_out``) when there are any; they also calibrate the fusion of the detector's map
    with the calibrated change vector analysis (:mod:`kdmsi_engine.fusion`).
    """
    calibration = tiles
    if tiles is not None and held_out is not None and held_out.any():
        calibration = tiles.only(held_out)
    evidence = folder / EVIDENCE_NAME
    return detect_scene(
        before,
        after,
        detector,
        folder,
        tile_size=config.detect_tile_size,
        batch_size=config.batch_size,
        threshold=config.threshold if threshold is None else threshold,
        scales=config.detect_scales,
        flip=config.flip,
        min_area=config.min_area,
        simplify=config.simplify,
        fill_holes=config.fill_holes,
        scene_name=scene_name,
        device=device,
        overwrite=overwrite,
        write_record=False,
        unchanged_tiles=tiles,
        calibration_tiles=calibration,
        keep_unchanged_out=config.keep_unchanged_out,
        unchanged_quantile=config.detect_quantile,
        fuse_with=evidence if config.fuse_evidence and tiles is not None else None,
        fuse_weight=config.fusion_detector_weight,
        gate_rate=config.evidence_gate,
        progress=progress,
    )


def _detect_summary(detection: dict[str, Any]) -> dict[str, Any]:
    return {
        "parameters": detection["parameters"],
        "fusion": detection.get("fusion"),
        "timings": detection["timings"],
        "polygons": detection["polygons"],
    }


def _truth_metrics(
    paths: dict[str, Path], truth: Path, stages: dict[str, Any], detect: dict[str, Any]
) -> dict[str, Any]:
    """Metrics of the final map, the detector's map, the MSI map, the evidence, pseudo labels."""
    threshold = stages.get("pseudo", {}).get("threshold")
    pseudo_threshold = float(threshold) if isinstance(threshold, (int, float)) else 0.5
    source = stages.get("pseudo", {}).get("source", "msi")
    out = {
        "change": _metrics(paths["change"], truth),
        "change_probability": _metrics(
            paths["change_probability"], truth, threshold=float(detect["threshold"])
        ),
        "msi_probability": _metrics(
            paths["msi_probability"],
            truth,
            threshold=pseudo_threshold if source == "msi" else 0.5,
        ),
        "pseudo_labels": _metrics(paths["pseudo_labels"], truth),
        "note": (
            "pixels where the truth raster has data only; pseudo labels: labelled pixels; "
            "change_probability at the chain's threshold, without keeping unchanged tiles out"
        ),
    }
    detector_map = paths["change"].parent / defaults.DETECTOR_PROBABILITY_NAME
    if detector_map.is_file():
        out["detector_probability"] = _metrics(detector_map, truth, threshold=0.5)
    if paths["change_evidence"].is_file():
        out["change_evidence"] = _metrics(
            paths["change_evidence"],
            truth,
            threshold=pseudo_threshold if source == "evidence" else 0.5,
        )
    return out


def _tiles_and_evidence(
    name: str,
    before: Path,
    after: Path,
    labels: Path,
    folder: Path,
    config: RunConfig,
    *,
    overwrite: bool,
    reuse: bool,
    progress: Progress,
) -> tuple[Any, Any, dict[str, Any]]:
    """The scene's tile labels (the touching rule on the KD tile grid), the tiles held out of
    the detector's training (bool per tile, or ``None``) and, when the pseudo labels or the
    final map use it, the calibrated change vector analysis (``EVIDENCE_NAME``), fitted on the
    unchanged tiles that are not held out.
    """
    from kdmsi_engine.cva import calibrated_cva_scene
    from kdmsi_engine.data.labels import labelled_tiles
    from kdmsi_engine.data.scene import ScenePair
    from kdmsi_engine.pseudo import TileLabels

    evidence_path = folder / EVIDENCE_NAME
    needed = config.pseudo_source != "msi" or config.fuse_evidence
    info: dict[str, Any] = {}
    with ScenePair.open(before, after, bands=config.bands, name=name) as scene:
        frame = labelled_tiles(
            scene,
            labels,
            tile_size=config.tile_size,
            field=config.label_field,
            unmarked_unchanged=config.unmarked_unchanged,
            progress=progress,
        )
        tiles = TileLabels.from_frame(frame)
        held_out = (
            tiles.held_out_split(config.calibration_fraction, config.seed)
            if config.threshold == "unchanged-q"
            else None
        )
        fitted = tiles if held_out is None else tiles.without(held_out)
        if (fitted.label == 0).sum() == 0:
            fitted = tiles
        if needed and not (reuse and evidence_path.is_file()):
            info = calibrated_cva_scene(
                scene, fitted, evidence_path, overwrite=overwrite, progress=progress
            )
    return tiles, held_out, info


def _pseudo_source(folder: Path, config: RunConfig, progress: Progress) -> Path:
    """The map the pseudo labels threshold: MSI, the calibrated CVA, or their geometric mean."""
    from kdmsi_engine.pseudo import combine_maps

    msi_path, evidence_path = folder / MSI_NAME, folder / EVIDENCE_NAME
    if config.pseudo_source == "msi":
        return msi_path
    if config.pseudo_source == "evidence":
        return evidence_path
    combined = folder / "pseudo_score.tif"
    combine_maps(msi_path, evidence_path, combined, overwrite=True, progress=progress)
    return combined


def _train_stages(
    scenes: list[tuple[str, Path, Path, Path, Path]],
    student_path: Path,
    detector_path: Path,
    config: RunConfig,
    *,
    device: str,
    resume: bool,
    overwrite: bool,
    progress: Progress,
    timings: dict[str, float],
    manifest: Path | None = None,
    reuse: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """KD training, MSI, tile labels, evidence and pseudo labels per scene, detector training.

    ``scenes``: ``(name, before, after, labels, folder)``; MSI maps, evidence and pseudo labels
    go to ``folder``. With ``reuse``, outputs that exist are kept (batch reruns).

    Returns:
        the stage records and, per scene, its :class:`~kdmsi_engine.pseudo.TileLabels` and the
        unchanged tiles held out of the detector's training (bool per tile, or ``None``).
    """
    from kdmsi_engine.inference.scene import infer_scene
    from kdmsi_engine.pseudo import make_pseudo_labels
    from kdmsi_engine.training.detector import (
        DetectorConfig,
        DetectorScene,
        train_detector_scenes,
    )
    from kdmsi_engine.training.kd import train_kdmsi

    stages: dict[str, Any] = {}
    if reuse and student_path.is_file():
        progress.log(f"reusing {student_path}")
        stages["kd"] = {"model": str(student_path), "reused": True}
    else:
        source: dict[str, Any]
        if manifest is not None:
            source = {"scenes": manifest}
        else:
            name, before, after, labels, _ = scenes[0]
            source = {"before": before, "after": after, "labels": labels}
        stages["kd"] = _timed(
            timings,
            "kd_s",
            lambda: train_kdmsi(
                **source,
                out=student_path,
                label_field=config.label_field,
                unmarked_unchanged=config.unmarked_unchanged,
                backbone=config.kd_backbone,
                weights=config.kd_weights,
                epochs=config.kd_epochs,
                batch_size=config.kd_batch_size,
                lr=config.kd_lr,
                kd_weight=config.kd_weight,
                tile_size=config.tile_size,
                bands=config.bands,
                seed=config.seed,
                resume=resume and checkpoint_path(student_path).is_file(),
                device=device,
                overwrite=overwrite or reuse,
                progress=progress,
            ),
        )
    msi_s = pseudo_s = 0.0
    detector_scenes = []
    pseudo_records: dict[str, Any] = {}
    scene_tiles: dict[str, Any] = {}
    for name, before, after, labels, folder in scenes:
        msi_path, pseudo_path = folder / MSI_NAME, folder / PSEUDO_NAME
        mark = time.monotonic()
        if not (reuse and msi_path.is_file()):
            infer_scene(
                before,
                after,
                student_path,
                msi_path,
                method="msi",
                scales=config.msi_scales,
                tile_size=config.tile_size,
                batch_size=config.batch_size,
                device=device,
                overwrite=overwrite or reuse,
                progress=progress,
            )
        msi_s += time.monotonic() - mark
        mark = time.monotonic()
        tiles, held_out, evidence = _tiles_and_evidence(
            name, before, after, labels, folder, config,
            overwrite=overwrite or reuse, reuse=reuse, progress=progress,
        )  # fmt: skip
        scene_tiles[name] = (tiles, held_out)
        score_path = _pseudo_source(folder, config, progress)
        info = {"source": config.pseudo_source, **({"evidence": evidence} if evidence else {})}
        if not (reuse and pseudo_path.is_file()):
            pseudo_records[name] = {
                **info,
                **make_pseudo_labels(
                    score_path,
                    pseudo_path,
                    tile_labels=tiles,
                    threshold=config.pseudo_threshold,
                    tile_size=config.tile_size,
                    quantile=config.unchanged_quantile,
                    held_out=held_out,
                    overwrite=overwrite or reuse,
                    progress=progress,
                ),
            }
        else:
            pseudo_records[name] = {"output": str(pseudo_path), "reused": True}
        pseudo_s += time.monotonic() - mark
        detector_scenes.append(DetectorScene(name, before, after, pseudo_path))
    timings["msi_s"] = round(msi_s, 2)
    timings["pseudo_s"] = round(pseudo_s, 2)
    stages["msi"] = {"scales": list(config.msi_scales), "tile_size": config.tile_size}
    if len(scenes) == 1:
        stages["pseudo"] = _plain(next(iter(pseudo_records.values())))
    else:
        stages["pseudo"] = {"scenes": {k: _plain(v) for k, v in pseudo_records.items()}}
    if reuse and detector_path.is_file():
        progress.log(f"reusing {detector_path}")
        stages["detector"] = {"model": str(detector_path), "reused": True}
    else:
        detector_config = DetectorConfig(
            backbone=config.detector_backbone,
            weights=str(config.detector_weights),
            tile_size=int(config.detector_tile_size or config.tile_size),
            min_labelled=config.min_labelled,
            epochs=config.detector_epochs,
            batch_size=config.detector_batch_size,
            lr=config.detector_lr,
            seed=config.seed,
            class_weights=config.detector_class_weights,
            init_from=(
                str(student_path)
                if config.detector_from_student and config.detector_backbone == config.kd_backbone
                else None
            ),
        )
        stages["detector"] = _timed(
            timings,
            "detector_s",
            lambda: train_detector_scenes(
                detector_scenes,
                detector_path,
                config=detector_config,
                bands=config.bands,
                device=device,
                resume=resume and checkpoint_path(detector_path).is_file(),
                overwrite=overwrite or reuse,
                progress=progress,
            ),
        )
    return stages, scene_tiles


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------------------------- batch


def _scene_record_complete(path: Path) -> bool:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("status") == "complete"


def _probe_scene(spec: Any, bands: str | None, field: str) -> None:
    """Open a scene (and read its labels) to find broken inputs before any training."""
    from kdmsi_engine.data.scene import ScenePair

    with ScenePair.open(spec.before, spec.after, bands=bands, name=spec.name) as scene:
        if spec.labels is not None:
            from kdmsi_engine.data.labels import read_weak_labels

            read_weak_labels(spec.labels, crs=scene.grid.crs, field=field)


def _error_text(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, KdmsiError) else text


def batch_scenes(
    manifest: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    config: RunConfig | None = None,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train once on the labelled scenes of ``manifest``; detect on every scene.

    Args:
        manifest: CSV ``name,before,after,labels`` (labels empty for detect-only scenes).
        out_dir: output folder: models at the top, one folder per scene.
        config: parameters (:class:`RunConfig`).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        resume: continue interrupted training stages from their checkpoints.
        overwrite: start again, replacing every output; otherwise a rerun continues.
        progress: progress and cancellation.

    Returns:
        the batch record written to ``OUTDIR/batch.json`` (per scene: ``complete``,
        ``skipped`` (already complete), or ``failed`` with the error).

    Raises:
        ManifestError: the manifest is unusable. LabelError: no usable labelled scene.
    """
    from kdmsi_engine.data.manifest import read_manifest
    from kdmsi_engine.errors import LabelError

    progress = progress or Progress()
    config = config or RunConfig()
    config.check()
    # Missing files are typos the user wants to hear about before any work: refused here, with
    # nothing written. Files that exist but cannot be used fail their scene only (below).
    specs = read_manifest(manifest)
    folder = check_output_dir(out_dir)
    record_path = folder / BATCH_RECORD
    check_output(record_path, overwrite=True)
    torch_device = resolve_device(device)
    started = time.monotonic()
    results: dict[str, dict[str, Any]] = {s.name: {"name": s.name} for s in specs}
    record: dict[str, Any] = {
        "job": "batch",
        "status": "running",
        "manifest": str(Path(manifest).absolute()),
        "parameters": config.to_dict(),
        "device": describe_device(torch_device),
        "versions": software_versions(),
        "training": {},
        "scenes": list(results.values()),
    }

    def save() -> None:
        record["scenes"] = [results[s.name] for s in specs]
        write_text_atomic(record_path, json.dumps(record, indent=2, default=str), overwrite=True)

    def fail(name: str, stage: str, exc: BaseException) -> None:
        results[name].update(status="failed", stage=stage, error=_error_text(exc))
        logger.debug("scene %s failed:\n%s", name, traceback.format_exc())
        progress.log(f"scene {name} failed in {stage}: {_error_text(exc)}", scene=name)
        save()

    # 1. Find broken scenes before training.
    progress.stage("check", total=len(specs), message="checking scenes")
    usable = []
    for spec in specs:
        progress.check_cancelled()
        scene_dir = folder / spec.name
        if not overwrite and _scene_record_complete(scene_dir / OUTPUT_NAMES["run"]):
            results[spec.name].update(status="skipped", reason="already complete")
            progress.log(f"scene {spec.name}: already complete, skipped", scene=spec.name)
            progress.advance()
            continue
        try:
            _probe_scene(spec, config.bands, config.label_field)
        except CancelledError:
            raise
        except Exception as exc:  # a broken scene is reported, the others go on
            fail(spec.name, "check", exc)
        else:
            usable.append(spec)
        progress.advance()
    # 2. Train once on the usable labelled scenes (even when all of them are complete: new
    #    unlabelled scenes still need the detector; existing models are reused).
    labelled = [
        s for s in specs if s.labels is not None and results[s.name].get("status") != "failed"
    ]
    student_path, detector_path = folder / STUDENT_NAME, folder / DETECTOR_NAME
    pending = [s for s in usable]
    timings: dict[str, float] = {}
    if pending:
        if not labelled:
            raise LabelError(
                f"no usable scene of {manifest} has labels; fill the labels column for training"
            )
        if overwrite:
            for path in (student_path, detector_path):
                check_output(path, overwrite=True)
        train_manifest = folder / TRAIN_MANIFEST
        _write_manifest(train_manifest, labelled)
        train_scenes = []
        for spec in labelled:
            scene_dir = check_output_dir(folder / spec.name)
            train_scenes.append(
                (spec.name, Path(spec.before), Path(spec.after), Path(spec.labels), scene_dir)
            )
        record["training"] = {
            "scenes": [s.name for s in labelled],
            "student": str(student_path),
            "detector": str(detector_path),
        }
        save()
        stages, scene_tiles = _train_stages(
            train_scenes,
            student_path,
            detector_path,
            config,
            device=device,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
            timings=timings,
            manifest=train_manifest,
            reuse=not overwrite,
        )
        record["training"].update(stages=_plain(stages), timings=timings)
        save()
    else:
        scene_tiles = {}
    # 3. Detect on every usable scene that is not complete: labelled scenes first, each with
    #    its own threshold (e.g. unchanged-q on its unchanged tiles); scenes without labels get
    #    the mean of the labelled scenes' thresholds.
    thresholds = _complete_thresholds(folder, specs, results)
    pending.sort(key=lambda spec: spec.name not in scene_tiles)
    for index, spec in enumerate(pending, start=1):
        progress.check_cancelled()
        progress.log(f"scene {index}/{len(pending)}: {spec.name}", scene=spec.name)
        scene_dir = folder / spec.name
        mark = time.monotonic()
        try:
            tiles, held_out = scene_tiles.get(spec.name, (None, None))
            threshold = config.threshold
            if tiles is None and isinstance(threshold, str) and threshold != "otsu":
                threshold = float(np.mean(thresholds)) if thresholds else "otsu"
            detection = _detect(
                spec.before, spec.after, detector_path, scene_dir, config, tiles, held_out,
                spec.name, device=device, overwrite=True, progress=progress,
                threshold=threshold,
            )  # fmt: skip
            if tiles is not None:
                thresholds.append(float(detection["parameters"]["threshold"]))
            scene_record = {
                **detection,
                "job": "batch-scene",
                "batch": str(record_path),
                "labels": str(spec.labels) if spec.labels is not None else None,
                "training": record["training"],
                "parameters": {**detection["parameters"], "run": config.to_dict()},
            }
            scene_record["outputs"]["run"] = str(scene_dir / OUTPUT_NAMES["run"])
            write_text_atomic(
                scene_dir / OUTPUT_NAMES["run"],
                json.dumps(scene_record, indent=2, default=str),
                overwrite=True,
            )
        except CancelledError:
            raise
        except Exception as exc:  # a failing scene is reported, the others go on
            fail(spec.name, "detect", exc)
            continue
        results[spec.name].update(
            status="complete",
            folder=str(scene_dir),
            polygons=detection["polygons"],
            seconds=round(time.monotonic() - mark, 2),
        )
        save()
    counts = {
        status: sum(1 for r in results.values() if r.get("status") == status)
        for status in ("complete", "skipped", "failed")
    }
    record.update(
        status="complete" if counts["failed"] == 0 else "complete-with-failures",
        counts=counts,
        seconds=round(time.monotonic() - started, 2),
    )
    save()
    progress.log(
        f"batch finished: {counts['complete']} complete, {counts['skipped']} skipped, "
        f"{counts['failed']} failed; see {record_path}"
    )
    return {**record, "batch_record": str(record_path)}


def _complete_thresholds(folder: Path, specs: list[Any], results: dict[str, Any]) -> list[float]:
    """Thresholds of labelled scenes a previous batch run finished (from their run.json)."""
    found: list[float] = []
    for spec in specs:
        if spec.labels is None or results[spec.name].get("status") != "skipped":
            continue
        try:
            record = json.loads((folder / spec.name / OUTPUT_NAMES["run"]).read_text("utf-8"))
            found.append(float(record["parameters"]["threshold"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def _write_manifest(path: Path, specs: list[Any]) -> None:
    rows = [("name", "before", "after", "labels")]
    rows += [
        (
            s.name,
            str(Path(s.before).absolute()),
            str(Path(s.after).absolute()),
            str(Path(s.labels).absolute()),
        )
        for s in specs
    ]
    import io

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    write_text_atomic(path, buffer.getvalue(), overwrite=True)
