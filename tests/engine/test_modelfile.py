"""Model files: round trip, altered or foreign files refused, pickled code never run.

Owner: RELIABILITY (issue 6 items 1 and 5).
"""

from __future__ import annotations

import builtins
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from reliability_helpers import partial_files

from kdmsi_engine import __version__
from kdmsi_engine.errors import ModelFileError, OutputError
from kdmsi_engine.modelfile import (
    CHECKPOINT_FORMAT,
    FORMAT_VERSION,
    MODEL_FORMAT,
    _checksum,
    load_model,
    save_model,
)


def _tensors() -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return {
        "student": {
            "conv.weight": torch.randn(4, 3, 3, 3, generator=gen),
            "bn.num_batches_tracked": torch.tensor(7),
        },
        "teacher": {"conv.weight": torch.randn(4, 3, 3, 3, generator=gen).half()},
    }


META = {
    "kind": "kdmsi",
    "backbone": "resnet18",
    "bands": [1, 2, 3],
    "scaling": {"low": [0.0, 1.0, 2.0], "high": [255.0, 254.0, 253.0], "method": "uint8"},
    "tile_size": 64,
}


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return save_model(tmp_path / "m.kdmsi", META, _tensors())


def test_round_trip(model_path: Path) -> None:
    loaded = load_model(model_path, expected_kind="kdmsi")
    assert loaded.kind == "kdmsi"
    assert loaded.metadata["engine_version"] == __version__
    assert {k: v for k, v in loaded.metadata.items() if k != "engine_version"} == META
    original = _tensors()
    assert set(loaded.tensors) == set(original)
    for group, state in original.items():
        assert set(loaded.tensors[group]) == set(state)
        for name, tensor in state.items():
            got = loaded.tensors[group][name]
            assert got.dtype == tensor.dtype and got.shape == tensor.shape
            assert torch.equal(got, tensor)
    assert loaded.extra == {}
    assert partial_files(model_path.parent) == []


def test_checkpoint_round_trip_with_extra(tmp_path: Path) -> None:
    extra = {"epoch": 3, "optimizer": {"state": {0: {"momentum": torch.ones(2)}}, "lr": 0.01}}
    path = save_model(
        tmp_path / "c.ckpt", META, _tensors(), extra=extra, file_format=CHECKPOINT_FORMAT
    )
    loaded = load_model(path, file_format=CHECKPOINT_FORMAT)
    assert loaded.extra["epoch"] == 3
    assert torch.equal(loaded.extra["optimizer"]["state"][0]["momentum"], torch.ones(2))
    with pytest.raises(ModelFileError, match="kdmsi-checkpoint file, expected kdmsi-model"):
        load_model(path)
    with pytest.raises(ModelFileError, match="expected kdmsi-checkpoint"):
        load_model(
            save_model(tmp_path / "m.kdmsi", META, _tensors()), file_format=CHECKPOINT_FORMAT
        )


def test_save_never_overwrites_unasked(model_path: Path) -> None:
    before = model_path.read_bytes()
    with pytest.raises(OutputError, match="--overwrite"):
        save_model(model_path, {"kind": "detector"}, {"detector": {"w": torch.zeros(1)}})
    assert model_path.read_bytes() == before
    save_model(
        model_path, {"kind": "detector"}, {"detector": {"w": torch.zeros(1)}}, overwrite=True
    )
    assert load_model(model_path).kind == "detector"


def test_cuda_like_tensors_saved_on_cpu(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    view = base.t()  # non-contiguous
    path = save_model(tmp_path / "v.kdmsi", {"kind": "kdmsi"}, {"student": {"w": view}})
    assert torch.equal(load_model(path).tensors["student"]["w"], view)


def test_wrong_kind(model_path: Path) -> None:
    with pytest.raises(ModelFileError, match="'kdmsi' model, this job needs a 'detector'"):
        load_model(model_path, expected_kind="detector")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "none.kdmsi")
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path)  # a folder is not a model file


