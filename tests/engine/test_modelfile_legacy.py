"""Old model files (format version 1, ``torch.save`` pickles): still loaded, with one deprecation
line, only by torch's weights-only loader and only on torch >= MIN_TORCH; ``kdmsi convert-model``
turns them into safetensors files that load with no warning and predict the same.

Owner: RELIABILITY (issue 10 item 4).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from cli_harness import assert_refused, run_cli
from modelfile_testutils import write_legacy_model
from reliability_helpers import listing, partial_files

from kdmsi_engine.defaults import MIN_TORCH
from kdmsi_engine.errors import ModelFileError
from kdmsi_engine.modelfile import (
    CHECKPOINT_FORMAT,
    FORMAT_VERSION,
    LEGACY_FORMAT_VERSION,
    load_model,
    save_model,
    torch_below_floor,
    torch_upgrade_command,
)

LOGGER = "kdmsi_engine.modelfile"
META = {"kind": "kdmsi", "bands": [1, 2, 3], "tile_size": 64}


def _tensors() -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return {
        "student": {"conv.weight": torch.randn(4, 3, 3, 3, generator=gen), "n": torch.tensor(2)},
        "teacher": {"conv.weight": torch.randn(4, 3, 3, 3, generator=gen).bfloat16()},
    }


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for group, state in a.items():
        assert set(state) == set(b[group]), group
        for name, tensor in state.items():
            other = b[group][name]
            assert tensor.dtype == other.dtype and torch.equal(tensor, other), (group, name)


def test_old_model_file_loads_with_one_deprecation_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = write_legacy_model(tmp_path / "old.kdmsi", META, _tensors())
    assert old.read_bytes()[:4] == b"PK\x03\x04"
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loaded = load_model(old, expected_kind="kdmsi")
    (line,) = _warnings(caplog)
    assert "old-format model file" in line and "\n" not in line
    assert f"kdmsi convert-model {old} NEW.kdmsi" in line
    assert loaded.format_version == LEGACY_FORMAT_VERSION
    assert {k: v for k, v in loaded.metadata.items() if k != "engine_version"} == META
    _assert_same(loaded.tensors, _tensors())


def test_convert_model_writes_safetensors_with_the_same_content(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    old = write_legacy_model(tmp_path / "old.kdmsi", META, _tensors())
    new = tmp_path / "new.kdmsi"
    run = run_cli(["convert-model", str(old), str(new)], capfd)
    assert run.code == 0, run.err
    assert run.err == "", "converting is not a deprecated load: no warning"
    result = run.events[-1]
    assert result["event"] == "result"
    data = result["data"]
    assert data["from_format_version"] == 1 and data["format_version"] == FORMAT_VERSION == 2
    assert data["kind"] == "kdmsi" and Path(data["model"]) == new
    assert new.read_bytes()[8:9] == b"{" and partial_files(tmp_path) == []
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        converted = load_model(new, expected_kind="kdmsi")
    assert _warnings(caplog) == []
    original = load_model(old)
    assert converted.format_version == 2 and converted.checksum == original.checksum
    assert converted.checksum == data["checksum"]
    assert converted.metadata == original.metadata  # engine_version of the run that trained it
    _assert_same(converted.tensors, original.tensors)


def test_convert_model_refuses_to_overwrite_unless_asked(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    old = write_legacy_model(tmp_path / "old.kdmsi", META, _tensors())
    new = tmp_path / "new.kdmsi"
    new.write_bytes(b"someone's file")
    assert_refused(["convert-model", str(old), str(new)], capfd, "--overwrite", watch=[tmp_path])
    assert new.read_bytes() == b"someone's file"
    assert run_cli(["convert-model", str(old), str(new), "--overwrite"], capfd).code == 0
    assert load_model(new).format_version == FORMAT_VERSION
    # In place: OLD is read completely before NEW (the same name) replaces it.
    assert run_cli(["convert-model", str(old), str(old), "--overwrite"], capfd).code == 0
    assert load_model(old).format_version == FORMAT_VERSION
    assert listing(tmp_path).keys() == {"old.kdmsi", "new.kdmsi"}


def test_convert_model_refuses_what_is_not_a_model(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    checkpoint = save_model(
        tmp_path / "m.ckpt", META, _tensors(), extra={"epoch": 1}, file_format=CHECKPOINT_FORMAT
    )
    junk = tmp_path / "junk.kdmsi"
    junk.write_bytes(b"GIF89a" + bytes(64))
    new = tmp_path / "new.kdmsi"
    assert_refused(
        ["convert-model", str(checkpoint), str(new)],
        capfd,
        "kdmsi-checkpoint file, expected kdmsi-model",
        watch=[tmp_path],
    )
    assert_refused(
        ["convert-model", str(junk), str(new)], capfd, "not a KD-MSI model file", watch=[tmp_path]
    )
    assert_refused(
        ["convert-model", str(tmp_path / "none.kdmsi"), str(new)],
        capfd,
        "does not exist",
        watch=[tmp_path],
    )


def test_convert_model_of_strided_shared_and_odd_tensors(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Old files kept tensors as saved: channels_last (strided) and sharing storage, which
    safetensors cannot write as such; names it cannot hold are refused in one line."""
    weight = torch.rand(4, 3, 3, 3).contiguous(memory_format=torch.channels_last)
    tied = torch.rand(3, 3)
    state = {"conv.weight": weight, "a.weight": tied, "b.weight": tied, "half": tied[1:]}
    old = write_legacy_model(tmp_path / "old.kdmsi", META, {"student": state})
    assert not load_model(old).tensors["student"]["conv.weight"].is_contiguous()
    new = tmp_path / "new.kdmsi"
    assert run_cli(["convert-model", str(old), str(new)], capfd).code == 0
    _assert_same(load_model(new).tensors, load_model(old).tensors)
    odd = write_legacy_model(tmp_path / "odd.kdmsi", META, {"a/b": {"w": torch.zeros(1)}})
    assert load_model(odd).tensors["a/b"]["w"].shape == (1,)
    assert_refused(
        ["convert-model", str(odd), str(tmp_path / "odd-new.kdmsi")],
        capfd,
        "cannot be converted.*without '/'",
        watch=[tmp_path],
    )


