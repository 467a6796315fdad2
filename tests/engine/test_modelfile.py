"""Model files: round trip, altered or foreign files refused, pickled code never run.

Owner: RELIABILITY (issue 6 items 1 and 5; issue 10 item 4: safetensors). Model files are
safetensors (format version 2); the reader of old pickle files (version 1, still loaded, see
``test_modelfile_legacy.py``) and of checkpoints is tested here on crafted pickles too.
"""

from __future__ import annotations

import builtins
import json
import logging
import pathlib
import pickle
import struct
from pathlib import Path

import pytest
import torch
from modelfile_testutils import write_legacy_model
from reliability_helpers import partial_files
from safetensors import safe_open
from safetensors.torch import save_file

from kdmsi_engine import __version__
from kdmsi_engine.errors import ModelFileError, OutputError
from kdmsi_engine.modelfile import (
    CHECKPOINT_FORMAT,
    FORMAT_VERSION,
    LEGACY_FORMAT_VERSION,
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
    assert loaded.format_version == FORMAT_VERSION == 2
    assert partial_files(model_path.parent) == []


def _header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor entries and ``__metadata__``)."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length])


def test_model_file_is_safetensors_with_string_metadata(model_path: Path) -> None:
    """The layout other tools can read: group/name tensors, the four string fields."""
    assert model_path.read_bytes()[8:9] == b"{"
    with safe_open(str(model_path), framework="pt") as handle:
        fields = handle.metadata()
        keys = sorted(handle.keys())
        tensors = {key: handle.get_tensor(key) for key in keys}
    assert keys == ["student/bn.num_batches_tracked", "student/conv.weight", "teacher/conv.weight"]
    assert set(fields) == {"format", "format_version", "metadata_json", "checksum"}
    assert fields["format"] == MODEL_FORMAT and fields["format_version"] == "2"
    assert json.loads(fields["metadata_json"])["bands"] == [1, 2, 3]
    grouped = {"student": {}, "teacher": {}}
    for key, tensor in tensors.items():
        group, name = key.split("/", 1)
        grouped[group][name] = tensor
    assert fields["checksum"] == _checksum(fields["metadata_json"], grouped)


