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
from kdmsi_engine.jobs.cluster import InProcess, OnDask, Outcome, Task, open_runner, parse_cluster
from kdmsi_engine.jobs.config import RunConfig
from kdmsi_engine.jobs.stages import (
    SceneWork,
    finish_scene,
    plain,
    tiles_and_evidence,
    train_stages,
)
from kdmsi_engine.progress import Progress
from kdmsi_engine.results import BatchRecord

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
) -> BatchRecord:
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
    config = config or RunConfig()
    config.check()
    # Missing files are typos the user wants to hear about before any work: refused here, with
    # nothing written. Files that exist but cannot be used fail their scene only (below).
    specs = read_manifest(manifest)
    model_path = _check_model(model) if model is not None else None
    cluster_spec = parse_cluster(cluster) if cluster is not None else None
    progress = progress or Progress()
    batch = Batch(
        Path(manifest), specs, check_output_dir(out_dir), config,
        device=device, overwrite=overwrite, progress=progress, model=model_path,
    )  # fmt: skip
    with open_runner(cluster_spec, progress) as runner:
        batch.use(runner)
        pending = batch.check_scenes()
        scene_tiles = batch.train(pending, resume=resume) if pending else {}
        batch.detect(pending, scene_tiles)
    return batch.finish()


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


class Batch:
    """One ``batch`` run: its scenes, their results and ``batch.json``, phase by phase.

    :meth:`check_scenes` finds broken scenes before any training, :meth:`train` trains once on
    the usable labelled scenes (unless a detector was given), :meth:`detect` detects every scene
    (labelled scenes with their own threshold, the others with the labelled scenes' mean), one
    :func:`detect_batch_scene` task each, :meth:`finish` counts. The training and the scene
    tasks run where the runner runs them (:mod:`kdmsi_engine.jobs.cluster`: here, or on Dask).
    Every change of a scene's state is saved to ``batch.json`` at once.
    """

    def __init__(
        self,
        manifest: Path,
        specs: list[SceneSpec],
        folder: Path,
        config: RunConfig,
        *,
        device: str,
        overwrite: bool,
        progress: Progress,
        model: Path | None = None,
    ) -> None:
        self.manifest, self.specs, self.folder, self.config = manifest, specs, folder, config
        self.device, self.overwrite, self.progress = device, overwrite, progress
        self.record_path = folder / BATCH_RECORD
        check_output(self.record_path, overwrite=True)
        self.student_path = folder / defaults.STUDENT_NAME
        #: a given detector, or the one this batch trains
        self.model = model
        self.detector_path = model or folder / defaults.DETECTOR_NAME
        self.started = time.monotonic()
        self.results: dict[str, dict[str, Any]] = {s.name: {"name": s.name} for s in specs}
        self.record: BatchRecord = {
            "job": "batch",
            "status": "running",
            "manifest": str(manifest.absolute()),
            "parameters": config.to_dict(),
            "device": describe_device(resolve_device(device)),
            "versions": software_versions(),
            "training": {},
            "scenes": list(self.results.values()),
        }
        #: thresholds of the labelled scenes detected so far (for the unlabelled ones)
        self.thresholds: list[float] = []
        self.runner: InProcess | OnDask = InProcess(progress)

    def use(self, runner: InProcess | OnDask) -> None:
        """Run the training and the scenes with ``runner``."""
        self.runner = runner
        if isinstance(runner, OnDask):
            summary = runner.summary
            self.record["cluster"] = {k: v for k, v in summary.items() if k != "workers_per_host"}

    def save(self) -> None:
        self.record["scenes"] = [self.results[s.name] for s in self.specs]
        text = json.dumps(self.record, indent=2, default=str)
        write_text_atomic(self.record_path, text, overwrite=True)

    def fail(self, name: str, stage: str, error: BaseException | str) -> None:
        text = error if isinstance(error, str) else _error_text(error)
        self.results[name].update(status="failed", stage=stage, error=text)
        if not isinstance(error, str):
            logger.debug("scene %s failed:\n%s", name, traceback.format_exc())
        self.progress.log(f"scene {name} failed in {stage}: {text}", scene=name)
        self.save()

    def check_scenes(self) -> list[SceneSpec]:
        """Open every scene not yet complete; the usable ones (broken ones are recorded)."""
        progress = self.progress
        progress.stage("check", total=len(self.specs), message="checking scenes")
        usable = []
        for spec in self.specs:
            progress.check_cancelled()
            if not self.overwrite and _scene_record_complete(
                self.folder / spec.name / defaults.RECORD_NAME
            ):
                self.results[spec.name].update(status="skipped", reason="already complete")
                progress.log(f"scene {spec.name}: already complete, skipped", scene=spec.name)
            else:
                try:
                    _probe_scene(spec, self.config.bands, self.config.label_field)
                except CancelledError:
                    raise
                except Exception as exc:  # a broken scene is reported, the others go on
                    self.fail(spec.name, "check", exc)
                else:
                    usable.append(spec)
            progress.advance()
        return usable

    def train(self, pending: list[SceneSpec], *, resume: bool) -> dict[str, Any]:
        """Train once on the usable labelled scenes (existing models are reused, since new
        unlabelled scenes still need the detector); each labelled scene's tile labels.

        With a given detector nothing is trained."""
        if self.model is not None:
            self.record["training"] = {"detector": str(self.model), "given": True}
            self.save()
            return {}
        labelled = [
            s
            for s in self.specs
            if s.labels is not None and self.results[s.name].get("status") != "failed"
        ]
        if not labelled:
            raise LabelError(
                f"no usable scene of {self.manifest} has labels; fill the labels column for "
                "training"
            )
        if self.overwrite:
            for path in (self.student_path, self.detector_path):
                check_output(path, overwrite=True)
        train_manifest = self.folder / TRAIN_MANIFEST
        write_manifest(train_manifest, labelled)
        self.record["training"] = {
            "scenes": [s.name for s in labelled],
            "student": str(self.student_path),
            "detector": str(self.detector_path),
        }
        self.save()
        job = TrainingJob(
            [SceneWork(s, check_output_dir(self.folder / s.name)) for s in labelled],
            self.student_path, self.detector_path, self.config, train_manifest, self.device,
            resume, self.overwrite,
        )  # fmt: skip
        stages, scene_tiles, timings = self.runner.call(
            Task("training", train_batch_models, (job,))
        )
        self.record["training"].update(stages=plain(stages), timings=timings)
        self.save()
        return scene_tiles

    def detect(self, pending: list[SceneSpec], scene_tiles: dict[str, Any]) -> None:
        """Detect every pending scene, the labelled ones first (their thresholds set the
        unlabelled scenes' threshold)."""
        # labelled scenes a previous run finished count too (check_scenes marked them skipped)
        self.thresholds = _complete_thresholds(self.folder, self.specs, self.results)

        def calibrated(spec: SceneSpec) -> bool:  # its own labels set its threshold
            return spec.name in scene_tiles or (self.model is not None and spec.labels is not None)

        first = [s for s in pending if calibrated(s)]
        rest = [s for s in pending if not calibrated(s)]
        # The scenes without labels wait for the labelled ones' thresholds only when they need
        # them; otherwise (a fixed threshold, Otsu) every scene goes at once.
        threshold = self.config.threshold
        needs_mean = isinstance(threshold, str) and threshold != "otsu"
        waves = [wave for wave in ([first, rest] if needs_mean else [first + rest]) if wave]
        done = 0
        for wave in waves:
            tasks = []
            for spec in wave:
                scene_threshold = threshold
                if not calibrated(spec) and needs_mean:
                    scene_threshold = float(np.mean(self.thresholds)) if self.thresholds else "otsu"
                tiles, held_out = scene_tiles.get(spec.name, (None, None))
                job = SceneJob(
                    spec, self.folder / spec.name, Path(self.detector_path), self.config, tiles,
                    held_out, scene_threshold, self._teacher(), self.record["training"],
                    self.record_path, self.model is not None, self.device,
                )  # fmt: skip
                tasks.append(Task(spec.name, detect_batch_scene, (job,)))
            for outcome in self.runner.run(tasks, first=done + 1, total=len(pending)):
                done += 1
                self._record(outcome)

    def _record(self, outcome: Outcome) -> None:
        """Put a scene task's outcome into the results and ``batch.json``."""
        name = outcome.name
        if outcome.worker is not None:
            self.results[name]["worker"] = outcome.worker
        if outcome.status == "cancelled":
            raise CancelledError(f"cancelled during scene {name}; its outputs were not written")
        if outcome.status != "done":
            self.fail(name, "detect", outcome.error)
            return
        value = dict(outcome.value)
        if value.pop("status") == "failed":
            self.fail(name, value["stage"], value["error"])
            return
        if value.pop("calibrated"):
            self.thresholds.append(value["threshold"])
        value.pop("threshold")
        self.results[name].update(status="complete", **value)
        self.save()

    def _teacher(self) -> dict[str, Any] | None:
        return self.record["training"].get("stages", {}).get("kd", {}).get("teacher_separation")

    def finish(self) -> BatchRecord:
        """Count the scenes by state, save and return the batch record."""
        counts = {
            status: sum(1 for r in self.results.values() if r.get("status") == status)
            for status in ("complete", "skipped", "failed")
        }
        self.record["status"] = "complete" if counts["failed"] == 0 else "complete-with-failures"
        self.record["counts"] = counts
        self.record["seconds"] = round(time.monotonic() - self.started, 2)
        if "cluster" in self.record:
            self.record["cluster"]["scenes_per_worker"] = _per_worker(self.results)
        self.save()
        self.progress.log(
            f"batch finished: {counts['complete']} complete, {counts['skipped']} skipped, "
            f"{counts['failed']} failed; see {self.record_path}"
        )
        return {**self.record, "batch_record": str(self.record_path)}


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
    ``stage`` and ``error``): a failing scene is the batch's to record, not a reason to stop.

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
        _write_scene_record(job, detection, finished["trust"])
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


def _write_scene_record(job: SceneJob, detection: dict[str, Any], trust: Any) -> None:
    scene_dir = job.folder
    scene_record = {
        **detection,
        "job": "batch-scene",
        "batch": str(job.batch_record),
        "labels": str(job.spec.labels) if job.spec.labels is not None else None,
        "training": job.training,
        "parameters": {**detection["parameters"], "run": job.config.to_dict()},
        "trust": trust,
    }
    scene_record["outputs"]["run"] = str(scene_dir / defaults.RECORD_NAME)
    write_text_atomic(
        scene_dir / defaults.RECORD_NAME,
        json.dumps(scene_record, indent=2, default=str),
        overwrite=True,
    )


def _per_worker(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Scenes each worker finished and failed."""
    counts: dict[str, dict[str, int]] = {}
    for result in results.values():
        worker = result.get("worker")
        if worker is None:
            continue
        entry = counts.setdefault(worker, {"complete": 0, "failed": 0})
        status = result.get("status", "failed")
        entry[status] = entry.get(status, 0) + 1
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