def test_convert_model_accepts_a_current_file(tmp_path: Path, capfd) -> None:  # type: ignore[no-untyped-def]
    current = save_model(tmp_path / "m.kdmsi", META, _tensors())
    run = run_cli(["convert-model", str(current), str(tmp_path / "copy.kdmsi")], capfd)
    assert run.code == 0 and run.events[-1]["data"]["from_format_version"] == 2
    assert load_model(tmp_path / "copy.kdmsi").checksum == load_model(current).checksum


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["kdmsi", "detector"])
def test_converted_real_model_predicts_the_same(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], kind: str
) -> None:
    """A real network (efficientnet-lite0, untrained) saved the old way, converted, loaded by the
    engine's own loaders: the same weights, bit-identical outputs."""
    torch.manual_seed(0)
    bands = 3
    if kind == "kdmsi":
        from kdmsi_engine.models.kdmsi import build_kdmsi_models, load_kdmsi_model

        architecture = {
            "backbone": "efficientnet-lite0",
            "in_channels": bands,
            "teacher_combination": "diff",
            "student_combination": "diff",
        }
        teacher, student = build_kdmsi_models({"architecture": architecture})
        tensors = {"teacher": teacher.state_dict(), "student": student.state_dict()}
        metadata = {"kind": "kdmsi", "architecture": architecture, "bands": [1, 2, 3]}

        def predict(path: Path) -> list[torch.Tensor]:
            loaded_teacher, loaded_student, _ = load_kdmsi_model(path)
            with torch.no_grad():
                return [net(x1, x2) for net in (loaded_teacher, loaded_student)]
    else:
        from kdmsi_engine.models.deeplab import architecture_dict, build_detector, load_detector

        net = build_detector("efficientnet-lite0", in_channels=bands)
        tensors = {"detector": net.state_dict()}
        metadata = {"kind": "detector", "architecture": architecture_dict("efficientnet-lite0", 3)}

        def predict(path: Path) -> list[torch.Tensor]:
            model, _ = load_detector(path)
            with torch.no_grad():
                return [model(x1, x2)]

    x1, x2 = torch.rand(2, bands, 64, 64), torch.rand(2, bands, 64, 64)
    old = write_legacy_model(tmp_path / "old.kdmsi", metadata, tensors)
    new = tmp_path / "new.kdmsi"
    assert run_cli(["convert-model", str(old), str(new)], capfd).code == 0
    _assert_same(load_model(new).tensors, load_model(old).tensors)
    for before, after in zip(predict(old), predict(new)):
        assert torch.equal(before, after)


# --- torch older than MIN_TORCH: its weights-only loader has a known bypass ---------------------


@pytest.mark.parametrize(
    ("version", "below"),
    [
        ("2.1.0", True),
        ("2.5.1+cu121", True),
        ("1.13.1", True),
        ("2", True),
        ("2.6.0", False),
        ("2.6.0a0+git1234", False),
        ("2.13.0+cpu", False),
        ("3.0", False),
    ],
)
def test_torch_floor(version: str, below: bool) -> None:
    assert MIN_TORCH == "2.6"
    assert torch_below_floor(version) is below


def test_old_torch_refuses_pickles_but_reads_safetensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = write_legacy_model(tmp_path / "old.kdmsi", META, _tensors())
    checkpoint = save_model(
        tmp_path / "m.ckpt", META, _tensors(), extra={"epoch": 1}, file_format=CHECKPOINT_FORMAT
    )
    current = save_model(tmp_path / "new.kdmsi", META, _tensors())
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    command = torch_upgrade_command()
    assert command.endswith('-m pip install --upgrade "torch>=2.6"')
    for path, file_format in ((old, "kdmsi-model"), (checkpoint, CHECKPOINT_FORMAT)):
        with pytest.raises(ModelFileError) as info:
            load_model(path, file_format=file_format)
        message = str(info.value)
        assert "torch 2.5.1+cpu" in message and "CVE-2025-32434" in message, message
        assert command in message and "\n" not in message
    assert loads == [], "nothing may reach the unpickler on such a torch"
    _assert_same(load_model(current).tensors, _tensors())
