"""Model files: tensors plus JSON metadata, loaded without unpickling anything.

A ``.kdmsi`` model file (format ``kdmsi-model``, version 2) is a `safetensors
<https://huggingface.co/docs/safetensors>`_ file: an 8-byte little-endian header length, a JSON
header that lists every tensor (dtype, shape, byte range), then the raw tensor bytes. The
networks' state dicts are flattened as ``group/name`` keys (``student/encoder.conv.weight``,
``teacher/...``, or ``detector/...``), and the header's string metadata holds::

    format          "kdmsi-model"
    format_version  "2"
    metadata_json   "<JSON text>"   # architecture, bands, scaling, tile size, training, engine
    checksum        "<sha256 of metadata_json and every tensor: group, name, dtype, shape, bytes>"

Reading one parses JSON and copies bytes; nothing is unpickled, so a crafted file cannot run
code, whatever the torch version. The checksum refuses a file whose tensors or metadata were
altered, before anything uses them.

The type of a file is told from its first bytes (a torch zip archive starts with ``PK\\x03\\x04``,
a safetensors file with its header length and ``{``); anything else is refused before a reader
sees it, and a pickle only ever reaches torch's weights-only unpickler:

- **Old model files** (version 1, written before safetensors) are a ``torch.save`` of a dict with
  the same four fields and ``"tensors": {group: {name: tensor}}``. They still load, with
  ``torch.load(weights_only=True)`` and only on torch >= :data:`MIN_TORCH` (older torch has a
  known bypass, CVE-2025-32434), and each load logs one warning that names
  ``kdmsi convert-model OLD NEW``, which rewrites the file as version 2 with the same metadata,
  tensors and checksum (:func:`convert_model`).
- **Training checkpoints** (``"format": "kdmsi-checkpoint"``, ``OUT.ckpt`` for ``--resume``) hold
  the optimizer's and the random generators' states beside the networks, which safetensors
  cannot hold; they stay ``torch.save`` files of the version 1 layout (plus ``"extra"``), read
  the same guarded way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdmsi_engine import __version__
from kdmsi_engine.atomic import atomic_output, check_output
from kdmsi_engine.defaults import MIN_TORCH
from kdmsi_engine.errors import KdmsiError, ModelFileError

logger = logging.getLogger(__name__)

MODEL_FORMAT = "kdmsi-model"
CHECKPOINT_FORMAT = "kdmsi-checkpoint"
#: Version of model files: 2 is safetensors.
FORMAT_VERSION = 2
#: Old model files (``torch.save`` pickles): still read, with a deprecation warning.
LEGACY_FORMAT_VERSION = 1
#: Training checkpoints stay ``torch.save`` files of this version.
CHECKPOINT_FORMAT_VERSION = 1

#: Containers, told apart by a file's first bytes.
SAFETENSORS = "safetensors"
TORCH_ZIP = "torch zip"
_ZIP_MAGIC = b"PK\x03\x04"
#: The safetensors library refuses larger headers too.
_MAX_HEADER_BYTES = 100_000_000
#: (container, format) -> the version this engine reads there.
_READABLE = {
    (SAFETENSORS, MODEL_FORMAT): FORMAT_VERSION,
    (TORCH_ZIP, MODEL_FORMAT): LEGACY_FORMAT_VERSION,
    (TORCH_ZIP, CHECKPOINT_FORMAT): CHECKPOINT_FORMAT_VERSION,
}


@dataclass
class ModelFile:
    """A loaded model file.

    Attributes:
        metadata: the JSON metadata (``kind`` is ``"kdmsi"`` or ``"detector"``).
        tensors: named state dicts, e.g. ``{"student": ..., "teacher": ...}``.
        extra: further plain values (checkpoints: optimizer state, epoch, RNG states).
        format_version: the version the file was written in (1: old pickle format).
        checksum: the verified SHA-256 of the metadata and tensors.
    """

    metadata: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]]
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    checksum: str = ""

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


# ----------------------------------------------------------------------------- torch floor


def _release(version: str) -> tuple[int, ...]:
    """``"2.5.1+cu121"`` -> ``(2, 5, 1)``; ``"2.6.0a0+git"`` -> ``(2, 6, 0)``."""
    numbers: list[int] = []
    for part in version.split("+", 1)[0].split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        numbers.append(int(digits.group()))
        if digits.end() != len(part):
            break
    return tuple(numbers)


def torch_below_floor(version: str | None = None) -> bool:
    """Is ``version`` (default: the running torch) older than :data:`MIN_TORCH`?"""
    found = torch.__version__ if version is None else version
    return _release(str(found)) < _release(MIN_TORCH)


def torch_upgrade_command(python: str | None = None) -> str:
    """The command that upgrades torch to :data:`MIN_TORCH` or later for ``python``."""
    return f'"{python or sys.executable}" -m pip install --upgrade "torch>={MIN_TORCH}"'


def _refuse_unpickling_on_old_torch(source: Path, what: str) -> None:
    if torch_below_floor():
        raise ModelFileError(
            f"{source} is {what} in the pickle format, and torch {torch.__version__} cannot read "
            f"those safely (before {MIN_TORCH}, a crafted file runs code: CVE-2025-32434); "
            f"upgrade torch: {torch_upgrade_command()}"
        )


# ----------------------------------------------------------------------------- writing


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
    """Contiguous CPU copies that share no storage (channels_last state dicts are strided)."""
    return {
        k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        for k, v in state.items()
    }


def _flatten(tensors: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    for group, state in tensors.items():
        if not isinstance(group, str) or not group or "/" in group:
            raise ValueError(f"weight group {group!r} must be a non-empty name without '/'")
        for name, tensor in state.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"weight name {name!r} in {group!r} must be a non-empty name")
            flat[f"{group}/{name}"] = tensor
    return flat


def _write_safetensors(
    path: str | os.PathLike[str],
    metadata_json: str,
    tensors: dict[str, dict[str, torch.Tensor]],
    checksum: str,
    *,
    overwrite: bool,
) -> Path:
    from safetensors.torch import save_file

    flat = _flatten(tensors)
    header = {
        "format": MODEL_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "metadata_json": metadata_json,
        "checksum": checksum,
    }
    with atomic_output(path, overwrite=overwrite) as tmp:
        save_file(flat, str(tmp), metadata=header)
    return Path(path)


def save_model(
    path: str | os.PathLike[str],
    metadata: dict[str, Any],
    tensors: dict[str, dict[str, torch.Tensor]],
    *,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
    file_format: str = MODEL_FORMAT,
) -> Path:
    """Write a model (safetensors) or checkpoint (``torch.save``) file atomically.

    Args:
        path: output file.
        metadata: JSON-serialisable metadata; ``engine_version`` is added.
        tensors: named state dicts (group names without ``/``).
        overwrite: replace an existing file.
        extra: plain values stored beside the tensors (checkpoints only).
        file_format: :data:`MODEL_FORMAT` or :data:`CHECKPOINT_FORMAT`.

    Raises:
        ValueError: ``extra`` for a model file, an unknown format, or a group name with ``/``.
    """
    if file_format not in (MODEL_FORMAT, CHECKPOINT_FORMAT):
        raise ValueError(f"unknown model file format {file_format!r}")
    meta = dict(metadata)
    meta.setdefault("engine_version", __version__)
    metadata_json = json.dumps(meta, sort_keys=True)
    cpu_tensors = {group: _cpu_state(state) for group, state in tensors.items()}
    checksum = _checksum(metadata_json, cpu_tensors)
    if file_format == MODEL_FORMAT:
        if extra:
            raise ValueError("model files hold tensors and metadata only; extra is for checkpoints")
        return _write_safetensors(path, metadata_json, cpu_tensors, checksum, overwrite=overwrite)
    payload: dict[str, Any] = {
        "format": file_format,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "metadata_json": metadata_json,
        "tensors": cpu_tensors,
        "checksum": checksum,
    }
    if extra:
        payload["extra"] = extra
    with atomic_output(path, overwrite=overwrite) as tmp:
        torch.save(payload, tmp)
    return Path(path)


# ----------------------------------------------------------------------------- reading


def _not_ours(source: Path, detail: str = "") -> ModelFileError:
    why = f" ({detail})" if detail else ""
    return ModelFileError(
        f"{source} is not a KD-MSI model file, or it is damaged or truncated{why}; use the file "
        "training wrote, or train one with 'kdmsi train' or 'kdmsi train-detector'"
    )


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:80]}" if text else type(exc).__name__


def _container(source: Path) -> str:
    """:data:`SAFETENSORS` or :data:`TORCH_ZIP`, from the first bytes of the file."""
    try:
        size = source.stat().st_size
        with open(source, "rb") as handle:
            head = handle.read(9)
    except OSError as exc:
        raise ModelFileError(
            f"cannot read model file {source} ({exc.strerror or type(exc).__name__}); check the "
            "path and its permissions"
        ) from exc
    if head[:4] == _ZIP_MAGIC:
        return TORCH_ZIP
    if len(head) == 9 and head[8:9] == b"{":
        header_bytes = int.from_bytes(head[:8], "little")
        if 2 <= header_bytes <= min(size - 8, _MAX_HEADER_BYTES):
            return SAFETENSORS
        raise _not_ours(source, "its header runs past the end of the file")
    raise _not_ours(source)


def _read_safetensors(source: Path) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """The header fields and ``group -> name -> tensor`` of a safetensors file (copied to memory,
    so no tensor keeps the file mapped)."""
    try:
        from safetensors import safe_open
    except ImportError as exc:
        raise ModelFileError(
            f"reading {source} needs the safetensors package, which this Python lacks; install "
            f'it: "{sys.executable}" -m pip install "safetensors>=0.4"'
        ) from exc
    try:
        with safe_open(str(source), framework="pt", device="cpu") as handle:
            fields = handle.metadata()
            if not isinstance(fields, dict) or fields.get("format") not in (
                MODEL_FORMAT,
                CHECKPOINT_FORMAT,
            ):
                raise ModelFileError(
                    f"{source} is a safetensors file but not a KD-MSI model file; train one with "
                    "'kdmsi train' or 'kdmsi train-detector'"
                )
            flat = {key: handle.get_tensor(key).clone() for key in handle.keys()}
    except ModelFileError:
        raise
    except Exception as exc:  # any reader failure: damaged, truncated or not ours
        raise _not_ours(source, _reason(exc)) from exc
    fields = dict(fields)
    version = fields.get("format_version")
    if isinstance(version, str) and version.isascii() and version.isdigit() and len(version) < 10:
        fields["format_version"] = int(version)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        group, slash, name = key.partition("/")
        if not (slash and group and name):
            raise ModelFileError(
                f"{source} has a weight {key[:60]!r} outside a group (expected group/name); "
                "retrain the model"
            )
        tensors.setdefault(group, {})[name] = tensor
    return fields, tensors, {}


def _read_torch_zip(source: Path, what: str) -> tuple[dict[str, Any], Any, Any]:
    """The fields of a ``torch.save`` file, unpickled by torch's weights-only loader only."""
    _refuse_unpickling_on_old_torch(source, what)
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure means: not a file we wrote
        raise _not_ours(source, type(exc).__name__) from exc
    if not isinstance(payload, dict):
        raise _not_ours(source)
    return payload, payload.get("tensors"), payload.get("extra")


