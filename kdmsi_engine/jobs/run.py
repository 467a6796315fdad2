"""``kdmsi run``: the whole chain on one scene pair with weak labels.

weak labels -> KD-MSI teacher/student (``student.kdmsi``) -> MSI change probability
(``msi_probability.tif``) and calibrated change evidence (``change_evidence.tif``) -> pseudo
labels (``pseudo_labels.tif``) -> Siamese DeepLabV3+ (``detector.kdmsi``) -> detection
(``change_probability.tif``, ``change.tif``, ``changes.gpkg``) and ``run.json`` (inputs,
parameters, versions, device, timings per stage, the trust report, and with a truth raster the
metrics of every map). Every file stays in ``OUTDIR``; all outputs are checked before the first
stage starts.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from kdmsi_engine import defaults
from kdmsi_engine.atomic import check_output, check_output_dir, write_text_atomic
from kdmsi_engine.data.manifest import SceneSpec
from kdmsi_engine.detect import software_versions
from kdmsi_engine.device import describe_device, resolve_device
from kdmsi_engine.errors import InputError, RasterError
from kdmsi_engine.jobs.config import RunConfig
from kdmsi_engine.jobs.stages import (
    SceneWork,
    detect_summary,
    finish_scene,
    timed,
    train_stages,
    truth_metrics,
)
from kdmsi_engine.progress import Progress
from kdmsi_engine.results import RunRecord


def run_outputs(folder: Path) -> dict[str, Path]:
    """Every file ``run`` writes in ``folder``, by key (the keys of ``run.json`` ``outputs``)."""
    return {
        "student": folder / defaults.STUDENT_NAME,
        "msi_probability": folder / defaults.MSI_NAME,
        "change_evidence": folder / defaults.EVIDENCE_NAME,
        "pseudo_labels": folder / defaults.PSEUDO_NAME,
        "detector": folder / defaults.DETECTOR_NAME,
        "detector_probability": folder / defaults.DETECTOR_PROBABILITY_NAME,
        "change_probability": folder / defaults.PROBABILITY_NAME,
        "change": folder / defaults.CHANGE_NAME,
        "changes": folder / defaults.CHANGES_NAME,
        "run": folder / defaults.RECORD_NAME,
    }


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
) -> RunRecord:
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
    # Longer than 80 lines: the job's documented parameters and its record.
    progress = progress or Progress()
    config = config or RunConfig()
    config.check()
    _check_inputs(before, after, labels, truth)
    folder = check_output_dir(out_dir)
    paths = run_outputs(folder)
    for path in paths.values():
        # --resume continues an interrupted run: finished stage files are reused, the rest redone.
        check_output(path, overwrite=overwrite or resume)
    torch_device = resolve_device(device)
    choices = config.resolve(torch_device)
    for stage, reason in choices.items():
        progress.log(f"{stage} backbone: {reason}")
    work = SceneWork(
        SceneSpec(name or Path(before).stem, Path(before), Path(after), Path(labels)), folder
    )
    timings: dict[str, float] = {}
    started = time.monotonic()
    stages, scene_tiles = train_stages(
        [work],
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
    tiles, held_out = scene_tiles[work.spec.name]
    finished = timed(
        timings,
        "detect_s",
        lambda: finish_scene(
            work, paths["detector"], config, tiles, held_out,
            device=device, overwrite=overwrite or resume, progress=progress,
            teacher=stages.get("kd", {}).get("teacher_separation"),
        ),
    )  # fmt: skip
    detection, trust = finished["detection"], finished["trust"]
    record: RunRecord = {
        "job": "run",
        "status": "complete",
        "scene": work.spec.name,
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
        "stages": {**stages, "detect": detect_summary(detection)},
        "trust": trust,
        "polygons": detection["polygons"],
        "change_area_m2": detection["change_area_m2"],
        "outputs": {key: str(path) for key, path in paths.items() if path.exists()},
    }
    if truth is not None:
        progress.stage("metrics", message="comparing with the truth raster")
        record["metrics"] = timed(
            timings,
            "metrics_s",
            lambda: truth_metrics(paths, Path(truth), stages, detection["parameters"]),
        )
    timings["total_s"] = round(time.monotonic() - started, 2)
    record["timings"] = timings
    write_text_atomic(
        paths["run"], json.dumps(record, indent=2, default=str), overwrite=overwrite or resume
    )
    progress.log(f"outputs in {folder}")
    return record


def _check_inputs(before: Any, after: Any, labels: Any, truth: Any) -> None:
    """Refuse missing input files before anything is written."""
    for path, what in ((before, "before raster"), (after, "after raster"), (labels, "labels")):
        if not Path(path).is_file():
            raise (RasterError if "raster" in what else InputError)(
                f"{what} {path} does not exist; check the path"
            )
    if truth is not None and not Path(truth).is_file():
        raise RasterError(f"truth raster {truth} does not exist; check the path")
