"""Stage 2: train the Siamese DeepLabV3+ change detector on pseudo labels.

Inputs are one scene pair with its pseudo-label raster (``PSEUDO.tif`` on the scene grid: 1
change, 0 no change, 255 ignored), or several scenes. With several scenes (``--scenes
MANIFEST``) each scene's pseudo labels come from, in this order: a ``pseudo`` column of the
manifest (path relative to the CSV's folder, like the others), else ``PSEUDO_DIR/<name>.tif``,
else ``PSEUDO_DIR/<name>/pseudo_labels.tif`` (the layout ``kdmsi batch`` writes); scenes with
none are skipped (detect-only scenes).

Training data: the scene is cut into ``tile_size`` tiles (no overlap); a tile trains only when at
least ``min_labelled`` of its pixels are labelled (pseudo 0/1 and valid in both dates). Labels are
read onto the scene grid (nearest neighbour when the pseudo raster must be warped); invalid
pixels count as 255. Loss: 2-class cross-entropy with ``ignore_index=255``.

Optimisation (paper defaults): SGD, momentum 0.9, batch 16, 50 epochs, lr 0.007 with poly decay
(power 0.9) per step, new layers (ASPP, decoder, classifier) at 10x the encoder's rate, weight
decay 1e-4 on weights. Each sample gets one of the 8 square symmetries, the same for both dates
and the labels (:func:`kdmsi_engine.training.common.augment_batch`). The run is reproducible from
``seed``: order and augmentation of an epoch depend on (seed, epoch) only, so ``resume=True``
continues from the checkpoint ``OUT.ckpt`` (written after every epoch, removed when the model is
saved) exactly as an uninterrupted run would. Cancelling stops between batches and writes no
model; the checkpoint of the last finished epoch stays for ``--resume``.

Band scaling: each scene is scaled by its own statistics (as in stage 1). With one scene the
model stores that scaling and detection applies it again; with several (``scaling`` empty in
the metadata, ``scalings`` per training scene) detection computes the scaling of the scene it
reads.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from rasterio.enums import Resampling

from kdmsi_engine import defaults
from kdmsi_engine.atomic import check_output
from kdmsi_engine.data.raster import GridReader
from kdmsi_engine.data.scene import ScenePair
from kdmsi_engine.data.tiling import tile_windows
from kdmsi_engine.device import describe_device, resolve_device
from kdmsi_engine.errors import InputError, LabelError, ManifestError, RasterError
from kdmsi_engine.modelfile import save_model
from kdmsi_engine.models.deeplab import (
    DETECTOR_KIND,
    SiameseDeepLabV3Plus,
    architecture_dict,
    build_detector,
)
from kdmsi_engine.progress import Progress
from kdmsi_engine.results import DetectorTrainResult
from kdmsi_engine.training import distributed
from kdmsi_engine.training.common import (
    augment_batch,
    checkpoint_path,
    param_groups,
    seed_everything,
)
from kdmsi_engine.training.loop import Autocast, Checkpointing, LoopSettings, fit
from kdmsi_engine.training.losses import prepare_for_training, resolve_precision

logger = logging.getLogger(__name__)

IGNORE = 255
#: Tiles held in memory as float16 up to this many bytes; larger sets are read per batch.
CACHE_BYTES = 1024 * 1024 * 1024


@dataclass
class DetectorScene:
    """One training scene: the two dates and its pseudo-label raster."""

    name: str
    before: Path
    after: Path
    pseudo: Path
    #: ``False`` for folder datasets (PNG pairs without CRS, pixels aligned as they are).
    require_crs: bool = True


@dataclass
class DetectorConfig:
    """Stage-2 training parameters (paper defaults)."""

    backbone: str = defaults.BACKBONE
    weights: str = defaults.WEIGHTS_DEFAULT
    tile_size: int = defaults.TILE_SIZE
    min_labelled: float = defaults.MIN_LABELLED
    epochs: int = defaults.DETECTOR_EPOCHS
    batch_size: int = defaults.DETECTOR_BATCH_SIZE
    lr: float = defaults.DETECTOR_LR
    momentum: float = defaults.MOMENTUM
    weight_decay: float = defaults.WEIGHT_DECAY
    new_lr_mult: float = defaults.NEW_LAYER_LR_MULT
    poly_power: float = defaults.POLY_POWER
    seed: int = defaults.SEED
    max_tiles: int | None = None
    #: A KD-MSI model file whose student backbone starts the encoder (instead of ``weights``):
    #: stage 1 has already adapted it to these images and this change.
    init_from: str | None = None
    #: ``none`` (paper: plain cross-entropy) or ``balanced`` (class weights inversely
    #: proportional to the classes' pixel counts in the training tiles, for rare change).
    class_weights: str = defaults.DETECTOR_CLASS_WEIGHTS

    def check(self) -> None:
        if self.class_weights not in ("none", "balanced"):
            raise InputError(f"class weights {self.class_weights!r} unknown; use none or balanced")
        if self.epochs < 1:
            raise InputError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {self.batch_size}")
        distributed.check_global_batch(self.batch_size)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InputError(f"learning rate must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise InputError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.tile_size < 32 or self.tile_size % 16:
            raise InputError(
                f"detector tile size must be a multiple of 16 and at least 32, got {self.tile_size}"
            )
        if not 0 < self.min_labelled <= 1:
            raise InputError(f"min labelled fraction must be in (0, 1], got {self.min_labelled}")
        if self.max_tiles is not None and self.max_tiles < 1:
            raise InputError(f"max tiles must be at least 1, got {self.max_tiles}")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def train_detector(
    before: str | os.PathLike[str] | None,
    after: str | os.PathLike[str] | None,
    pseudo: str | os.PathLike[str] | None,
    out_path: str | os.PathLike[str],
    *,
    scenes: str | os.PathLike[str] | None = None,
    pseudo_dir: str | os.PathLike[str] | None = None,
    bands: object = None,
    backbone: str = defaults.BACKBONE,
    weights: str = defaults.WEIGHTS_DEFAULT,
    tile_size: int = defaults.TILE_SIZE,
    min_labelled: float = defaults.MIN_LABELLED,
    epochs: int = defaults.DETECTOR_EPOCHS,
    batch_size: int = defaults.DETECTOR_BATCH_SIZE,
    lr: float = defaults.DETECTOR_LR,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    seed: int = 0,
    max_tiles: int | None = None,
    class_weights: str = defaults.DETECTOR_CLASS_WEIGHTS,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> DetectorTrainResult:
    """Train a detector on one scene (``before``, ``after``, ``pseudo``) or a manifest.

    Args:
        before, after: the two dates (one-scene mode).
        pseudo: pseudo-label raster on the scene grid (1/0/255).
        out_path: model file to write (kind ``detector``).
        scenes: manifest CSV (``name,before,after,labels`` and optionally ``pseudo``) instead
            of one scene.
        pseudo_dir: folder with ``<name>.tif`` or ``<name>/pseudo_labels.tif`` per scene.
        bands: 1-based bands (default: every band, see :func:`ScenePair.open`).
        backbone, weights: encoder and its starting weights (``imagenet``, ``none``, a file).
        tile_size, min_labelled: training tiles and the labelled fraction they need.
        epochs, batch_size, lr, momentum, weight_decay, seed: optimisation.
        max_tiles: use at most this many tiles (a random subset, for quick runs).
        class_weights: ``none`` (paper) or ``balanced`` (inverse class frequency).
        device: ``auto``, ``cpu``, ``cuda:N``.
        resume: continue from the checkpoint ``OUT.ckpt`` (refused when there is none).
        overwrite: replace an existing model file.
        progress: progress and cancellation.

    Returns:
        ``{"model": path, "tiles": n, "epochs": e, "final_loss": x, "device": ..., "seconds": s}``.
    """
    # Longer than 80 lines: the job's documented keyword parameters, turned into one DetectorConfig.
    if scenes is not None:
        if before or after or pseudo:
            raise InputError(
                "give either a scene pair with its pseudo labels or a manifest, not both",
                parameters=("pseudo", "scenes"),
            )
        specs = scenes_from_manifest(scenes, pseudo_dir)
    else:
        if not (before and after and pseudo):
            raise InputError(
                "give the before and after rasters with their pseudo labels, or a manifest",
                parameters=("pseudo", "scenes"),
            )
        specs = [DetectorScene(Path(before).stem, Path(before), Path(after), Path(pseudo))]
    config = DetectorConfig(
        backbone=backbone,
        weights=str(weights),
        tile_size=int(tile_size),
        min_labelled=float(min_labelled),
        epochs=int(epochs),
        batch_size=int(batch_size),
        lr=float(lr),
        momentum=float(momentum),
        weight_decay=float(weight_decay),
        seed=int(seed),
        max_tiles=max_tiles,
        class_weights=class_weights,
    )
    return train_detector_scenes(
        specs,
        out_path,
        config=config,
        bands=bands,
        device=device,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
    )


def scenes_from_manifest(
    manifest: str | os.PathLike[str], pseudo_dir: str | os.PathLike[str] | None = None
) -> list[DetectorScene]:
    """Training scenes of a manifest: those with a pseudo-label raster (see module doc)."""
    from kdmsi_engine.data.manifest import read_manifest

    path = Path(manifest)
    specs = read_manifest(path)
    folder = Path(pseudo_dir) if pseudo_dir is not None else None
    out: list[DetectorScene] = []
    for spec in specs:
        candidates: list[Path] = [spec.pseudo] if spec.pseudo is not None else []
        if folder is not None:
            candidates += [folder / f"{spec.name}.tif", folder / spec.name / defaults.PSEUDO_NAME]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            if spec.pseudo is not None:
                raise ManifestError(
                    f"pseudo labels {candidates[0]} of scene {spec.name!r} do not exist; fix "
                    "the manifest's pseudo column"
                )
            logger.info("scene %s has no pseudo labels: not used for training", spec.name)
            continue
        out.append(DetectorScene(spec.name, Path(spec.before), Path(spec.after), found))
    if not out:
        raise ManifestError(
            f"no scene of {path} has pseudo labels; add a 'pseudo' column or give the folder "
            "of pseudo labels",
            parameters=("pseudo_dir",),
        )
    return out


def _open_scenes(specs: Sequence[DetectorScene], bands: object) -> list[ScenePair]:
    """Open every scene, each with its own band scaling."""
    opened: list[ScenePair] = []
    try:
        for spec in specs:
            scene = ScenePair.open(
                spec.before,
                spec.after,
                bands=bands,
                name=spec.name,
                require_crs=spec.require_crs,
            )
            opened.append(scene)
            if scene.num_bands != opened[0].num_bands:
                raise InputError(
                    f"scene {spec.name} gives {scene.num_bands} band(s), scene "
                    f"{opened[0].name} {opened[0].num_bands}; choose the same bands for all",
                    parameters=("bands",),
                )
    except BaseException:
        for scene in opened:
            scene.close()
        raise
    return opened


def _open_pseudo(path: Path, scene: ScenePair) -> tuple[Any, GridReader]:
    if not path.is_file():
        raise RasterError(f"pseudo-label raster {path} does not exist; run 'kdmsi pseudo' first")
    try:
        dataset = rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        raise RasterError(f"pseudo-label raster {path} cannot be read: {exc}") from exc
    if dataset.count != 1 or dataset.dtypes[0] != "uint8":
        dataset.close()
        raise RasterError(
            f"pseudo-label raster {path} must be one uint8 band (1/0/255), as 'kdmsi pseudo' writes"
        )
    georef = scene.grid.crs is not None and dataset.crs is not None
    if not georef and (dataset.width, dataset.height) != (scene.grid.width, scene.grid.height):
        dataset.close()
        raise RasterError(
            f"pseudo-label raster {path} ({dataset.width}x{dataset.height}) is not on the grid of "
            f"scene {scene.name} ({scene.grid.width}x{scene.grid.height}); make it from this scene"
        )
    reader = GridReader(dataset, scene.grid, resampling=Resampling.nearest, use_geotransform=georef)
    return dataset, reader


def detector_loss(
    logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """2-class cross-entropy over the labelled pixels; pixels labelled 255 are ignored."""
    return F.cross_entropy(logits.float(), labels.long(), weight=weight, ignore_index=IGNORE)


def balanced_weights(counts: Sequence[int]) -> list[float]:
    """Class weights ``total / (classes * count)``; all 1 when a class has no pixel."""
    if min(counts) <= 0:
        return [1.0] * len(counts)
    total = float(sum(counts))
    return [total / (len(counts) * c) for c in counts]


def read_pseudo(reader: GridReader, window: Any) -> np.ndarray:
    """Pseudo labels of a grid window as uint8 (1/0, 255 where ignored or nodata)."""
    data, valid = reader.read(window, (1,))
    labels = data[0].astype(np.uint8)
    labels[~valid] = IGNORE
    labels[(labels != 0) & (labels != 1)] = IGNORE
    return labels


@dataclass
class _Tile:
    scene: int
    window: Any
    labelled: float


class _TileSet:
    """Training tiles of several scenes, cached in memory when they fit."""

    def __init__(
        self,
        scenes: list[ScenePair],
        readers: list[GridReader],
        tiles: list[_Tile],
        cache: bool,
    ) -> None:
        self.scenes = scenes
        self.readers = readers
        self.tiles = tiles
        self._cache: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
        if cache:
            self._cache = [self._read(i, half=True) for i in range(len(tiles))]

    def __len__(self) -> int:
        return len(self.tiles)

    def _read(self, index: int, half: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tile = self.tiles[index]
        win = self.scenes[tile.scene].read(tile.window)
        labels = read_pseudo(self.readers[tile.scene], tile.window)
        labels[~win.valid] = IGNORE
        dtype = np.float16 if half else np.float32
        return win.before.astype(dtype), win.after.astype(dtype), labels

    def class_counts(self) -> list[int]:
        """Pixels labelled 0 and 1 over all tiles."""
        counts = [0, 0]
        for index in range(len(self.tiles)):
            labels = self._cache[index][2] if self._cache is not None else self._read(index)[2]
            counts[0] += int(np.count_nonzero(labels == 0))
            counts[1] += int(np.count_nonzero(labels == 1))
        return counts

    def batch(self, indexes: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        items = [self._cache[i] if self._cache is not None else self._read(i) for i in indexes]
        before = torch.from_numpy(np.stack([it[0] for it in items]).astype(np.float32))
        after = torch.from_numpy(np.stack([it[1] for it in items]).astype(np.float32))
        labels = torch.from_numpy(np.stack([it[2] for it in items]).astype(np.int64))
        return before, after, labels


def _select_tiles(
    scenes: list[ScenePair],
    readers: list[GridReader],
    config: DetectorConfig,
    progress: Progress,
) -> list[_Tile]:
    windows = [tile_windows(s.grid, config.tile_size, 0) for s in scenes]
    progress.stage("tiles", total=sum(len(w) for w in windows), message="finding labelled tiles")
    tiles: list[_Tile] = []
    for index, (scene, reader, wins) in enumerate(zip(scenes, readers, windows)):
        for window in wins:
            progress.check_cancelled()
            labels = read_pseudo(reader, window)
            valid = scene.read_valid(window)
            labelled = float(((labels != IGNORE) & valid).mean())
            if labelled >= config.min_labelled:
                tiles.append(_Tile(index, window, labelled))
            progress.advance(1)
    if not tiles:
        raise LabelError(
            f"no {config.tile_size} px tile has {config.min_labelled:.0%} labelled pixels in the "
            "pseudo labels; label more tiles, lower the minimum labelled fraction or use a "
            "smaller tile size",
            parameters=("min_labelled", "tile_size"),
        )
    if config.max_tiles is not None and len(tiles) > config.max_tiles:
        generator = torch.Generator().manual_seed(config.seed)
        keep = sorted(torch.randperm(len(tiles), generator=generator)[: config.max_tiles].tolist())
        tiles = [tiles[i] for i in keep]
    return tiles


def train_detector_scenes(
    specs: Sequence[DetectorScene],
    out_path: str | os.PathLike[str],
    *,
    config: DetectorConfig | None = None,
    bands: object = None,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> DetectorTrainResult:
    """Train a detector on the given scenes and write it; see :func:`train_detector`."""
    # Longer than 80 lines: opening the scenes and pseudo labels, closing them whatever happens, and the record.
    progress = progress or Progress()
    config = config or DetectorConfig()
    config.check()
    if not specs:
        raise InputError("no training scene given")
    target = check_output(out_path, overwrite=overwrite)
    ckpt = checkpoint_path(target)
    if resume and not ckpt.is_file():
        raise InputError(
            f"resume: no checkpoint {ckpt}; run again without resume", parameters=("resume",)
        )
    torch_device = resolve_device(device)
    if config.backbone == "auto":
        from dataclasses import replace

        from kdmsi_engine.models.backbones import resolve_backbone

        chosen, reason = resolve_backbone(config.backbone, config.weights, torch_device)
        config = replace(config, backbone=chosen)
        progress.log(f"backbone: {reason}")
    for spec in specs:
        if not Path(spec.pseudo).is_file():
            raise RasterError(
                f"pseudo-label raster {spec.pseudo} does not exist; run 'kdmsi pseudo' first"
            )
    started = time.monotonic()
    scenes = _open_scenes(specs, bands)
    datasets: list[Any] = []
    readers: list[GridReader] = []
    try:
        for spec, scene in zip(specs, scenes):
            dataset, reader = _open_pseudo(Path(spec.pseudo), scene)
            datasets.append(dataset)
            readers.append(reader)
        # Build the network first: a bad backbone or weights fails before any tile is read.
        seed_everything(config.seed)
        model = build_detector(
            config.backbone,
            in_channels=scenes[0].num_bands,
            weights="none" if config.init_from else config.weights,
        )
        if config.init_from:
            encoder_from_student(model, config.init_from)
        tiles = _select_tiles(scenes, readers, config, progress)
        bytes_needed = len(tiles) * config.tile_size**2 * (scenes[0].num_bands * 2 * 2 + 1)
        data = _TileSet(scenes, readers, tiles, cache=bytes_needed <= CACHE_BYTES)
        metadata = _metadata(specs, scenes, config, len(tiles), torch_device)
        result = _fit(model, data, config, metadata, ckpt, torch_device, resume, progress)
    finally:
        for reader in readers:
            reader.close()
        for dataset in datasets:
            dataset.close()
        for scene in scenes:
            scene.close()
    metadata["training"].update(
        final_loss=result["final_loss"],
        seconds=round(time.monotonic() - started, 1),
        batch=result["batch"],
    )
    group = distributed.current()
    if group.is_main:
        save_model(
            target, metadata, {"detector": result["model"].state_dict()}, overwrite=overwrite
        )
        if ckpt.exists():
            ckpt.unlink()
        progress.log(f"detector written to {target}")
    distributed.barrier(group)  # the model file exists for every process after this
    return {
        "model": str(target),
        "tiles": len(tiles),
        "epochs": config.epochs,
        "final_loss": result["final_loss"],
        "device": describe_device(torch_device),
        "seconds": round(time.monotonic() - started, 1),
        "processes": result["batch"]["processes"],
        "per_process_batch": result["batch"]["per_process_batch"],
        "global_batch": result["batch"]["global_batch"],
    }


def encoder_from_student(model: Any, kd_model: str | os.PathLike[str]) -> None:
    """Start the detector's encoder from the student backbone of a KD-MSI model file.

    Raises:
        InputError: the KD model has another backbone or band count than the detector.
    """
    from kdmsi_engine.models.kdmsi import load_kdmsi_model

    _, student, metadata = load_kdmsi_model(kd_model)
    arch = metadata.get("architecture", {})
    wanted = (model.backbone.name, model.backbone.in_channels)
    found = (arch.get("backbone"), arch.get("in_channels"))
    if found != wanted:
        raise InputError(
            f"the KD-MSI model {Path(kd_model).name} has a {found[0]} backbone on {found[1]} "
            f"band(s), the detector a {wanted[0]} on {wanted[1]}; use the same backbone and bands"
        )
    model.backbone.load_state_dict(student.backbone.state_dict(), strict=True)
    logger.info("detector encoder starts from the student of %s", kd_model)


def _metadata(
    specs: Sequence[DetectorScene],
    scenes: list[ScenePair],
    config: DetectorConfig,
    num_tiles: int,
    device: torch.device,
) -> dict[str, Any]:
    return {
        "kind": DETECTOR_KIND,
        "architecture": architecture_dict(config.backbone, scenes[0].num_bands),
        "bands": list(scenes[0].bands),
        # One scene: its scaling, applied again at detection. Several: each scene was scaled
        # by its own statistics, and detection computes the scaling of the scene it reads.
        "scaling": scenes[0].scaling.to_dict() if len(scenes) == 1 else None,
        "scalings": {scene.name: scene.scaling.to_dict() for scene in scenes},
        "tile_size": config.tile_size,
        "backbone_weights": config.init_from or config.weights,
        "training": {
            "scenes": [
                {
                    "name": spec.name,
                    "before": str(Path(spec.before).absolute()),
                    "after": str(Path(spec.after).absolute()),
                    "pseudo": str(Path(spec.pseudo).absolute()),
                    "grid": scene.grid.to_dict(),
                }
                for spec, scene in zip(specs, scenes)
            ],
            "tiles": num_tiles,
            "loss": "cross-entropy, ignore_index 255",
            "optimizer": "SGD",
            "lr_schedule": f"poly {config.poly_power}",
            "augmentation": "dihedral (8 symmetries), same for both dates and labels",
            "device": describe_device(device),
            **config.to_dict(),
        },
    }


def _resume_key(metadata: dict[str, Any]) -> dict[str, Any]:
    training = {k: v for k, v in metadata["training"].items() if k not in ("device",)}
    return {"architecture": metadata["architecture"], "bands": metadata["bands"], **training}


class DetectorTask:
    """The detector for :func:`~kdmsi_engine.training.loop.fit`: one network, cross-entropy.

    A batch is (before, after, pseudo labels), the same symmetry for all three; a batch without
    any labelled pixel is skipped. On a CPU the network and its inputs are channels-last, the
    layout oneDNN's convolutions run fastest in.
    """

    stage = "train-detector"

    def __init__(
        self,
        model: torch.nn.Module,
        data: _TileSet,
        device: torch.device,
        class_weight: torch.Tensor | None,
    ) -> None:
        self.model, self.data, self.device, self.class_weight = model, data, device, class_weight
        self.memory_format = (
            torch.channels_last if device.type == "cpu" else torch.contiguous_format
        )
        #: what the training forward pass runs through (a DDP wrapper with several processes)
        self._forward: torch.nn.Module = model

    def networks(self) -> dict[str, torch.nn.Module]:
        return {"detector": self.model}

    def distribute(self, wrapped: dict[str, torch.nn.Module]) -> None:
        self._forward = wrapped["detector"]

    def num_samples(self) -> int:
        return len(self.data)

    def load_batch(self, indexes: list[int], generator: torch.Generator) -> tuple[Any, ...] | None:
        before, after, labels = self.data.batch(indexes)
        before, after, labels = augment_batch(before, after, labels, generator=generator)
        if not bool((labels != IGNORE).any()):
            return None
        before = before.to(self.device).contiguous(memory_format=self.memory_format)
        after = after.to(self.device).contiguous(memory_format=self.memory_format)
        return before, after, labels.to(self.device)

    def losses(self, batch: tuple[Any, ...], autocast: Autocast) -> tuple[Any, dict[str, Any]]:
        before, after, labels = batch
        with autocast():
            logits = self._forward(before, after)
        # the loss in float32 outside autocast: the log-softmax of rare-change pixels is small
        return detector_loss(logits, labels, self.class_weight), {}


def _fit(
    model: SiameseDeepLabV3Plus,
    data: _TileSet,
    config: DetectorConfig,
    metadata: dict[str, Any],
    ckpt: Path,
    device: torch.device,
    resume: bool,
    progress: Progress,
) -> dict[str, Any]:
    prepare_for_training(model, device)
    groups = param_groups(
        model.backbone_parameters(),
        model.head_parameters(),
        lr=config.lr,
        weight_decay=config.weight_decay,
        new_lr_mult=config.new_lr_mult,
    )
    optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    weight = None
    if config.class_weights == "balanced":
        counts = data.class_counts()
        weight = torch.tensor(balanced_weights(counts), dtype=torch.float32, device=device)
        metadata["training"]["class_pixel_counts"] = counts
        metadata["training"]["class_weight_values"] = [round(float(w), 4) for w in weight]
    settings = LoopSettings(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        poly_power=config.poly_power,
        seed=config.seed,
        precision=resolve_precision("auto", device),
        device=device,
    )
    fitted = fit(
        DetectorTask(model, data, device, weight),
        optimizer,
        settings,
        Checkpointing(ckpt, metadata, _resume_key(metadata)),
        resume=resume,
        progress=progress,
        message=f"{len(data)} tiles, {config.epochs} epochs, batch {config.batch_size}",
    )
    model.to(torch.device("cpu")).to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    model.eval()
    final = fitted.final_loss
    return {
        "model": model,
        "final_loss": None if final is None else round(final, 5),
        "batch": fitted.batch,
    }