def _read(source: Path, file_format: str) -> tuple[ModelFile, str, str]:
    """Read and verify a model or checkpoint file; also return its container and its verified
    metadata text."""
    if not source.is_file():
        raise ModelFileError(f"model file {source} does not exist; check the path")
    container = _container(source)
    if container == SAFETENSORS:
        fields, tensors, extra = _read_safetensors(source)
    else:
        what = "a checkpoint" if file_format == CHECKPOINT_FORMAT else "an old model file"
        fields, tensors, extra = _read_torch_zip(source, what)
    fmt = fields.get("format")
    if not isinstance(fmt, str) or fmt not in (MODEL_FORMAT, CHECKPOINT_FORMAT):
        raise ModelFileError(f"{source} is not a KD-MSI model file; train one with 'kdmsi train'")
    if fmt != file_format:
        raise ModelFileError(f"{source} is a {fmt} file, expected {file_format}; check the path")
    version = fields.get("format_version")
    readable = _READABLE.get((container, fmt))
    if type(version) is not int or version != readable:
        shown = version if isinstance(version, (int, str)) else type(version).__name__
        detail = (
            f"{fmt} files are never {container} files"
            if readable is None
            else f"this engine reads {container} {fmt} files of version {readable}"
        )
        raise ModelFileError(
            f"{source} has format version {str(shown)[:40]!r} ({detail}); retrain or update "
            "the plugin"
        )
    metadata_json = fields.get("metadata_json")
    if not isinstance(metadata_json, str) or not isinstance(tensors, dict):
        raise ModelFileError(f"{source} is missing its metadata or weights; retrain the model")
    for group, state in tensors.items():
        if not isinstance(group, str) or not isinstance(state, dict):
            raise ModelFileError(f"{source} has a malformed weight group; retrain the model")
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
            raise ModelFileError(f"{source} has malformed weights; retrain the model")
    checksum = fields.get("checksum")
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
    if extra is None:
        extra = {}
    elif not isinstance(extra, dict):
        raise ModelFileError(f"{source} has malformed extra data; retrain the model")
    loaded = ModelFile(
        metadata=metadata, tensors=tensors, extra=extra, format_version=version, checksum=checksum
    )
    return loaded, container, metadata_json


