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

With ``model`` (``--model DETECTOR.kdmsi``) nothing is trained: every scene is detected with that
detector, a labelled scene calibrating its threshold and trust report on its own labels. With
``cluster`` (``--cluster local[:N]|tcp://HOST:PORT``) the training runs as one task and every
scene as one task on Dask distributed (:mod:`kdmsi_engine.jobs.cluster`); each scene's task is
the same step, :func:`detect_batch_scene`, as here, so the outputs are the same.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from kdmsi_engine import defaults
from kdmsi_engine.atomic import check_output, check_output_dir, write_text_atomic
from kdmsi_engine.data.manifest import SceneSpec, read_manifest, write_manifest
from kdmsi_engine.detect import software_versions
from kdmsi_engine.device import describe_device, resolve_device
from kdmsi_engine.errors import CancelledError, InputError, KdmsiError, LabelError
from kdmsi_engine.jobs.cluster import Outcome, Task, open_runner, parse_cluster
from kdmsi_engine.jobs.config import RunConfig
from kdmsi_engine.jobs.stages import (
    SceneWork,
    finish_scene,
    plain,
    tiles_and_evidence,
    train_stages,
)
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
    model: str | os.PathLike[str] | None = None,
    cluster: str | None = None,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train once on the labelled scenes of ``manifest`` (or take ``model``); detect every scene.

    Args:
        manifest: CSV ``name,before,after,labels`` (labels empty for detect-only scenes).
        out_dir: output folder: models at the top, one folder per scene.
        config: parameters (:class:`RunConfig`).
        model: a detector model file: no training, every scene is detected with it (labelled
            scenes still calibrate their threshold and trust report on their labels).
        cluster: ``local``, ``local:N`` or ``tcp://HOST:PORT``: run the training and one task
            per scene on Dask distributed (:mod:`kdmsi_engine.jobs.cluster`); ``None``: here.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (on a cluster: each worker's).
        resume: continue interrupted training stages from their checkpoints.
        overwrite: start again, replacing every output; otherwise a rerun continues.
        progress: progress and cancellation.

    Returns:
        the batch record written to ``OUTDIR/batch.json`` (per scene: ``complete``,
        ``skipped`` (already complete), or ``failed`` with the error; ``counts``, ``seconds``,
        and on a cluster the scenes each worker finished).

    Raises:
        ManifestError: the manifest is unusable. LabelError: no usable labelled scene.
        InputError: an unusable cluster. ModelFileError: ``model`` is not a detector.
    """
    progress = progress or Progress()
    config = config or RunConfig()
    config.check()
    # Missing files are typos the user wants to hear about before any work: refused here, with
    # nothing written. Files that exist but cannot be used fail their scene only (below).
    specs = read_manifest(manifest)
    model_path = _check_model(model) if model is not None else None
    cluster_spec = parse_cluster(cluster) if cluster is not None else None
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

    def fail(name: str, stage: str, error: str) -> None:
        results[name].update(status="failed", stage=stage, error=error)
        progress.log(f"scene {name} failed in {stage}: {error}", scene=name)
        save()

    with open_runner(cluster_spec, progress) as runner:
        if cluster_spec is not None:
            record["cluster"] = {k: v for k, v in runner.summary.items() if k != "workers_per_host"}
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
                logger.debug("scene %s failed:\n%s", spec.name, traceback.format_exc())
                fail(spec.name, "check", _error_text(exc))
            else:
                usable.append(spec)
            progress.advance()
        # 2. Train once on the usable labelled scenes (even when all of them are complete: new
        #    unlabelled scenes still need the detector; existing models are reused).
        pending = list(usable)
        scene_tiles: dict[str, Any]
        teacher: dict[str, Any] | None
        if model_path is not None:
            detector_path, scene_tiles, teacher = model_path, {}, None
            record["training"] = {"detector": str(model_path), "given": True}
        else:
            detector_path = folder / defaults.DETECTOR_NAME
            scene_tiles, teacher = _train_once(
                runner, specs, pending, results, record, folder, config, manifest,
                device=device, resume=resume, overwrite=overwrite, save=save,
            )  # fmt: skip
        # 3. Detect on every usable scene that is not complete: labelled scenes first, each with
        #    its own threshold (e.g. unchanged-q on its unchanged tiles); scenes without labels
        #    get the mean of the labelled scenes' thresholds.
        thresholds = _complete_thresholds(folder, specs, results)

        def calibrated(spec: Any) -> bool:
            return spec.name in scene_tiles or (model_path is not None and spec.labels is not None)

        first = [s for s in pending if calibrated(s)]
        rest = [s for s in pending if not calibrated(s)]
        # The scenes without labels wait for the labelled ones' thresholds only when they need
        # them; otherwise (a fixed threshold, Otsu) every scene goes at once.
        needs_mean = isinstance(config.threshold, str) and config.threshold != "otsu"
        waves = [wave for wave in ([first, rest] if needs_mean else [first + rest]) if wave]
        done = 0
        for wave in waves:
            tasks = []
            for spec in wave:
                tiles, held_out = scene_tiles.get(spec.name, (None, None))
                threshold = config.threshold
                if not calibrated(spec) and needs_mean:
                    threshold = float(np.mean(thresholds)) if thresholds else "otsu"
                job = SceneJob(
                    spec, folder / spec.name, Path(detector_path), config, tiles, held_out,
                    threshold, teacher, record["training"], record_path, model_path is not None,
                    device,
                )  # fmt: skip
                tasks.append(Task(spec.name, detect_batch_scene, (job,)))
            for outcome in runner.run(tasks, first=done + 1, total=len(pending)):
                done += 1
                _record_outcome(outcome, results, fail, thresholds)
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
    if cluster_spec is not None:
        record["cluster"]["scenes_per_worker"] = _per_worker(results)
    save()
    progress.log(
        f"batch finished: {counts['complete']} complete, {counts['skipped']} skipped, "
        f"{counts['failed']} failed; see {record_path}"
    )
    return {**record, "batch_record": str(record_path)}


def _check_model(model: str | os.PathLike[str]) -> Path:
    """The detector model file every scene is detected with (refused before any work)."""
    from kdmsi_engine.modelfile import load_model
    from kdmsi_engine.models.deeplab import DETECTOR_KIND

    path = Path(model).expanduser().absolute()
    if not path.is_file():
        raise InputError(
            f"detector model {model} does not exist; check the path", parameters=("model",)
        )
    load_model(path, expected_kind=DETECTOR_KIND)  # not a detector: ModelFileError
    return path


def _train_once(
    runner: Any,
    specs: list[Any],
    pending: list[Any],
    results: dict[str, dict[str, Any]],
    record: dict[str, Any],
    folder: Path,
    config: RunConfig,
    manifest: str | os.PathLike[str],
    *,
    device: str,
    resume: bool,
    overwrite: bool,
    save: Callable[[], None],
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Train KD-MSI and the detector on the usable labelled scenes (here or on a worker).

    Returns each labelled scene's tile labels (and held-out tiles) and the teacher's
    separation, for the detection that follows.
    """
    labelled = [
        s for s in specs if s.labels is not None and results[s.name].get("status") != "failed"
    ]
    student_path, detector_path = folder / defaults.STUDENT_NAME, folder / defaults.DETECTOR_NAME
    if not pending:
        return {}, None
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
    training = TrainingJob(
        train_scenes, student_path, detector_path, config, train_manifest, device, resume,
        overwrite,
    )  # fmt: skip
    stages, scene_tiles, timings = runner.call(Task("training", train_batch_models, (training,)))
    record["training"].update(stages=plain(stages), timings=timings)
    save()
    return scene_tiles, stages.get("kd", {}).get("teacher_separation")


@dataclass
class TrainingJob:
    """What the training of a batch needs (sent to a worker as it is on a cluster)."""

    scenes: list[SceneWork]
    student: Path
    detector: Path
    config: RunConfig
    manifest: Path
    device: str
    resume: bool
    overwrite: bool


def train_batch_models(job: TrainingJob, *, progress: Progress) -> tuple[Any, Any, Any]:
    """Train the batch's models: the stage records, the scenes' tile labels, the timings."""
    timings: dict[str, float] = {}
    stages, scene_tiles = train_stages(
        job.scenes,
        job.student,
        job.detector,
        job.config,
        device=job.device,
        resume=job.resume,
        overwrite=job.overwrite,
        progress=progress,
        timings=timings,
        manifest=job.manifest,
        reuse=not job.overwrite,
    )
    return stages, scene_tiles, timings


@dataclass
class SceneJob:
    """One scene's detection in a batch (sent to a worker as it is on a cluster)."""

    spec: SceneSpec
    folder: Path
    detector: Path
    config: RunConfig
    #: the scene's tile labels and held-out tiles from the training, or ``None``
    tiles: Any
    held_out: Any
    threshold: float | str
    teacher: dict[str, Any] | None
    training: dict[str, Any]
    batch_record: Path
    #: a given detector: a labelled scene reads its own tile labels here
    own_tiles: bool
    device: str


def detect_batch_scene(job: SceneJob, *, progress: Progress) -> dict[str, Any]:
    """Detect one scene of a batch and write its ``run.json``: the step every scene runs.

    Returns ``status`` ``complete`` (with ``folder``, ``polygons``, ``seconds`` and the
    ``threshold`` it used, ``calibrated`` when its labels set it) or ``failed`` (with
    ``error``): a failing scene is the batch's to record, not a reason to stop.

    Raises:
        CancelledError: cancelled.
    """
    spec, scene_dir, config = job.spec, job.folder, job.config
    mark = time.monotonic()
    try:
        tiles, held_out = job.tiles, job.held_out
        if tiles is None and job.own_tiles and spec.labels is not None:
            # the detector never saw this scene: every unchanged tile calibrates the threshold
            work = SceneWork(spec, check_output_dir(scene_dir))
            tiles, _, _ = tiles_and_evidence(
                work, replace(config, pseudo_source="msi"), overwrite=True, reuse=False,
                progress=progress,
            )  # fmt: skip
            held_out = None
        finished = finish_scene(
            SceneWork(spec, scene_dir), job.detector, config, tiles, held_out,
            device=job.device, overwrite=True, progress=progress, threshold=job.threshold,
            teacher=job.teacher,
        )  # fmt: skip
        detection = finished["detection"]
        scene_record = {
            **detection,
            "job": "batch-scene",
            "batch": str(job.batch_record),
            "labels": str(spec.labels) if spec.labels is not None else None,
            "training": job.training,
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
        logger.debug("scene %s failed:\n%s", spec.name, traceback.format_exc())
        return {"status": "failed", "stage": "detect", "error": _error_text(exc)}
    return {
        "status": "complete",
        "folder": str(scene_dir),
        "polygons": detection["polygons"],
        "seconds": round(time.monotonic() - mark, 2),
        "threshold": float(detection["parameters"]["threshold"]),
        "calibrated": tiles is not None,
    }


def _record_outcome(
    outcome: Outcome,
    results: dict[str, dict[str, Any]],
    fail: Callable[[str, str, str], None],
    thresholds: list[float],
) -> None:
    """Put a scene task's outcome into the batch's results."""
    name = outcome.name
    if outcome.worker is not None:
        results[name]["worker"] = outcome.worker
    if outcome.status == "cancelled":
        raise CancelledError(f"cancelled during scene {name}; its outputs were not written")
    if outcome.status != "done":
        fail(name, "detect", outcome.error)
        return
    value = dict(outcome.value)
    if value.pop("status") == "failed":
        fail(name, value["stage"], value["error"])
        return
    if value.pop("calibrated"):
        thresholds.append(value["threshold"])
    value.pop("threshold")
    results[name].update(status="complete", **value)


def _per_worker(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Scenes each worker finished and failed."""
    counts: dict[str, dict[str, int]] = {}
    for result in results.values():
        worker = result.get("worker")
        if worker is None:
            continue
        entry = counts.setdefault(worker, {"complete": 0, "failed": 0})
        entry[result.get("status", "failed")] = entry.get(result.get("status", "failed"), 0) + 1
    return counts


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
