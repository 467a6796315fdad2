"""Model files: tensors plus JSON metadata, loaded without unpickling code.

A ``.kdmsi`` file is a ``torch.save`` of a plain dictionary::

    {
      "format": "kdmsi-model",
      "format_version": 1,
      "metadata_json": "<JSON text>",        # architecture, bands, scaling, tile size, training
      "tensors": {"student": {...}, "teacher": {...}},   # or {"detector": {...}}
      "checksum": "<sha256 of metadata_json and every tensor>",
    }

It is read with ``torch.load(weights_only=True)``, which only rebuilds tensors and plain
containers, so a crafted file cannot run code. The checksum refuses files that were altered or
truncated. The same container with ``"format": "kdmsi-checkpoint"`` holds training checkpoints
(optimizer state and random generator states included) for ``--resume``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdmsi_engine import __version__
from kdmsi_engine.atomic import atomic_output
from kdmsi_engine.errors import ModelFileError

logger = logging.getLogger(__name__)

MODEL_FORMAT = "kdmsi-model"
CHECKPOINT_FORMAT = "kdmsi-checkpoint"
FORMAT_VERSION = 1


@dataclass
class ModelFile:
    """A loaded model file.

    Attributes:
        metadata: the JSON metadata (``kind`` is ``"kdmsi"`` or ``"detector"``).
        tensors: named state dicts, e.g. ``{"student": ..., "teacher": ...}``.
        extra: further plain values (checkpoints: optimizer state, epoch, RNG states).
    """

    metadata: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return str(self.metadata.get("kind", ""))


#: More bands than any imagery we take; a crafted file asking for more must not allocate gigabytes.
MAX_BANDS = 64


def metadata_int(value: Any, name: str, low: int, high: int) -> int:
    """An integer field of model metadata, type- and range-checked.

    Raises:
        ModelFileError: not an integer (booleans, floats and text are refused) or out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        shown = value if isinstance(value, (int, float, str)) else type(value).__name__
        raise ModelFileError(
            f"model metadata has an invalid {name} ({str(shown)[:40]!r}; expected an integer "
            f"from {low} to {high}); retrain the model"
        )
    return value


def _checksum(metadata_json: str, tensors: dict[str, dict[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256(metadata_json.encode("utf-8"))
    for group in sorted(tensors):
        for name in sorted(tensors[group]):
            tensor = tensors[group][name]
            digest.update(f"{group}/{name}/{tensor.dtype}/{tuple(tensor.shape)}".encode())
            flat = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _cpu_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def save_model(
    path: str | os.PathLike[str],
    metadata: dict[str, Any],
    tensors: dict[str, dict[str, torch.Tensor]],
    *,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
    file_format: str = MODEL_FORMAT,
) -> Path:
    """Write a model (or checkpoint) file atomically.

    Args:
        path: output file.
        metadata: JSON-serialisable metadata; ``engine_version`` is added.
        tensors: named state dicts.
        overwrite: replace an existing file.
        extra: plain values stored beside the tensors (checkpoints only).
        file_format: :data:`MODEL_FORMAT` or :data:`CHECKPOINT_FORMAT`.
    """
    meta = dict(metadata)
    meta.setdefault("engine_version", __version__)
    metadata_json = json.dumps(meta, sort_keys=True)
    cpu_tensors = {group: _cpu_state(state) for group, state in tensors.items()}
    payload: dict[str, Any] = {
        "format": file_format,
        "format_version": FORMAT_VERSION,
        "metadata_json": metadata_json,
        "tensors": cpu_tensors,
        "checksum": _checksum(metadata_json, cpu_tensors),
    }
    if extra:
        payload["extra"] = extra
    with atomic_output(path, overwrite=overwrite) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_model(
    path: str | os.PathLike[str],
    *,
    expected_kind: str | None = None,
    file_format: str = MODEL_FORMAT,
) -> ModelFile:
    """Read and verify a model (or checkpoint) file.

    Raises:
        ModelFileError: the file is missing, not one of ours, altered, or of another kind.
    """
    source = Path(path)
    if not source.is_file():
        raise ModelFileError(f"model file {source} does not exist; check the path")
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure means: not a file we wrote
        raise ModelFileError(
            f"{source} is not a KD-MSI model file (or is damaged): {type(exc).__name__}; "
            "train a model with 'kdmsi train' or 'kdmsi train-detector'"
        ) from exc
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if not isinstance(fmt, str) or fmt not in (MODEL_FORMAT, CHECKPOINT_FORMAT):
        raise ModelFileError(f"{source} is not a KD-MSI model file; train one with 'kdmsi train'")
    if fmt != file_format:
        raise ModelFileError(f"{source} is a {fmt} file, expected {file_format}; check the path")
    version = payload.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        shown = version if isinstance(version, (int, str)) else type(version).__name__
        raise ModelFileError(
            f"{source} has format version {str(shown)[:40]!r}; this engine reads version "
            f"{FORMAT_VERSION}: retrain or update the plugin"
        )
    metadata_json = payload.get("metadata_json")
    tensors = payload.get("tensors")
    if not isinstance(metadata_json, str) or not isinstance(tensors, dict):
        raise ModelFileError(f"{source} is missing its metadata or weights; retrain the model")
    for group, state in tensors.items():
        if not isinstance(group, str) or not isinstance(state, dict):
            raise ModelFileError(f"{source} has a malformed weight group; retrain the model")
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise ModelFileError(f"{source} has malformed weights; retrain the model")
    checksum = payload.get("checksum")
    if not isinstance(checksum, str) or checksum != _checksum(metadata_json, tensors):
        raise ModelFileError(
            f"{source} was altered or damaged (checksum mismatch); use the file training wrote"
        )
    try:
        metadata = json.loads(metadata_json)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{source} has unreadable metadata; retrain the model") from exc
    if not isinstance(metadata, dict):
        raise ModelFileError(f"{source} has malformed metadata; retrain the model")
    if expected_kind is not None and metadata.get("kind") != expected_kind:
        raise ModelFileError(
            f"{source} is a {metadata.get('kind')!r} model, this job needs a {expected_kind!r} "
            "model (KD-MSI models from 'kdmsi train', detectors from 'kdmsi train-detector')"
        )
    extra = payload.get("extra")
    if extra is None:
        extra = {}
    elif not isinstance(extra, dict):
        raise ModelFileError(f"{source} has malformed extra data; retrain the model")
    return ModelFile(metadata=metadata, tensors=tensors, extra=extra)