def test_channels_last_and_shared_weights_are_saved_contiguous(tmp_path: Path) -> None:
    """State dicts of channels_last networks are strided, and tied weights share storage:
    both are written as plain contiguous copies and load back equal."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 4, 1)
    ).to(memory_format=torch.channels_last)
    state = net.state_dict()
    assert not state["0.weight"].is_contiguous()
    tied = torch.nn.Linear(4, 4)
    tied_state = {"a.weight": tied.weight, "b.weight": tied.weight, "view": tied.weight[1:, :2]}
    path = save_model(
        tmp_path / "cl.kdmsi", {"kind": "kdmsi"}, {"student": state, "teacher": tied_state}
    )
    loaded = load_model(path)
    for group, original in (("student", state), ("teacher", tied_state)):
        for name, tensor in original.items():
            got = loaded.tensors[group][name]
            assert got.is_contiguous() and torch.equal(got, tensor.detach()), (group, name)
    net.eval()
    copy = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 4, 1)
    ).eval()
    copy.load_state_dict(loaded.tensors["student"])
    copy.to(memory_format=torch.channels_last)
    x = torch.rand(1, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(copy(x), net(x))


def test_a_model_file_has_no_extra_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="checkpoints"):
        save_model(tmp_path / "m.kdmsi", META, _tensors(), extra={"epoch": 1})
    with pytest.raises(ValueError, match="without '/'"):
        save_model(tmp_path / "m.kdmsi", META, {"a/b": {"w": torch.zeros(1)}})
    assert not (tmp_path / "m.kdmsi").exists()


def test_loading_logs_no_warning(model_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        load_model(model_path)
    assert caplog.records == []


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
    with pytest.raises(OutputError, match="already exists"):
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


def _tensor_range(path: Path, key: str) -> tuple[int, int]:
    """Byte range of one tensor's data in a safetensors file."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    begin, end = json.loads(data[8 : 8 + length])[key]["data_offsets"]
    return 8 + length + begin, 8 + length + end


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_altered_weight_byte_refused(model_path: Path) -> None:
    start, end = _tensor_range(model_path, "student/conv.weight")
    assert end - start == 4 * 3 * 3 * 3 * 4
    _flip(model_path, (start + end) // 2)
    with pytest.raises(ModelFileError, match="altered or damaged"):
        load_model(model_path)


def _rewrite(path: Path, change_fields=None, change_tensors=None) -> None:
    """Write the file again with its string metadata and/or tensors changed (a valid
    safetensors file: only the checksum can tell)."""
    with safe_open(str(path), framework="pt") as handle:
        fields = dict(handle.metadata())
        tensors = {key: handle.get_tensor(key).clone() for key in handle.keys()}
    if change_fields:
        change_fields(fields)
    if change_tensors:
        change_tensors(tensors)
    save_file(tensors, str(path), metadata=fields)


def test_altered_metadata_refused(tmp_path: Path) -> None:
    """Change metadata (bands 1,2,3 -> 1,2,4) keeping the file structurally valid."""
    path = save_model(tmp_path / "m.kdmsi", META, _tensors())

    def edit(fields: dict) -> None:
        fields["metadata_json"] = fields["metadata_json"].replace("[1, 2, 3]", "[1, 2, 4]")
        assert "[1, 2, 4]" in fields["metadata_json"]

    _rewrite(path, change_fields=edit)
    with pytest.raises(ModelFileError, match="altered or damaged"):
        load_model(path)


@pytest.mark.parametrize(
    "change",
    [
        lambda t: t["student/conv.weight"].view(-1).__setitem__(0, 5.0),  # a value
        lambda t: t.__setitem__("student/extra.weight", torch.zeros(1)),  # a tensor added
        lambda t: t.pop("teacher/conv.weight"),  # a tensor removed
        lambda t: t.__setitem__("student/conv.weight", t["student/conv.weight"].double()),
        lambda t: t.__setitem__("student/conv.weight", t["student/conv.weight"].reshape(12, 9)),
        lambda t: t.__setitem__("student/renamed", t.pop("student/conv.weight")),
        lambda t: t.__setitem__("detector/conv.weight", t.pop("teacher/conv.weight")),
    ],
)
def test_altered_tensors_refused(tmp_path: Path, change) -> None:  # type: ignore[no-untyped-def]
    """Values, names, dtypes, shapes, added or removed tensors: the checksum covers them all."""
    path = save_model(tmp_path / "m.kdmsi", META, _tensors())
    _rewrite(path, change_tensors=change)
    with pytest.raises(ModelFileError, match="altered or damaged"):
        load_model(path)


def _model_file(tmp_path: Path, container: str) -> Path:
    meta = {"kind": "kdmsi", "bands": [1, 2, 3]}
    if container == "legacy":
        return write_legacy_model(tmp_path / "old.kdmsi", meta, _tensors())
    return save_model(tmp_path / "m.kdmsi", meta, _tensors())


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("container", ["safetensors", "legacy"])
def test_every_altered_byte_refused_or_harmless(tmp_path: Path, container: str) -> None:
    """Flip one bit at a time across the file: refused, or (zip padding, names, the central
    directory of an old file) loaded with exactly the original metadata and weights."""
    path = _model_file(tmp_path, container)
    original = path.read_bytes()
    reference = load_model(path)
    refused = 0
    logging.getLogger("kdmsi_engine.modelfile").disabled = True  # old files warn on each load
    try:
        for offset in range(0, len(original), 3):
            altered = bytearray(original)
            altered[offset] ^= 0x01
            path.write_bytes(bytes(altered))
            try:
                loaded = load_model(path)
            except ModelFileError as exc:
                assert "\n" not in str(exc)
                refused += 1
                continue
            assert loaded.metadata == reference.metadata, offset
            assert set(loaded.tensors) == set(reference.tensors), offset
            for group, state in reference.tensors.items():
                assert set(loaded.tensors[group]) == set(state), offset
                for name, tensor in state.items():
                    assert torch.equal(loaded.tensors[group][name], tensor), (offset, group, name)
    finally:
        logging.getLogger("kdmsi_engine.modelfile").disabled = False
    flips = len(range(0, len(original), 3))
    if container == "safetensors":  # header, metadata and data: every byte counts
        assert refused == flips
    else:
        assert refused > flips // 4, "flips in the data and pickle must be refused"


@pytest.mark.parametrize("container", ["safetensors", "legacy"])
@pytest.mark.parametrize("keep", [0, 1, 8, 9, 100, 0.5, -1])
def test_truncated_file_refused(tmp_path: Path, container: str, keep: float) -> None:
    path = _model_file(tmp_path, container)
    data = path.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    path.write_bytes(data[:cut])
    with pytest.raises(ModelFileError, match="not a KD-MSI model file") as info:
        load_model(path)
    assert "\n" not in str(info.value)


class _Evil:
    """Unpickling this object opens (creates) the marker file: a stand-in for any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (builtins.open, (self.marker, "w"))


class _Touch:
    """Unpickling this object calls ``pathlib.Path.touch(marker)``: code run by the unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = pathlib.Path(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (pathlib.Path.touch, (self.marker,))


def _evil_files(tmp_path: Path, marker: Path) -> list[Path]:
    raw = tmp_path / "raw-pickle.kdmsi"
    raw.write_bytes(pickle.dumps({"format": MODEL_FORMAT, "x": _Evil(marker)}, protocol=2))
    raw_touch = tmp_path / "raw-pickle-touch.kdmsi"
    raw_touch.write_bytes(pickle.dumps({"format": MODEL_FORMAT, "x": _Touch(marker)}))
    zipped = tmp_path / "torch-zip.kdmsi"
    torch.save(
        {
            "format": MODEL_FORMAT,
            "format_version": LEGACY_FORMAT_VERSION,
            "metadata_json": json.dumps({"kind": "kdmsi"}),
            "tensors": {"student": {"w": torch.zeros(1)}},
            "checksum": "x",
            "extra": _Evil(marker),
        },
        zipped,
    )
    # An old-format model file as the engine wrote it, but with a payload among the weights.
    zipped_touch = tmp_path / "torch-zip-touch.kdmsi"
    torch.save(
        {
            "format": MODEL_FORMAT,
            "format_version": LEGACY_FORMAT_VERSION,
            "metadata_json": json.dumps({"kind": "kdmsi"}),
            "tensors": {"student": {"w": torch.zeros(1), "bias": _Touch(marker)}},
            "checksum": "x",
        },
        zipped_touch,
    )
    legacy = tmp_path / "torch-legacy.kdmsi"
    torch.save(
        {"format": MODEL_FORMAT, "x": _Evil(marker)}, legacy, _use_new_zipfile_serialization=False
    )
    return [raw, raw_touch, zipped, zipped_touch, legacy]


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


@pytest.mark.parametrize("file_format", [MODEL_FORMAT, CHECKPOINT_FORMAT])
def test_malicious_pickle_refused_and_never_run(tmp_path: Path, file_format: str) -> None:
    marker = tmp_path / "PWNED"
    for path in _evil_files(tmp_path, marker):
        with pytest.raises(ModelFileError, match="not a KD-MSI model file") as info:
            load_model(path, file_format=file_format)
        assert "\n" not in str(info.value)
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
    """An old-format (version 1, pickle) model file's payload."""
    tensors = {"student": {"w": torch.ones(2)}}
    meta = json.dumps({"kind": "kdmsi"})
    return {
        "format": MODEL_FORMAT,
        "format_version": LEGACY_FORMAT_VERSION,
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


# --- crafted safetensors files: the string metadata and the tensor names --------------------

_ST_TENSORS = {"student/w": torch.ones(2)}
_ST_META = json.dumps({"kind": "kdmsi"})


def _st_fields(meta: str = _ST_META, tensors: dict | None = None, **changes: object) -> dict:
    grouped: dict = {}
    for key, tensor in (_ST_TENSORS if tensors is None else tensors).items():
        group, _, name = key.partition("/")
        grouped.setdefault(group, {})[name] = tensor
    fields = {
        "format": MODEL_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "metadata_json": meta,
        "checksum": _checksum(meta, grouped),
    }
    for key, value in changes.items():
        if value is _DROP:
            fields.pop(key)
        else:
            fields[key] = value
    return fields


@pytest.mark.parametrize(
    ("fields", "tensors", "message"),
    [
        (None, _ST_TENSORS, "safetensors file but not a KD-MSI model file"),
        ({}, _ST_TENSORS, "safetensors file but not a KD-MSI model file"),
        (_st_fields(format="other"), None, "safetensors file but not a KD-MSI model file"),
        (_st_fields(format=_DROP), None, "safetensors file but not a KD-MSI model file"),
        (_st_fields(format=CHECKPOINT_FORMAT), None, "kdmsi-checkpoint file, expected kdmsi-m"),
        (_st_fields(format_version="1"), None, "format version '1' .*version 2"),
        (_st_fields(format_version="3"), None, "format version '3' .*version 2"),
        (_st_fields(format_version="2.0"), None, "format version '2.0'"),
        (_st_fields(format_version=" 2"), None, "format version ' 2'"),
        (_st_fields(format_version="\u0662"), None, "format version"),  # Arabic-Indic two
        (_st_fields(format_version="9" * 30), None, "format version"),
        (_st_fields(format_version=_DROP), None, "format version"),
        (_st_fields(metadata_json=_DROP), None, "missing its metadata"),
        (_st_fields(checksum=_DROP), None, "altered or damaged"),
        (_st_fields(checksum="0" * 64), None, "altered or damaged"),
        (_st_fields(tensors={"w": torch.ones(2)}), {"w": torch.ones(2)}, "outside a group"),
        (_st_fields(tensors={"/w": torch.ones(2)}), {"/w": torch.ones(2)}, "outside a group"),
        (_st_fields(tensors={"s/": torch.ones(2)}), {"s/": torch.ones(2)}, "outside a group"),
        (_st_fields(meta="{not json"), None, "unreadable metadata"),
        (_st_fields(meta="[1, 2]"), None, "malformed metadata"),
        (_st_fields(meta=json.dumps({"kind": "detector"})), None, "'detector' model, this job"),
    ],
)
def test_crafted_safetensors_refused(
    tmp_path: Path, fields: dict | None, tensors: dict | None, message: str
) -> None:
    path = tmp_path / "crafted.kdmsi"
    save_file(_ST_TENSORS if tensors is None else tensors, str(path), metadata=fields)
    with pytest.raises(ModelFileError, match=message) as info:
        load_model(path, expected_kind="kdmsi")
    assert "\n" not in str(info.value)


def test_crafted_safetensors_helper_is_accepted(tmp_path: Path) -> None:
    """The files above are refused for the one thing changed; unknown extra fields are ignored."""
    path = tmp_path / "ok.kdmsi"
    save_file(_ST_TENSORS, str(path), metadata=_st_fields(note="not covered, not used"))
    loaded = load_model(path, expected_kind="kdmsi")
    assert loaded.tensors["student"]["w"].tolist() == [1.0, 1.0]
    save_file(_ST_TENSORS, str(path), metadata=_st_fields(format=CHECKPOINT_FORMAT))
    with pytest.raises(ModelFileError, match="never safetensors"):
        load_model(path, file_format=CHECKPOINT_FORMAT)


def test_a_model_without_weights_loads_empty(tmp_path: Path) -> None:
    """No tensors at all is a valid file (the network loaders then refuse it)."""
    path = save_model(tmp_path / "empty.kdmsi", {"kind": "kdmsi"}, {})
    assert load_model(path).tensors == {}