def _check_kind(source: Path, model: ModelFile, expected_kind: str | None) -> None:
    if expected_kind is not None and model.metadata.get("kind") != expected_kind:
        raise ModelFileError(
            f"{source} is a {model.metadata.get('kind')!r} model, this job needs a "
            f"{expected_kind!r} model (KD-MSI models from 'kdmsi train', detectors from "
            "'kdmsi train-detector')"
        )


def load_model(
    path: str | os.PathLike[str],
    *,
    expected_kind: str | None = None,
    file_format: str = MODEL_FORMAT,
) -> ModelFile:
    """Read and verify a model (or checkpoint) file.

    An old model file (version 1, a ``torch.save`` pickle) loads with one logged warning that
    names ``kdmsi convert-model``.

    Raises:
        ModelFileError: the file is missing, not one of ours, altered, of another kind, or an old
            pickle file on a torch older than :data:`MIN_TORCH`.
    """
    source = Path(path)
    model, _container, _text = _read(source, file_format)
    _check_kind(source, model, expected_kind)
    if file_format == MODEL_FORMAT and model.format_version == LEGACY_FORMAT_VERSION:
        logger.warning(
            "%s is an old-format model file (a torch pickle, format version %d); it still "
            "loads, but convert it to the safetensors format: kdmsi convert-model %s NEW.kdmsi",
            source,
            LEGACY_FORMAT_VERSION,
            source,
        )
    return model


