"""Fuzzing model files and their metadata: readers raise only our own errors.

Owner: RELIABILITY (issue 6 item 4, issue 10 item 4). Whatever bytes or structure a ``.kdmsi``
file holds (safetensors, or an old-format or checkpoint pickle), :func:`load_model` either returns
a verified model or raises :class:`ModelFileError`.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from kdmsi_engine.errors import ModelFileError
from kdmsi_engine.modelfile import (
    CHECKPOINT_FORMAT,
    FORMAT_VERSION,
    LEGACY_FORMAT_VERSION,
    MODEL_FORMAT,
    _checksum,
    load_model,
    save_model,
)

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

small_tensors = st.builds(
    lambda shape, dtype: torch.zeros(shape, dtype=dtype),
    st.lists(st.integers(0, 3), max_size=3).map(tuple),
    st.sampled_from([torch.float32, torch.float16, torch.int64, torch.uint8, torch.bool]),
)

# Values torch's weights-only loader can hold: plain containers, numbers, strings, tensors.
plain_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=10)
    | small_tensors,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(max_size=6) | st.integers(0, 5), children, max_size=3)
    ),
    max_leaves=10,
)


def _load(path: Path, **kwargs: object) -> None:
    """Load; anything but success or ModelFileError fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = load_model(path, **kwargs)  # type: ignore[arg-type]
        except ModelFileError as exc:
            assert str(exc) and "\n" not in str(exc)
            return
    assert isinstance(model.metadata, dict)
    for group, state in model.tensors.items():
        assert isinstance(group, str)
        assert all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())


@FUZZ
@given(content=st.binary(max_size=4096))
def test_random_bytes(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.kdmsi"
        path.write_bytes(content)
        _load(path)


@FUZZ
@given(content=st.binary(min_size=1, max_size=512), where=st.floats(0, 1))
def test_bytes_spliced_into_a_real_file(content: bytes, where: float) -> None:
    """Overwrite part of a real model file with random bytes."""
    with tempfile.TemporaryDirectory() as folder:
        path = save_model(
            Path(folder) / "m.kdmsi", {"kind": "kdmsi"}, {"student": {"w": torch.ones(8, 8)}}
        )
        data = bytearray(path.read_bytes())
        start = int(where * (len(data) - 1))
        data[start : start + len(content)] = content
        path.write_bytes(bytes(data))
        _load(path)


payload_fields = st.fixed_dictionaries(
    {},
    optional={
        "format": st.sampled_from([MODEL_FORMAT, CHECKPOINT_FORMAT]) | plain_values,
        "format_version": st.just(LEGACY_FORMAT_VERSION) | plain_values,
        "metadata_json": st.builds(json.dumps, json_values) | plain_values,
        "tensors": st.dictionaries(
            st.text(max_size=6), st.dictionaries(st.text(max_size=6), small_tensors, max_size=3)
        )
        | plain_values,
        "checksum": st.text(max_size=64) | plain_values,
        "extra": plain_values,
    },
)


@FUZZ
@given(payload=payload_fields | plain_values)
def test_random_structures(payload: object) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.kdmsi"
        torch.save(payload, path)
        _load(path, expected_kind="kdmsi")
        _load(path, file_format=CHECKPOINT_FORMAT)


@FUZZ
@given(
    metadata_json=st.builds(json.dumps, json_values) | st.text(max_size=40),
    tensors=st.dictionaries(
        st.text(max_size=6), st.dictionaries(st.text(max_size=6), small_tensors, max_size=3)
    ),
    kind=st.none() | st.text(max_size=8),
)
def test_structures_with_valid_checksum(
    metadata_json: str, tensors: dict, kind: str | None
) -> None:
    """Pass the checksum so the fuzzing reaches the metadata parsing behind it (old format)."""
    payload = {
        "format": MODEL_FORMAT,
        "format_version": LEGACY_FORMAT_VERSION,
        "metadata_json": metadata_json,
        "tensors": tensors,
        "checksum": _checksum(metadata_json, tensors),
    }
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.kdmsi"
        torch.save(payload, path)
        _load(path)
        _load(path, expected_kind=kind)


# Any tensor names (with or without a group/) and small tensors of several dtypes.
st_tensors = st.dictionaries(
    st.text(max_size=8).filter(lambda k: k != "__metadata__"), small_tensors, max_size=4
)
st_fields = st.fixed_dictionaries(
    {},
    optional={
        "format": st.sampled_from([MODEL_FORMAT, CHECKPOINT_FORMAT]) | st.text(max_size=12),
        "format_version": st.sampled_from([str(FORMAT_VERSION), "1", "02", ""])
        | st.text(max_size=6),
        "metadata_json": st.builds(json.dumps, json_values) | st.text(max_size=30),
        "checksum": st.text(max_size=64),
    },
) | st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)


def _group(flat: dict) -> dict:
    grouped: dict = {}
    for key, tensor in flat.items():
        group, _, name = key.partition("/")
        grouped.setdefault(group, {})[name] = tensor
    return grouped


@FUZZ
@given(fields=st_fields | st.none(), tensors=st_tensors, valid_checksum=st.booleans())
def test_random_safetensors_files(fields: dict | None, tensors: dict, valid_checksum: bool) -> None:
    """Any header metadata and tensor names in a real safetensors file; with a valid checksum
    so the fuzzing reaches the group/name and metadata checks behind it."""
    if fields is not None and valid_checksum and isinstance(fields.get("metadata_json"), str):
        fields = {**fields, "checksum": _checksum(fields["metadata_json"], _group(tensors))}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.kdmsi"
        save_file(tensors, str(path), metadata=fields)
        _load(path, expected_kind="kdmsi")
        _load(path, file_format=CHECKPOINT_FORMAT)


