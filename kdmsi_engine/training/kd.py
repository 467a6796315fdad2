"""KD-MSI training: a CAM teacher and a sigmoid student trained together on weak tile labels.

Per batch of tile pairs with tile labels y (1 changed, 0 unchanged):

- teacher: G_t = teacher(before, after); logit = GAP(G_t); L_cls = BCE-with-logits(logit, y);
- CAM = ReLU(G_t) / max(ReLU(G_t)) per tile, times y, detached (the KD target);
- student: L_kd = mean over valid cells of (sigmoid(G_s) - CAM)^2, at the networks' stride-16
  resolution; cells whose pixels are mostly nodata do not count;
- L = L_cls + lambda * L_kd; one SGD optimizer steps both networks (backbone lr, new 1x1 layers
  at 10x), with polynomial decay per step.
The step itself (losses, mixed precision) lives in :mod:`kdmsi_engine.training.losses`.

:func:`train_kdmsi` is the ``kdmsi train`` job; :func:`fit_kdmsi` trains on a prepared
:class:`~kdmsi_engine.training.samples.TrainingSet` (used by the ablation tool too).

Augmentation (on by default; ``augment=False`` / ``--no-augment`` turns it off): each tile pair
gets one of the 8 symmetries of the square (rot90 by k, optional flip), the same for both dates
and the valid mask. Weak label sets are small (tens to hundreds of tiles) and the teacher learns
one bit per tile, so it overfits quickly; right-angle rotations and flips change neither whether
a tile changed nor the relation between the dates, and overhead images have no preferred
orientation. Nothing radiometric is applied: it could create or hide change between the dates.

Reproducibility and resume: networks are initialised from the seed, the order of the tiles and
their augmentation in epoch ``e`` depend only on (seed, e), and a checkpoint (``OUT.ckpt``,
networks, optimizer, epoch, generator states) is written after every epoch. ``resume=True``
continues from it, and on the same device and thread count gives the same weights as a run that
was never interrupted. The checkpoint is removed once the model file is written.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdmsi_engine import __version__, defaults
from kdmsi_engine.atomic import check_output
from kdmsi_engine.device import describe_device, resolve_device
from kdmsi_engine.errors import InputError
from kdmsi_engine.modelfile import save_model
from kdmsi_engine.models.backbones import BACKBONES, resolve_backbone
from kdmsi_engine.models.kdmsi import MODEL_KIND, SiameseCAMNet, architecture, build_kdmsi_models
from kdmsi_engine.progress import Progress
from kdmsi_engine.results import TrainResult
from kdmsi_engine.training import distributed
from kdmsi_engine.training.common import (
    augment_batch,
    checkpoint_path,
    param_groups,
    seed_everything,
)
from kdmsi_engine.training.loop import Autocast, Checkpointing, LoopSettings, fit
from kdmsi_engine.training.losses import (  # noqa: F401 (re-exported)
    PRECISIONS,
    KDLosses,
    kd_losses,
    kd_target,
    make_scaler,
    prepare_for_training,
    resolve_precision,
    train_step,
    valid_cells,
)
from kdmsi_engine.training.samples import (
    DEFAULT_CACHE_BYTES,
    TileStore,
    TrainingSet,
    folder_training_set,
    manifest_training_set,
    scene_training_set,
)

logger = logging.getLogger(__name__)


def _check_params(
    *,
    backbone: str,
    epochs: int,
    batch_size: int,
    lr: float,
    kd_weight: float,
    momentum: float,
    weight_decay: float,
) -> None:
    if backbone not in BACKBONES:
        raise InputError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    if int(epochs) != epochs or epochs < 1:
        raise InputError(
            f"the number of epochs must be a whole number >= 1, got {epochs}",
            parameters=("epochs",),
        )
    if int(batch_size) != batch_size or batch_size < 1:
        raise InputError(
            f"the batch size must be a whole number >= 1, got {batch_size}",
            parameters=("batch_size",),
        )
    distributed.check_global_batch(int(batch_size))
    for name, words, value in (
        ("lr", "the learning rate", lr),
        ("kd_weight", "the distillation weight", kd_weight),
    ):
        if not (value > 0 and math.isfinite(value)):
            raise InputError(f"{words} must be a positive number, got {value}", parameters=(name,))
    if not (0 <= momentum < 1) or not (0 <= weight_decay < 1):
        raise InputError("momentum must be in [0,1) and weight decay in [0,1)")


def _check_weights(weights: str | os.PathLike[str]) -> str:
    spec = str(weights)
    if spec in ("none", "imagenet"):
        return spec
    path = Path(spec).expanduser()
    if not path.is_file():
        raise InputError(
            f"weights {spec!r} are neither 'imagenet', 'none' nor an existing file; check the path",
            parameters=("weights",),
        )
    return str(path.absolute())


@dataclass(frozen=True)
class KDConfig:
    """Stage-1 (KD-MSI) training parameters; every default from :mod:`kdmsi_engine.defaults`.

    ``backbone`` is a concrete name here (``auto`` is resolved by the job before).
    """

    backbone: str = defaults.OFFLINE_BACKBONE
    weights: str = defaults.WEIGHTS_DEFAULT
    epochs: int = defaults.KD_EPOCHS
    batch_size: int = defaults.KD_BATCH_SIZE
    lr: float = defaults.KD_LR
    momentum: float = defaults.MOMENTUM
    weight_decay: float = defaults.WEIGHT_DECAY
    power: float = defaults.POLY_POWER
    kd_weight: float = defaults.KD_WEIGHT
    teacher_combination: str = defaults.TEACHER_COMBINATION
    student_combination: str = defaults.STUDENT_COMBINATION
    seed: int = defaults.SEED
    augment: bool = True
    precision: str = "auto"

    def check(self) -> None:
        """Refuse bad values before any data is read."""
        _check_params(
            backbone=self.backbone,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            kd_weight=self.kd_weight,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )
        architecture(self.backbone, 3, self.teacher_combination, self.student_combination)

    def parameters(self) -> dict[str, Any]:
        """The training parameters as the model file records them."""
        return {
            "backbone": self.backbone,
            "weights": str(self.weights),
            "epochs": int(self.epochs),
            "batch_size": int(self.batch_size),
            "lr": float(self.lr),
            "momentum": float(self.momentum),
            "weight_decay": float(self.weight_decay),
            "poly_power": float(self.power),
            "new_layer_lr_mult": defaults.NEW_LAYER_LR_MULT,
            "kd_weight": float(self.kd_weight),
            "teacher_combination": self.teacher_combination,
            "student_combination": self.student_combination,
            "seed": int(self.seed),
            "augment": bool(self.augment),
            "optimizer": "SGD",
        }


def train_kdmsi(
    before: str | os.PathLike[str] | None = None,
    after: str | os.PathLike[str] | None = None,
    *,
    out: str | os.PathLike[str],
    labels: str | os.PathLike[str] | None = None,
    scenes: str | os.PathLike[str] | None = None,
    dataset: str | os.PathLike[str] | None = None,
    label_field: str = "change",
    unmarked_unchanged: bool = False,
    backbone: str = defaults.BACKBONE,
    weights: str | os.PathLike[str] = defaults.WEIGHTS_DEFAULT,
    epochs: int = defaults.KD_EPOCHS,
    batch_size: int = defaults.KD_BATCH_SIZE,
    lr: float = defaults.KD_LR,
    momentum: float = defaults.MOMENTUM,
    weight_decay: float = defaults.WEIGHT_DECAY,
    power: float = defaults.POLY_POWER,
    kd_weight: float = defaults.KD_WEIGHT,
    teacher_combination: str = defaults.TEACHER_COMBINATION,
    student_combination: str = defaults.STUDENT_COMBINATION,
    tile_size: int = defaults.TILE_SIZE,
    min_valid_fraction: float = 0.5,
    bands: object = None,
    seed: int = defaults.SEED,
    augment: bool = True,
    resume: bool = False,
    device: str = "auto",
    precision: str = "auto",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> TrainResult:
    """Train a KD-MSI teacher and student; write the model file ``out``.

    Give exactly one data source: ``before``/``after`` with ``labels`` (a weak-label vector
    file), ``scenes`` (a manifest CSV) or ``dataset`` (a folder ``A/ B/ label/``).

    Returns:
        ``model`` (path), ``checkpoint`` (removed), tile counts, device, precision, seconds,
        final losses.

    Raises:
        InputError: bad parameters or data-source combination.
        LabelError: the labels give no tile of one class.
        OutputError: ``out`` exists without ``overwrite``.
        CancelledError: cancelled; the checkpoint of the last finished epoch is kept.
    """
    # Longer than 80 lines: the job's documented keyword parameters, turned into one KDConfig, and its three data sources.
    progress = progress or Progress()
    given = [
        before is not None or after is not None or labels is not None,
        scenes is not None,
        dataset is not None,
    ]
    if sum(given) != 1:
        raise InputError(
            "give one data source: a scene pair with weak labels, a manifest of scenes, or a "
            "folder dataset",
            parameters=("labels", "scenes", "dataset"),
        )
    if given[0] and (before is None or after is None or labels is None):
        raise InputError(
            "training on a scene pair needs the before and after rasters and the weak labels",
            parameters=("labels",),
        )
    torch_device = resolve_device(device)
    backbone, choice = resolve_backbone(backbone, str(weights), torch_device)
    if choice:
        progress.log(f"backbone: {choice}")
    config = KDConfig(
        backbone=backbone,
        weights=str(weights),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        power=power,
        kd_weight=kd_weight,
        teacher_combination=teacher_combination,
        student_combination=student_combination,
        seed=seed,
        augment=augment,
        precision=precision,
    )
    config.check()
    config = replace(config, weights=_check_weights(weights))
    out_path = check_output(out, overwrite=overwrite)
    ckpt = checkpoint_path(out_path)
    if resume and not ckpt.is_file():
        raise InputError(
            f"resume: no checkpoint {ckpt}; run again without resume", parameters=("resume",)
        )
    progress.stage("tiles", message="collecting labelled tiles")
    common: dict[str, Any] = {
        "tile_size": tile_size,
        "bands": bands,
        "min_valid_fraction": min_valid_fraction,
    }
    if dataset is not None:
        tset = folder_training_set(dataset, progress=progress, **common)
    elif scenes is not None:
        tset = manifest_training_set(
            scenes,
            field=label_field,
            unmarked_unchanged=unmarked_unchanged,
            progress=progress,
            **common,
        )
    else:
        assert before is not None and after is not None and labels is not None
        tset = scene_training_set(
            before,
            after,
            labels,
            field=label_field,
            unmarked_unchanged=unmarked_unchanged,
            progress=progress,
            **common,
        )
    progress.log(
        f"{len(tset.tiles)} training tiles of {tset.tile_size} px: {tset.num_changed} changed, "
        f"{tset.num_unchanged} unchanged ({tset.unlabelled} unlabelled left out)"
    )
    return fit_kdmsi(
        tset,
        config,
        out=out_path,
        resume=resume,
        device=torch_device,
        overwrite=overwrite,
        progress=progress,
    )


class KDTask:
    """KD-MSI for :func:`~kdmsi_engine.training.loop.fit`: teacher and student, one loss.

    A batch is (before, after, valid mask, tile labels), augmented with the same symmetry for
    both dates and the mask; the loss is :func:`kd_losses` (BCE of the teacher's tile logit plus
    ``kd_weight`` times the student's MSE to the CAM).
    """

    stage = "train"

    def __init__(
        self,
        teacher: SiameseCAMNet,
        student: SiameseCAMNet,
        store: TileStore,
        *,
        kd_weight: float,
        augment: bool,
        device: torch.device,
    ) -> None:
        self.teacher, self.student, self.store = teacher, student, store
        self.kd_weight, self.augment, self.device = kd_weight, augment, device
        #: what the training forward passes run through (DDP wrappers with several processes)
        self._forward: dict[str, torch.nn.Module] = self.networks()

    def networks(self) -> dict[str, torch.nn.Module]:
        return {"teacher": self.teacher, "student": self.student}

    def distribute(self, wrapped: dict[str, torch.nn.Module]) -> None:
        # two wrappers: the CAM target is detached, so each network's gradients come from its
        # own loss term and each wrapper averages its own
        self._forward = dict(wrapped)

    def num_samples(self) -> int:
        return len(self.store.tset.tiles)

    def load_batch(self, indexes: list[int], generator: torch.Generator) -> tuple[Any, ...]:
        before, after, valid, labels = self.store.batch(indexes)
        if self.augment:
            before, after, valid = augment_batch(before, after, valid, generator=generator)
        return tuple(t.to(self.device) for t in (before, after, valid, labels))

    def losses(self, batch: tuple[Any, ...], autocast: Autocast) -> tuple[Any, dict[str, Any]]:
        before, after, valid, labels = batch
        with autocast():
            out = kd_losses(
                self._forward["teacher"],
                self._forward["student"],
                before,
                after,
                labels,
                valid,
                kd_weight=self.kd_weight,
            )
        return out.total, {"cls": out.cls, "kd": out.kd}


def fit_kdmsi(
    tset: TrainingSet,
    config: KDConfig,
    *,
    out: str | os.PathLike[str] | None,
    resume: bool = False,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    checkpoint: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train on a prepared training set; return a summary and, with ``out``, write the model.

    The summary always holds the trained ``teacher`` and ``student`` under ``networks`` and the
    model ``metadata``; with ``out`` the model file is written and its path is ``model``.
    """
    # Longer than 80 lines: model setup, the loop, the teacher's separation and the record.
    progress = progress or Progress()
    tset.check_classes()
    config.check()
    c = config
    torch_device = device if isinstance(device, torch.device) else resolve_device(device)
    precision = resolve_precision(c.precision, torch_device)
    out_path = check_output(out, overwrite=overwrite) if out is not None else None
    ckpt = Path(checkpoint) if checkpoint else (checkpoint_path(out_path) if out_path else None)
    arch = architecture(c.backbone, tset.num_bands, c.teacher_combination, c.student_combination)
    params = c.parameters()
    metadata = _metadata(tset, arch, params)
    seed_everything(int(c.seed))
    teacher, student = build_kdmsi_models(arch, weights=c.weights)
    prepare_for_training(teacher, torch_device)
    prepare_for_training(student, torch_device)
    groups = param_groups(
        teacher.backbone_parameters() + student.backbone_parameters(),
        teacher.new_parameters() + student.new_parameters(),
        lr=c.lr,
        weight_decay=c.weight_decay,
    )
    optimizer = torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
    settings = LoopSettings(
        epochs=int(c.epochs),
        batch_size=int(c.batch_size),
        lr=float(c.lr),
        poly_power=float(c.power),
        seed=int(c.seed),
        precision=precision,
        device=torch_device,
    )
    resume_key = {
        "architecture": arch,
        "tile_size": tset.tile_size,
        "bands": list(tset.bands),
        "parameters": params,
        "tiles": metadata["training"]["data"].get("tiles"),
    }
    steps_per_epoch = math.ceil(len(tset.tiles) / c.batch_size)
    with TileStore(tset, cache_bytes=cache_bytes, progress=progress) as store:
        task = KDTask(
            teacher, student, store, kd_weight=c.kd_weight, augment=c.augment, device=torch_device
        )
        fitted = fit(
            task,
            optimizer,
            settings,
            Checkpointing(ckpt, metadata, resume_key),
            resume=resume,
            progress=progress,
            message=f"{c.backbone}, {c.epochs} epochs of {steps_per_epoch} batches",
        )
        teacher.eval()
        student.eval()
        group = distributed.current()
        # rank 0 alone reports; the others would only repeat its numbers
        separation = (
            teacher_separation(teacher, store, c.batch_size, torch_device)
            if group.is_main
            else None
        )
    metadata["training"].update(
        batch=fitted.batch,
        history=fitted.history,
        teacher_separation=separation,
        device=describe_device(torch_device),
        precision=precision,
    )
    metadata["timings"] = {
        "train_seconds": round(fitted.seconds, 2),
        "tile_pairs_per_second": round(fitted.samples_per_second, 3)
        if fitted.samples_per_second
        else None,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
    }
    result: TrainResult = {
        "tiles": len(tset.tiles),
        "changed_tiles": tset.num_changed,
        "unchanged_tiles": tset.num_unchanged,
        "epochs": int(c.epochs),
        "device": str(torch_device),
        "precision": precision,
        "seconds": round(fitted.seconds, 1),
        "final_loss": fitted.final_loss,
        "teacher_separation": separation,
        "processes": fitted.batch.get("processes", 1),
        "per_process_batch": fitted.batch.get("per_process_batch"),
        "global_batch": fitted.batch.get("global_batch"),
    }
    if out_path is not None:
        if group.is_main:
            save_model(
                out_path,
                metadata,
                {"teacher": teacher.state_dict(), "student": student.state_dict()},
                overwrite=overwrite,
            )
            if ckpt is not None:
                with contextlib.suppress(FileNotFoundError):
                    ckpt.unlink()
        distributed.barrier(group)  # the model file exists for every process after this
        result["model"] = str(out_path)
    result["networks"] = {"teacher": teacher, "student": student}
    result["metadata"] = metadata
    return result


def _metadata(tset: TrainingSet, arch: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The model file's metadata before training (history and timings are added after)."""
    return {
        "kind": MODEL_KIND,
        "architecture": arch,
        "bands": list(tset.bands),
        "num_bands": tset.num_bands,
        "scaling": next(iter(tset.scalings.values())) if len(tset.scalings) == 1 else None,
        "scalings": tset.scalings,
        "tile_size": tset.tile_size,
        "training": {"data": tset.describe(), "parameters": params},
        "engine_version": __version__,
    }


def tile_auc(scores: Any, labels: Any) -> float | None:
    """Area under the ROC curve of tile scores for labels 1 vs 0 (ties count half)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    pos, neg = scores[labels == 1], scores[labels == 0]
    if pos.size == 0 or neg.size == 0:
        return None
    # for each changed tile: the unchanged tiles it beats, and half of those it ties with
    neg = np.sort(neg)
    below = np.searchsorted(neg, pos, side="left")
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below + 0.5 * ties).sum() / (pos.size * neg.size))


def teacher_separation(
    teacher: SiameseCAMNet, store: TileStore, batch_size: int, device: torch.device
) -> dict[str, Any]:
    """How well the trained teacher's tile logits (GAP of G) separate the labelled tiles.

    Measured on the training tiles (so an optimistic figure): the ROC AUC of the tile
    probability for changed vs unchanged tiles, and the mean probability of each class.
    """
    labels = np.asarray([t.label for t in store.tset.tiles])
    probs = np.zeros(labels.size, np.float64)
    with torch.no_grad():
        for first in range(0, labels.size, batch_size):
            indexes = list(range(first, min(first + batch_size, labels.size)))
            before, after, _, _ = store.batch(indexes)
            logits = teacher(before.to(device), after.to(device)).float().mean(dim=(1, 2, 3))
            probs[indexes] = torch.sigmoid(logits).cpu().numpy()
    auc = tile_auc(probs, labels)
    return {
        "auc": None if auc is None else round(auc, 4),
        "changed_mean_probability": round(float(probs[labels == 1].mean()), 4)
        if (labels == 1).any()
        else None,
        "unchanged_mean_probability": round(float(probs[labels == 0].mean()), 4)
        if (labels == 0).any()
        else None,
        "tiles": int(labels.size),
        "note": "on the training tiles",
    }