def convert_model(
    source: str | os.PathLike[str], target: str | os.PathLike[str], *, overwrite: bool = False
) -> dict[str, Any]:
    """Rewrite a model file in the current (safetensors) format.

    The metadata text, the tensors and so the checksum stay exactly as they were; the new file is
    read back and verified before this returns. ``target`` may be ``source`` (with ``overwrite``).

    Raises:
        ModelFileError: ``source`` is not a model file we can read (see :func:`load_model`).
        OutputError: ``target`` exists and ``overwrite`` is false, or cannot be written.
    """
    source_path = Path(source)
    check_output(target, overwrite=overwrite)
    model, _container, metadata_json = _read(source_path, MODEL_FORMAT)
    # Old files hold tensors as saved: strided (channels_last) or sharing storage.
    tensors = {group: _cpu_state(state) for group, state in model.tensors.items()}
    try:
        written = _write_safetensors(
            target, metadata_json, tensors, model.checksum, overwrite=overwrite
        )
    except KdmsiError:
        raise
    except Exception as exc:  # names or dtypes safetensors cannot hold: the file is not ours
        raise ModelFileError(
            f"{source_path} cannot be converted ({_reason(exc)}); retrain the model"
        ) from exc
    again, container, _text = _read(written, MODEL_FORMAT)
    if container != SAFETENSORS or again.checksum != model.checksum:  # pragma: no cover
        raise ModelFileError(f"{written} did not read back as written; convert it again")
    return {
        "model": str(written),
        "kind": model.kind,
        "from_format_version": model.format_version,
        "format_version": again.format_version,
        "checksum": again.checksum,
    }
