"""The chain's stages, shared by ``run`` (one scene) and ``batch`` (many).

:func:`train_stages` trains KD-MSI, makes each labelled scene's MSI map, tile labels,
calibrated evidence and pseudo labels, and trains the detector; :func:`finish_scene` is the
per-scene step both jobs end with: detection calibrated on the scene's own labels, the trust
report, and the scene's record.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdmsi_engine import defaults
from kdmsi_engine.data.manifest import SceneSpec
from kdmsi_engine.detect import detect_scene
from kdmsi_engine.jobs.config import RunConfig
from kdmsi_engine.progress import Progress
from kdmsi_engine.training.common import checkpoint_path

MSI_NAME = defaults.MSI_NAME
EVIDENCE_NAME = defaults.EVIDENCE_NAME
PSEUDO_NAME = defaults.PSEUDO_NAME


@dataclass(frozen=True)
class SceneWork:
    """A scene of the job and the folder its per-scene outputs go to."""

    spec: SceneSpec
    folder: Path


def _metrics(pred: Path, truth: Path, *, threshold: float | None = None) -> dict[str, Any]:
    from kdmsi_engine.metrics import evaluate_rasters

    result = evaluate_rasters(pred, truth, threshold=threshold)
    return {k: v for k, v in result.items() if k not in ("sweep", "pred", "truth")}


def timed(timings: dict[str, float], name: str, func: Callable[[], Any]) -> Any:
    started = time.monotonic()
    try:
        return func()
    finally:
        timings[name] = round(time.monotonic() - started, 2)


def detect_summary(detection: dict[str, Any]) -> dict[str, Any]:
    return {
        "parameters": detection["parameters"],
        "fusion": detection.get("fusion"),
        "timings": detection["timings"],
        "polygons": detection["polygons"],
    }


def truth_metrics(
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


def tiles_and_evidence(
    work: SceneWork,
    config: RunConfig,
    *,
    overwrite: bool,
    reuse: bool,
    progress: Progress,
) -> tuple[Any, Any, Mapping[str, Any]]:
    """The scene's tile labels (the touching rule on the KD tile grid), the tiles held out of
    the detector's training (bool per tile, or ``None``) and, when the pseudo labels or the
    final map use it, the calibrated change vector analysis (``EVIDENCE_NAME``), fitted on the
    unchanged tiles that are not held out.
    """
    from kdmsi_engine.cva import calibrated_cva_scene
    from kdmsi_engine.data.labels import labelled_tiles
    from kdmsi_engine.data.scene import ScenePair
    from kdmsi_engine.pseudo import TileLabels

    spec, evidence_path = work.spec, work.folder / EVIDENCE_NAME
    needed = config.pseudo_source != "msi" or config.fuse_evidence
    info: Mapping[str, Any] = {}
    with ScenePair.open(spec.before, spec.after, bands=config.bands, name=spec.name) as scene:
        frame = labelled_tiles(
            scene,
            spec.labels,
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
    combined = folder / defaults.PSEUDO_SCORE_NAME
    combine_maps(msi_path, evidence_path, combined, overwrite=True, progress=progress)
    return combined


def train_stages(
    scenes: list[SceneWork],
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

    ``scenes``: labelled scenes; their MSI maps, evidence and pseudo labels go to each one's
    ``folder``. With ``reuse``, outputs that exist are kept (batch reruns).

    Returns:
        the stage records and, per scene, its :class:`~kdmsi_engine.pseudo.TileLabels` and the
        unchanged tiles held out of the detector's training (bool per tile, or ``None``).
    """
    run = _StageRun(config, device, resume, overwrite, reuse, progress, timings)
    stages: dict[str, Any] = {"kd": run.kd(scenes, student_path, manifest)}
    seconds = {"msi_s": 0.0, "pseudo_s": 0.0}
    pseudo_records: dict[str, Any] = {}
    scene_tiles: dict[str, Any] = {}
    for work in scenes:
        scene_tiles[work.spec.name], pseudo_records[work.spec.name] = run.scene_labels(
            work, student_path, seconds
        )
    timings.update({key: round(value, 2) for key, value in seconds.items()})
    stages["msi"] = {"scales": list(config.msi_scales), "tile_size": config.tile_size}
    if len(scenes) == 1:
        stages["pseudo"] = plain(next(iter(pseudo_records.values())))
    else:
        stages["pseudo"] = {"scenes": {k: plain(v) for k, v in pseudo_records.items()}}
    stages["detector"] = run.detector(scenes, student_path, detector_path)
    return stages, scene_tiles


