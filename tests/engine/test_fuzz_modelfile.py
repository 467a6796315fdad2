"""Fuzzing model files and their metadata: readers raise only our own errors.

Owner: RELIABILITY (issue 6 item 4). Whatever bytes or structure a ``.kdmsi`` file holds,
:func:`load_model` either returns a verified model or raises :class:`ModelFileError`.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdmsi_engine.errors import ModelFileError
from kdmsi_engine.modelfile import (
    CHECKPOINT_FORMAT,
    FORMAT_VERSION,
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
        "format_version": st.just(FORMAT_VERSION) | plain_values,
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
    """Pass the checksum so the fuzzing reaches the metadata parsing behind it."""
    payload = {
        "format": MODEL_FORMAT,
        "format_version": FORMAT_VERSION,
        "metadata_json": metadata_json,
        "tensors": tensors,
        "checksum": _checksum(metadata_json, tensors),
    }
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.kdmsi"
        torch.save(payload, path)
        _load(path)
        _load(path, expected_kind=kind)


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
