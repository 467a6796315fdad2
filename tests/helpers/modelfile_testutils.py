"""Old model files (format version 1) written exactly as the engine wrote them before
safetensors: a ``torch.save`` of a dict with the tensors and the same checksum."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kdmsi_engine import __version__
from kdmsi_engine.modelfile import LEGACY_FORMAT_VERSION, MODEL_FORMAT, _checksum


def write_legacy_model(path: Path, metadata: dict, tensors: dict) -> Path:
    """A version 1 ``.kdmsi`` file (what ``save_model`` wrote up to engine 0.1.0)."""
    meta = dict(metadata)
    meta.setdefault("engine_version", __version__)
    metadata_json = json.dumps(meta, sort_keys=True)
    cpu = {g: {k: v.detach().cpu().clone() for k, v in s.items()} for g, s in tensors.items()}
    payload = {
        "format": MODEL_FORMAT,
        "format_version": LEGACY_FORMAT_VERSION,
        "metadata_json": metadata_json,
        "tensors": cpu,
        "checksum": _checksum(metadata_json, cpu),
    }
    torch.save(payload, path)
    return path
