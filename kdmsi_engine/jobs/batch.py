"""``kdmsi batch``: train once on the labelled scenes of a manifest, detect on every scene.

A manifest (``name,before,after,labels``). Missing files are refused before any work (one line,
nothing written); then every scene is opened, and a scene that cannot be used (unreadable or
truncated raster, no overlap, bad labels) is reported and left out. KD-MSI and the detector are
trained once, over all labelled scenes (``OUTDIR/student.kdmsi``, ``OUTDIR/detector.kdmsi``; MSI
maps and pseudo labels in ``OUTDIR/<name>/``), then every scene is detected into
``OUTDIR/<name>/`` with its own ``run.json`` by the step ``run`` ends with too
(:func:`~kdmsi_engine.jobs.stages.finish_scene`). A scene that fails is reported
(``batch.json`` and the progress log) and the others go on. A rerun continues: models and
per-scene files that exist are reused (they are written atomically, so a file that exists is
complete), and scenes whose ``run.json`` says ``complete`` are skipped. ``overwrite=True`` starts
again from scratch.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from kdmsi_engine import defaults
from kdmsi_engine.atomic import check_output, check_output_dir, write_text_atomic
from kdmsi_engine.data.manifest import read_manifest, write_manifest
from kdmsi_engine.detect import software_versions
from kdmsi_engine.device import describe_device, resolve_device
from kdmsi_engine.errors import CancelledError, KdmsiError, LabelError
from kdmsi_engine.jobs.config import RunConfig
from kdmsi_engine.jobs.stages import SceneWork, finish_scene, plain, train_stages
from kdmsi_engine.progress import Progress

logger = logging.getLogger(__name__)

BATCH_RECORD = "batch.json"
TRAIN_MANIFEST = "training_scenes.csv"


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
        if not overwrite and _scene_record_complete(scene_dir / defaults.RECORD_NAME):
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
    student_path, detector_path = folder / defaults.STUDENT_NAME, folder / defaults.DETECTOR_NAME
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
        write_manifest(train_manifest, labelled)
        train_scenes = [SceneWork(s, check_output_dir(folder / s.name)) for s in labelled]
        record["training"] = {
            "scenes": [s.name for s in labelled],
            "student": str(student_path),
            "detector": str(detector_path),
        }
        save()
        stages, scene_tiles = train_stages(
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
        record["training"].update(stages=plain(stages), timings=timings)
        save()
    else:
        scene_tiles = {}
    # 3. Detect on every usable scene that is not complete: labelled scenes first, each with
    #    its own threshold (e.g. unchanged-q on its unchanged tiles); scenes without labels get
    #    the mean of the labelled scenes' thresholds.
    thresholds = _complete_thresholds(folder, specs, results)
    teacher = record["training"].get("stages", {}).get("kd", {}).get("teacher_separation")
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
            finished = finish_scene(
                SceneWork(spec, scene_dir), detector_path, config, tiles, held_out,
                device=device, overwrite=True, progress=progress, threshold=threshold,
                teacher=teacher,
            )  # fmt: skip
            detection = finished["detection"]
            if tiles is not None:
                thresholds.append(float(detection["parameters"]["threshold"]))
            scene_record = {
                **detection,
                "job": "batch-scene",
                "batch": str(record_path),
                "labels": str(spec.labels) if spec.labels is not None else None,
                "training": record["training"],
                "parameters": {**detection["parameters"], "run": config.to_dict()},
                "trust": finished["trust"],
            }
            scene_record["outputs"]["run"] = str(scene_dir / defaults.RECORD_NAME)
            write_text_atomic(
                scene_dir / defaults.RECORD_NAME,
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
            record = json.loads((folder / spec.name / defaults.RECORD_NAME).read_text("utf-8"))
            found.append(float(record["parameters"]["threshold"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found