@dataclass
class _StageRun:
    """The settings every training stage of one ``run``/``batch`` shares."""

    config: RunConfig
    device: str
    resume: bool
    overwrite: bool
    reuse: bool
    progress: Progress
    timings: dict[str, float]

    def kd(self, scenes: list[SceneWork], student_path: Path, manifest: Path | None) -> Any:
        """Stage 1: the KD-MSI teacher and student (reused when ``reuse`` and it exists)."""
        from kdmsi_engine.training.kd import train_kdmsi

        if self.reuse and student_path.is_file():
            self.progress.log(f"reusing {student_path}")
            return {"model": str(student_path), "reused": True}
        config = self.config
        source: dict[str, Any]
        if manifest is not None:
            source = {"scenes": manifest}
        else:
            spec = scenes[0].spec
            source = {"before": spec.before, "after": spec.after, "labels": spec.labels}
        return timed(
            self.timings,
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
                resume=self.resume and checkpoint_path(student_path).is_file(),
                device=self.device,
                overwrite=self.overwrite or self.reuse,
                progress=self.progress,
            ),
        )

    def scene_labels(
        self, work: SceneWork, student_path: Path, seconds: dict[str, float]
    ) -> tuple[tuple[Any, Any], dict[str, Any]]:
        """One scene's MSI map, tile labels, evidence and pseudo labels; its (tiles, held-out
        tiles) and pseudo-label record. Adds the stages' seconds to ``seconds``."""
        from kdmsi_engine.inference.scene import infer_scene
        from kdmsi_engine.pseudo import make_pseudo_labels

        config, folder = self.config, work.folder
        rewrite = self.overwrite or self.reuse
        msi_path, pseudo_path = folder / MSI_NAME, folder / PSEUDO_NAME
        mark = time.monotonic()
        if not (self.reuse and msi_path.is_file()):
            infer_scene(
                work.spec.before,
                work.spec.after,
                student_path,
                msi_path,
                method="msi",
                scales=config.msi_scales,
                tile_size=config.tile_size,
                batch_size=config.batch_size,
                device=self.device,
                overwrite=rewrite,
                progress=self.progress,
            )
        seconds["msi_s"] += time.monotonic() - mark
        mark = time.monotonic()
        tiles, held_out, evidence = tiles_and_evidence(
            work, config, overwrite=rewrite, reuse=self.reuse, progress=self.progress
        )
        score_path = _pseudo_source(folder, config, self.progress)
        info = {"source": config.pseudo_source, **({"evidence": evidence} if evidence else {})}
        record: dict[str, Any]
        if self.reuse and pseudo_path.is_file():
            record = {"output": str(pseudo_path), "reused": True}
        else:
            record = {
                **info,
                **make_pseudo_labels(
                    score_path,
                    pseudo_path,
                    tile_labels=tiles,
                    threshold=config.pseudo_threshold,
                    tile_size=config.tile_size,
                    quantile=config.unchanged_quantile,
                    held_out=held_out,
                    overwrite=rewrite,
                    progress=self.progress,
                ),
            }
        seconds["pseudo_s"] += time.monotonic() - mark
        return (tiles, held_out), record

    def detector(self, scenes: list[SceneWork], student_path: Path, detector_path: Path) -> Any:
        """Stage 2: the detector on every scene's pseudo labels (reused like the student)."""
        from kdmsi_engine.training.detector import (
            DetectorConfig,
            DetectorScene,
            train_detector_scenes,
        )

        if self.reuse and detector_path.is_file():
            self.progress.log(f"reusing {detector_path}")
            return {"model": str(detector_path), "reused": True}
        config = self.config
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
        detector_scenes = [
            DetectorScene(
                w.spec.name, Path(w.spec.before), Path(w.spec.after), w.folder / PSEUDO_NAME
            )
            for w in scenes
        ]
        return timed(
            self.timings,
            "detector_s",
            lambda: train_detector_scenes(
                detector_scenes,
                detector_path,
                config=detector_config,
                bands=config.bands,
                device=self.device,
                resume=self.resume and checkpoint_path(detector_path).is_file(),
                overwrite=self.overwrite or self.reuse,
                progress=self.progress,
            ),
        )


def plain(value: Any) -> Any:
    """``value`` as plain JSON types (paths and numpy numbers as JSON writes them)."""
    return json.loads(json.dumps(value, default=str))


def finish_scene(
    work: SceneWork,
    detector: Path,
    config: RunConfig,
    tiles: Any,
    held_out: Any,
    *,
    device: str,
    overwrite: bool,
    progress: Progress,
    threshold: float | str | None = None,
    teacher: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Detect one scene with the chain's detector; its detection record and trust report.

    The scene's tile labels (``tiles``, or ``None`` for a scene without labels) set its
    threshold and keep-out. The unchanged tiles the detector did not train on (``held_out``),
    when there are any, calibrate its map: its threshold ``unchanged-q`` alone, its rarity
    scale in the fusion with the calibrated change vector analysis, whose own scale and the
    fused score's threshold come from every unchanged tile (:mod:`kdmsi_engine.fusion`). With
    labels, the trust report compares the map with them.
    """
    from kdmsi_engine.trust import trust_report

    calibration = tiles
    if tiles is not None and held_out is not None and held_out.any():
        calibration = tiles.only(held_out)
    evidence = work.folder / EVIDENCE_NAME
    detection = detect_scene(
        work.spec.before,
        work.spec.after,
        detector,
        work.folder,
        tile_size=config.detect_tile_size,
        batch_size=config.batch_size,
        threshold=config.threshold if threshold is None else threshold,
        scales=config.detect_scales,
        flip=config.flip,
        min_area=config.min_area,
        simplify=config.simplify,
        fill_holes=config.fill_holes,
        scene_name=work.spec.name,
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
    trust = None
    if tiles is not None:
        trust = trust_report(
            work.folder / defaults.PROBABILITY_NAME,
            detection["parameters"]["threshold"],
            tiles,
            quantile=config.detect_quantile,
            teacher=teacher,
        )
        for warning in trust["warnings"]:
            progress.log(f"warning: {warning}", warning=warning, scene=work.spec.name)
    return {"detection": detection, "trust": trust}