def _zip_member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Byte range of each member's data in the zip archive torch.save writes (stored, no compression)."""
    ranges = {}
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            with open(path, "rb") as handle:
                handle.seek(info.header_offset + 26)
                name_len = int.from_bytes(handle.read(2), "little")
                extra_len = int.from_bytes(handle.read(2), "little")
            start = info.header_offset + 30 + name_len + extra_len
            ranges[info.filename] = (start, start + info.compress_size)
    return ranges


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_altered_weight_byte_refused(model_path: Path) -> None:
    ranges = _zip_member_offsets(model_path)
    storages = [r for name, r in ranges.items() if "/data/" in name and not name.endswith(".pkl")]
    assert storages, ranges
    start, end = max(storages, key=lambda r: r[1] - r[0])
    _flip(model_path, (start + end) // 2)
    with pytest.raises(ModelFileError, match="altered or damaged|not a KD-MSI model"):
        load_model(model_path)


def test_altered_metadata_refused(tmp_path: Path) -> None:
    """Change metadata (bands 1,2,3 -> 1,2,4) keeping the file structurally valid."""
    path = save_model(tmp_path / "m.kdmsi", META, _tensors())
    payload = torch.load(path, weights_only=True)
    payload["metadata_json"] = payload["metadata_json"].replace("[1, 2, 3]", "[1, 2, 4]")
    assert "[1, 2, 4]" in payload["metadata_json"]
    torch.save(payload, path)
    with pytest.raises(ModelFileError, match="altered or damaged"):
        load_model(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_every_altered_byte_refused_or_harmless(tmp_path: Path) -> None:
    """Flip one bit at a time across the file: refused, or (zip padding, names, the central
    directory) loaded with exactly the original metadata and weights. Never anything else."""
    path = save_model(tmp_path / "m.kdmsi", {"kind": "kdmsi", "bands": [1, 2, 3]}, _tensors())
    original = path.read_bytes()
    reference = load_model(path)
    refused = 0
    for offset in range(0, len(original), 3):
        altered = bytearray(original)
        altered[offset] ^= 0x01
        path.write_bytes(bytes(altered))
        try:
            loaded = load_model(path)
        except ModelFileError:
            refused += 1
            continue
        assert loaded.metadata == reference.metadata, offset
        assert set(loaded.tensors) == set(reference.tensors), offset
        for group, state in reference.tensors.items():
            assert set(loaded.tensors[group]) == set(state), offset
            for name, tensor in state.items():
                assert torch.equal(loaded.tensors[group][name], tensor), (offset, group, name)
    assert refused > len(original) // 3 // 4, "flips in the data and pickle must be refused"


@pytest.mark.parametrize("keep", [0, 1, 100, 0.5])
def test_truncated_file_refused(model_path: Path, keep: float) -> None:
    data = model_path.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    model_path.write_bytes(data[:cut])
    with pytest.raises(ModelFileError):
        load_model(model_path)


class _Evil:
    """Unpickling this object opens (creates) the marker file: a stand-in for any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (builtins.open, (self.marker, "w"))


def _evil_files(tmp_path: Path, marker: Path) -> list[Path]:
    raw = tmp_path / "raw-pickle.kdmsi"
    raw.write_bytes(pickle.dumps({"format": MODEL_FORMAT, "x": _Evil(marker)}, protocol=2))
    zipped = tmp_path / "torch-zip.kdmsi"
    torch.save(
        {
            "format": MODEL_FORMAT,
            "format_version": FORMAT_VERSION,
            "metadata_json": json.dumps({"kind": "kdmsi"}),
            "tensors": {"student": {"w": torch.zeros(1)}},
            "checksum": "x",
            "extra": _Evil(marker),
        },
        zipped,
    )
    legacy = tmp_path / "torch-legacy.kdmsi"
    torch.save(
        {"format": MODEL_FORMAT, "x": _Evil(marker)}, legacy, _use_new_zipfile_serialization=False
    )
    return [raw, zipped, legacy]


def test_payload_is_live(tmp_path: Path) -> None:
    """Prove the payload works: an unrestricted unpickler creates the marker (a harmless file)."""
    marker = tmp_path / "PWNED-proof"
    for path in _evil_files(tmp_path, marker):
        marker.unlink(missing_ok=True)
        if path.name.startswith("raw"):
            loaded = pickle.loads(path.read_bytes())  # deliberately unsafe, in this test only
        else:
            loaded = torch.load(path, weights_only=False)  # deliberately unsafe, here only
        assert marker.exists(), f"{path.name}: the payload must be live for the refusal to count"
        handles = [v for v in loaded.values() if hasattr(v, "close")]
        for handle in handles:
            handle.close()


def test_malicious_pickle_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    for path in _evil_files(tmp_path, marker):
        with pytest.raises(ModelFileError, match="not a KD-MSI model file"):
            load_model(path)
        assert not marker.exists(), f"{path.name}: loading ran the pickled payload"


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00" * 64,
        b"PK\x03\x04 not really a zip",
        b"GIF89a" + bytes(range(256)),
        b'{"format": "kdmsi-model"}',
    ],
)
def test_junk_files_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.kdmsi"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match="not a KD-MSI model file"):
        load_model(path)


def test_a_raster_is_not_a_model(shared_data: Path) -> None:
    with pytest.raises(ModelFileError, match="not a KD-MSI model file"):
        load_model(shared_data / "rasterio-rgb-byte" / "RGB.byte.tif")


def _valid_payload() -> dict:
    tensors = {"student": {"w": torch.ones(2)}}
    meta = json.dumps({"kind": "kdmsi"})
    return {
        "format": MODEL_FORMAT,
        "format_version": FORMAT_VERSION,
        "metadata_json": meta,
        "tensors": tensors,
        "checksum": _checksum(meta, tensors),
    }


def _with(**changes: object) -> dict:
    payload = _valid_payload()
    for key, value in changes.items():
        if value is _DROP:
            payload.pop(key)
        else:
            payload[key] = value
    return payload


_DROP = object()


def _meta_payload(meta_json: str) -> dict:
    tensors = {"student": {"w": torch.ones(2)}}
    return _with(metadata_json=meta_json, checksum=_checksum(meta_json, tensors))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"conv.weight": torch.zeros(1)}, "not a KD-MSI model file"),  # a plain state dict
        ([torch.zeros(1)], "not a KD-MSI model file"),
        (torch.zeros(3), "not a KD-MSI model file"),
        ("kdmsi-model", "not a KD-MSI model file"),
        (_with(format="other"), "not a KD-MSI model file"),
        (_with(format=_DROP), "not a KD-MSI model file"),
        (_with(format_version=2), "format version '?2"),
        (_with(format_version="1"), "format version"),
        (_with(format_version=_DROP), "format version"),
        (_with(metadata_json=_DROP), "missing its metadata"),
        (_with(metadata_json={"kind": "kdmsi"}), "missing its metadata"),
        (_with(tensors=_DROP), "missing its metadata or weights"),
        (_with(tensors=[torch.zeros(1)]), "missing its metadata or weights"),
        (_with(tensors={"student": [torch.zeros(1)]}), "malformed weight group"),
        (_with(tensors={1: {"w": torch.zeros(1)}}), "malformed weight group"),
        (_with(tensors={"student": {"w": 1.0}}), "malformed weights"),
        (_with(tensors={"student": {3: torch.zeros(1)}}), "malformed weights"),
        (_with(checksum=_DROP), "altered or damaged"),
        (_with(checksum="0" * 64), "altered or damaged"),
        (_meta_payload("{not json"), "unreadable metadata"),
        (_meta_payload("[1, 2]"), "malformed metadata"),
        (_meta_payload('"kdmsi"'), "malformed metadata"),
    ],
)
def test_other_structures_refused(tmp_path: Path, payload: object, message: str) -> None:
    path = tmp_path / "other.kdmsi"
    torch.save(payload, path)
    with pytest.raises(ModelFileError, match=message) as info:
        load_model(path, expected_kind="kdmsi")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "payload",
    [
        _with(format=torch.zeros(2)),
        _with(format_version=torch.zeros(0)),
        _with(format_version=torch.ones(2)),
        _with(format_version=[torch.zeros(2, 1)]),
        _with(checksum=torch.zeros(3)),
        _with(extra=torch.zeros(3)),
        _with(extra=[1, 2]),
    ],
)
def test_tensor_valued_fields_refused(tmp_path: Path, payload: dict) -> None:
    """Found by fuzzing: fields holding tensors, not strings/ints, are refused in one line."""
    path = tmp_path / "crafted.kdmsi"
    torch.save(payload, path)
    with pytest.raises(ModelFileError) as info:
        load_model(path)
    assert "\n" not in str(info.value)


def test_valid_payload_helper_is_accepted(tmp_path: Path) -> None:
    """The structures above are refused for the one thing changed, not for something else."""
    path = tmp_path / "ok.kdmsi"
    torch.save(_valid_payload(), path)
    assert load_model(path, expected_kind="kdmsi").tensors["student"]["w"].tolist() == [1.0, 1.0]