@FUZZ
@given(content=st.binary(min_size=1, max_size=64), where=st.floats(0, 0.3))
def test_bytes_spliced_into_a_safetensors_header(content: bytes, where: float) -> None:
    """The header (length, JSON, metadata) is the parsed part: hit it more often."""
    with tempfile.TemporaryDirectory() as folder:
        path = save_model(
            Path(folder) / "m.kdmsi", {"kind": "kdmsi"}, {"student": {"w": torch.ones(4)}}
        )
        data = bytearray(path.read_bytes())
        start = int(where * (len(data) - 1))
        data[start : start + len(content)] = content
        path.write_bytes(bytes(data))
        _load(path)


@FUZZ
@given(metadata=st.dictionaries(st.text(max_size=10), json_values, max_size=6))
def test_any_json_metadata_round_trips(metadata: dict) -> None:
    """Whatever JSON metadata a job stores comes back equal (NaN aside), or save refuses it."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.kdmsi"
        save_model(path, metadata, {"student": {"w": torch.arange(3)}})
        loaded = load_model(path)
        expected = json.loads(
            json.dumps({"engine_version": loaded.metadata["engine_version"], **metadata})
        )
        assert json.dumps(loaded.metadata, sort_keys=True) == json.dumps(expected, sort_keys=True)


# --- KD-MSI model metadata: the architecture entry of a (checksum-valid) crafted file ----------

architectures = st.fixed_dictionaries(
    {},
    optional={
        "backbone": st.sampled_from(["resnet18", "efficientnet-lite0", "resnet9", "", "../x"])
        | json_values,
        "in_channels": st.integers(-3, 8)
        | st.sampled_from([3.7, "3", True, None, [3], 1e300, float("nan")]),
        "teacher_combination": st.sampled_from(["diff", "absdiff", "concat", "sum"]) | json_values,
        "student_combination": st.sampled_from(["diff", "absdiff", "concat", "sum"]) | json_values,
    },
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(architecture=architectures | json_values, wrap=st.booleans())
def test_fuzz_kdmsi_metadata(architecture: object, wrap: bool) -> None:
    """build_kdmsi_models on any metadata: networks, or ModelFileError; never another error."""
    from kdmsi_engine.errors import KdmsiError
    from kdmsi_engine.models.kdmsi import build_kdmsi_models

    metadata = {"kind": "kdmsi", "architecture": architecture} if wrap else architecture
    if not isinstance(metadata, dict):
        metadata = {"architecture": metadata}
    try:
        teacher, student = build_kdmsi_models(metadata)
    except KdmsiError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    arch = metadata.get("architecture", metadata)
    assert isinstance(arch["in_channels"], int) and not isinstance(arch["in_channels"], bool), (
        f"in_channels {arch['in_channels']!r} accepted"
    )
    assert teacher is not student


def test_kdmsi_metadata_absurd_band_count_refused() -> None:
    """A crafted file cannot make the engine build networks for 10000 bands (gigabytes with a
    ResNet; no imagery has that many), nor for a fractional or text band count."""
    from kdmsi_engine.models.kdmsi import build_kdmsi_models

    for count in (10**4, 3.7, "3", True):
        metadata = {"architecture": {"backbone": "efficientnet-lite0", "in_channels": count}}
        with pytest.raises(ModelFileError, match="in_channels|band"):
            build_kdmsi_models(metadata)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    architecture=architectures,
    groups=st.sampled_from([("teacher", "student"), ("student",), ("detector",), ()]),
    shape=st.sampled_from([(1,), (32, 3, 3, 3), (0,)]),
)
def test_fuzz_load_kdmsi_model(architecture: dict, groups: tuple, shape: tuple) -> None:
    """A checksum-valid file with any architecture and wrong weights: only ModelFileError."""
    from kdmsi_engine.models.kdmsi import load_kdmsi_model

    with tempfile.TemporaryDirectory() as folder:
        path = save_model(
            Path(folder) / "m.kdmsi",
            {"kind": "kdmsi", "architecture": architecture},
            {group: {"backbone.stem.weight": torch.zeros(shape)} for group in groups},
        )
        with pytest.raises(ModelFileError):
            load_kdmsi_model(path)


# --- detector metadata: a crafted architecture must be refused when loaded, not at the first
# forward pass in the middle of a detection ------------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rates=st.one_of(
        st.lists(st.integers(-2, 40), max_size=4),
        st.sampled_from([[6, 12, 18], [1], [10**12], "6,12", None, [1.5], [True]]),
    ),
    in_channels=st.sampled_from([3, 3, 3, 1, 0, -1, 3.5, "3", 10**4]),
    backbone=st.sampled_from(["efficientnet-lite0", "efficientnet-lite0", "resnet9", None]),
)
def test_fuzz_detector_metadata(rates: object, in_channels: object, backbone: object) -> None:
    from kdmsi_engine.errors import KdmsiError
    from kdmsi_engine.models.deeplab import architecture_dict, build_detector_from_metadata

    arch = {
        **architecture_dict("efficientnet-lite0", 3),
        "aspp_rates": rates,
        "in_channels": in_channels,
        "backbone": backbone,
    }
    try:
        model = build_detector_from_metadata({"architecture": arch})
    except KdmsiError as exc:
        assert isinstance(exc, ModelFileError), f"{type(exc).__name__}: {exc}"
        return
    model.eval()
    count = arch["in_channels"]
    assert isinstance(count, int) and 1 <= count < 10**4, f"in_channels {count!r} accepted"
    with torch.no_grad():
        logits = model(torch.rand(1, count, 32, 32), torch.rand(1, count, 32, 32))
    assert logits.shape == (1, 2, 32, 32)
