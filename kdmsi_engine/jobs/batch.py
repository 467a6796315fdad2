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
from kdmsi_engine.data.manifest import SceneSpec, read_manifest, write_manifest
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
    config = config or RunConfig()
    config.check()
    # Missing files are typos the user wants to hear about before any work: refused here, with
    # nothing written. Files that exist but cannot be used fail their scene only (below).
    specs = read_manifest(manifest)
    batch = Batch(
        Path(manifest), specs, check_output_dir(out_dir), config,
        device=device, overwrite=overwrite, progress=progress or Progress(),
    )  # fmt: skip
    pending = batch.check_scenes()
    scene_tiles = batch.train(pending, resume=resume) if pending else {}
    batch.detect(pending, scene_tiles)
    return batch.finish()


class Batch:
    """One ``batch`` run: its scenes, their results and ``batch.json``, phase by phase.

    :meth:`check_scenes` finds broken scenes before any training, :meth:`train` trains once on
    the usable labelled scenes, :meth:`detect_scene` detects one scene (labelled scenes with
    their own threshold, the others with the labelled scenes' mean), :meth:`finish` counts.
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
    ) -> None:
        self.manifest, self.specs, self.folder, self.config = manifest, specs, folder, config
        self.device, self.overwrite, self.progress = device, overwrite, progress
        self.record_path = folder / BATCH_RECORD
        check_output(self.record_path, overwrite=True)
        self.student_path = folder / defaults.STUDENT_NAME
        self.detector_path = folder / defaults.DETECTOR_NAME
        self.started = time.monotonic()
        self.results: dict[str, dict[str, Any]] = {s.name: {"name": s.name} for s in specs}
        self.record: dict[str, Any] = {
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

    def save(self) -> None:
        self.record["scenes"] = [self.results[s.name] for s in self.specs]
        text = json.dumps(self.record, indent=2, default=str)
        write_text_atomic(self.record_path, text, overwrite=True)

    def fail(self, name: str, stage: str, exc: BaseException) -> None:
        self.results[name].update(status="failed", stage=stage, error=_error_text(exc))
        logger.debug("scene %s failed:\n%s", name, traceback.format_exc())
        self.progress.log(f"scene {name} failed in {stage}: {_error_text(exc)}", scene=name)
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
        unlabelled scenes still need the detector); each labelled scene's tile labels."""
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
        timings: dict[str, float] = {}
        stages, scene_tiles = train_stages(
            [SceneWork(s, check_output_dir(self.folder / s.name)) for s in labelled],
            self.student_path,
            self.detector_path,
            self.config,
            device=self.device,
            resume=resume,
            overwrite=self.overwrite,
            progress=self.progress,
            timings=timings,
            manifest=train_manifest,
            reuse=not self.overwrite,
        )
        self.record["training"].update(stages=plain(stages), timings=timings)
        self.save()
        return scene_tiles

    def detect(self, pending: list[SceneSpec], scene_tiles: dict[str, Any]) -> None:
        """Detect every pending scene, the labelled ones first (their thresholds set the
        unlabelled scenes' threshold)."""
        # labelled scenes a previous run finished count too (check_scenes marked them skipped)
        self.thresholds = _complete_thresholds(self.folder, self.specs, self.results)
        ordered = sorted(pending, key=lambda spec: spec.name not in scene_tiles)
        for index, spec in enumerate(ordered, start=1):
            self.progress.check_cancelled()
            self.progress.log(f"scene {index}/{len(ordered)}: {spec.name}", scene=spec.name)
            self.detect_scene(spec, *scene_tiles.get(spec.name, (None, None)))

    def detect_scene(self, spec: SceneSpec, tiles: Any, held_out: Any) -> bool:
        """Detect one scene into ``OUTDIR/<name>/`` with its ``run.json``; whether it worked
        (a failing scene is recorded and the others go on)."""
        scene_dir = self.folder / spec.name
        mark = time.monotonic()
        threshold = self.config.threshold
        if tiles is None and isinstance(threshold, str) and threshold != "otsu":
            threshold = float(np.mean(self.thresholds)) if self.thresholds else "otsu"
        try:
            finished = finish_scene(
                SceneWork(spec, scene_dir), self.detector_path, self.config, tiles, held_out,
                device=self.device, overwrite=True, progress=self.progress,
                threshold=threshold, teacher=self._teacher(),
            )  # fmt: skip
            detection = finished["detection"]
            self._write_scene_record(spec, scene_dir, detection, finished["trust"])
        except CancelledError:
            raise
        except Exception as exc:  # a failing scene is reported, the others go on
            self.fail(spec.name, "detect", exc)
            return False
        if tiles is not None:
            self.thresholds.append(float(detection["parameters"]["threshold"]))
        self.results[spec.name].update(
            status="complete",
            folder=str(scene_dir),
            polygons=detection["polygons"],
            seconds=round(time.monotonic() - mark, 2),
        )
        self.save()
        return True

    def _teacher(self) -> dict[str, Any] | None:
        return self.record["training"].get("stages", {}).get("kd", {}).get("teacher_separation")

    def _write_scene_record(
        self, spec: SceneSpec, scene_dir: Path, detection: dict[str, Any], trust: Any
    ) -> None:
        scene_record = {
            **detection,
            "job": "batch-scene",
            "batch": str(self.record_path),
            "labels": str(spec.labels) if spec.labels is not None else None,
            "training": self.record["training"],
            "parameters": {**detection["parameters"], "run": self.config.to_dict()},
            "trust": trust,
        }
        scene_record["outputs"]["run"] = str(scene_dir / defaults.RECORD_NAME)
        write_text_atomic(
            scene_dir / defaults.RECORD_NAME,
            json.dumps(scene_record, indent=2, default=str),
            overwrite=True,
        )

    def finish(self) -> dict[str, Any]:
        """Count the scenes by state, save and return the batch record."""
        counts = {
            status: sum(1 for r in self.results.values() if r.get("status") == status)
            for status in ("complete", "skipped", "failed")
        }
        self.record.update(
            status="complete" if counts["failed"] == 0 else "complete-with-failures",
            counts=counts,
            seconds=round(time.monotonic() - self.started, 2),
        )
        self.save()
        self.progress.log(
            f"batch finished: {counts['complete']} complete, {counts['skipped']} skipped, "
            f"{counts['failed']} failed; see {self.record_path}"
        )
        return {**self.record, "batch_record": str(self.record_path)}


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
