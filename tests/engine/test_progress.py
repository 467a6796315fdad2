"""Progress protocol: one JSON object a line, cancellation, and the CLI's result/error events.

Owner: RELIABILITY. The QGIS plugin's worker launcher reads ``--progress json`` line by line, so
every line on stdout must be one JSON object with ``event`` and ``stage``, and a failed job must
end with an ``error`` event plus one line on stderr.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from kdmsi_engine import cli
from kdmsi_engine.errors import CancelledError, InputError, RasterError
from kdmsi_engine.progress import (
    BarReporter,
    CancelFlag,
    JsonReporter,
    Progress,
    ProgressEvent,
    silent,
)


def _events(text: str) -> list[dict]:
    lines = text.splitlines()
    assert all(line.strip() for line in lines), "no blank lines in the JSON stream"
    return [json.loads(line) for line in lines]


def test_event_json_fields() -> None:
    stage = json.loads(ProgressEvent("stage", "train", 0, 10, "epochs").to_json())
    assert stage == {
        "event": "stage",
        "stage": "train",
        "done": 0,
        "total": 10,
        "fraction": 0.0,
        "message": "epochs",
    }
    step = json.loads(ProgressEvent("progress", "train", 3, 7, data={"loss": 0.5}).to_json())
    assert step["fraction"] == round(3 / 7, 4) and step["data"] == {"loss": 0.5}
    unknown = json.loads(ProgressEvent("progress", "tiles", 5, None).to_json())
    assert unknown["total"] is None and "fraction" not in unknown
    log = json.loads(ProgressEvent("log", "x", 9, 9, "hello").to_json())
    assert log == {"event": "log", "stage": "x", "message": "hello"}, "log has no counters"
    error = json.loads(ProgressEvent("error", message="bad", data={"type": "InputError"}).to_json())
    assert error == {
        "event": "error",
        "stage": "",
        "message": "bad",
        "data": {"type": "InputError"},
    }


def test_event_json_serialises_numbers_paths_and_tensors() -> None:
    data = {
        "loss": np.float32(0.25),
        "count": np.int64(7),
        "lr": torch.tensor(0.5),
        "path": Path("/tmp/x.tif"),
        "nested": {"iou": np.float64(0.125)},
        "other": object(),
    }
    payload = json.loads(ProgressEvent("result", "done", data=data).to_json())["data"]
    assert payload["loss"] == 0.25 and payload["count"] == 7 and payload["lr"] == 0.5
    assert payload["path"] == "/tmp/x.tif"
    assert payload["nested"] == {"iou": 0.125}
    assert isinstance(payload["other"], str)


def test_event_message_with_newline_stays_one_line() -> None:
    text = ProgressEvent("log", "s", message="two\nlines").to_json()
    assert "\n" not in text
    assert json.loads(text)["message"] == "two\nlines"


def test_json_reporter_one_object_a_line() -> None:
    stream = io.StringIO()
    progress = Progress(JsonReporter(stream))
    progress.stage("tiles", total=4, message="tiling")
    for _ in range(4):
        progress.advance(valid=np.float32(0.5))
    progress.log("note", n=np.int32(1))
    progress.stage("write")
    progress.advance(2)
    progress.result(path=Path("/a/b.tif"))
    events = _events(stream.getvalue())
    assert [e["event"] for e in events] == ["stage"] + ["progress"] * 4 + [
        "log",
        "stage",
        "progress",
        "result",
    ]
    assert [e["done"] for e in events[1:5]] == [1, 2, 3, 4]
    assert events[4]["fraction"] == 1.0
    assert events[5]["stage"] == "tiles" and events[5]["message"] == "note"
    assert events[6] == {"event": "stage", "stage": "write", "done": 0, "total": None}
    assert events[7]["done"] == 2 and events[7]["stage"] == "write"
    assert events[8]["data"] == {"path": "/a/b.tif"}


def test_progress_without_reporter_and_silent() -> None:
    for progress in (Progress(), silent()):
        progress.stage("a", 2)
        progress.advance()
        progress.log("x")
        progress.result(a=1)
        progress.check_cancelled()
        assert progress.current_stage == "a"


def test_check_cancelled_names_the_stage() -> None:
    flag = CancelFlag()
    progress = Progress(is_cancelled=flag)
    progress.stage("msi", 10)
    progress.check_cancelled()
    flag.set()
    with pytest.raises(CancelledError, match="during msi; nothing was written") as info:
        progress.check_cancelled()
    assert info.value.exit_code == 130


def test_sigterm_sets_cancel_flag() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    try:
        flag = CancelFlag()
        flag.install_signal_handlers()
        assert not flag()
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag(), "SIGTERM must become a cancel request, not an abrupt exit"
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_bar_reporter_writes_to_its_stream_only(capsys: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO()
    progress = Progress(BarReporter(stream))
    progress.stage("train", total=3, message="epochs")
    for i in range(3):
        progress.advance(loss=1.0 / (i + 1))
    progress.log("done training")
    progress.stage("unknown-total")
    progress.advance(5)
    text = stream.getvalue()
    assert "[train] epochs" in text
    assert "3/3" in text and "done training" in text
    assert "[unknown-total]" in text
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


# --- the CLI's protocol, with a stand-in command (independent of the real jobs) ---------------


def _fake_module(behaviour: str) -> types.ModuleType:
    module = types.ModuleType("kdmsi_engine.cli.fakejob")

    def _handle(args, progress):  # type: ignore[no-untyped-def]
        progress.stage("work", total=2, message="working")
        progress.advance(loss=np.float32(0.5))
        if behaviour == "input-error":
            raise InputError(
                "band 9 is out of range: the raster has 3 bands; choose others",
                parameters=("bands",),
            )
        if behaviour == "multiline-error":
            raise RasterError("first line says it\nsecond line must not appear")
        if behaviour == "interrupt":
            raise KeyboardInterrupt
        if behaviour == "cancel":
            raise CancelledError("cancelled during work; nothing was written")
        progress.advance()
        return {"path": Path("/out/x.tif"), "metrics": {"iou": np.float64(0.5)}}

    def register(subparsers, common):  # type: ignore[no-untyped-def]
        parser = subparsers.add_parser("fakejob", parents=[common], help="test")
        parser.add_argument("-b", "--bands", help="bands")
        parser.set_defaults(handler=_handle)

    module.register = register  # type: ignore[attr-defined]
    return module


@pytest.fixture
def fake_cli(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    previous = signal.getsignal(signal.SIGTERM)

    def use(behaviour: str) -> None:
        monkeypatch.setitem(sys.modules, "kdmsi_engine.cli.fakejob", _fake_module(behaviour))
        monkeypatch.setattr(cli, "COMMAND_MODULES", ("fakejob",))

    yield use
    signal.signal(signal.SIGTERM, previous)


def test_cli_json_success(fake_cli, capfd: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    fake_cli("ok")
    assert cli.main(["fakejob", "--progress", "json"]) == 0
    out, err = capfd.readouterr()
    events = _events(out)
    assert [e["event"] for e in events] == ["stage", "progress", "progress", "result"]
    assert events[-1]["data"] == {"path": "/out/x.tif", "metrics": {"iou": 0.5}}
    assert err == ""


def test_cli_text_result(fake_cli, capfd: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    fake_cli("ok")
    assert cli.main(["fakejob", "--progress", "none"]) == 0
    out, err = capfd.readouterr()
    assert out.splitlines() == ["path: /out/x.tif", 'metrics: {"iou": 0.5}']
    assert err == ""


@pytest.mark.parametrize("mode", ["json", "none", "bar"])
def test_cli_error_one_line(fake_cli, capfd, mode: str) -> None:  # type: ignore[no-untyped-def]
    fake_cli("input-error")
    assert cli.main(["fakejob", "--progress", mode]) == 2
    out, err = capfd.readouterr()
    # the engine's message names the parameter in words; the command line adds its flag
    expected = (
        "kdmsi fakejob: error: band 9 is out of range: the raster has 3 bands; choose others "
        "[--bands]"
    )
    assert err.splitlines()[-1] == expected
    if mode == "json":
        events = _events(out)
        assert events[-1]["event"] == "error"
        assert events[-1]["data"] == {"type": "InputError", "parameters": ["bands"]}
        assert events[-1]["message"].startswith("band 9 is out of range")
    if mode != "bar":
        assert err.count("\n") == 1, err


def test_cli_error_keeps_first_line_only(fake_cli, capfd) -> None:  # type: ignore[no-untyped-def]
    fake_cli("multiline-error")
    assert cli.main(["fakejob", "--progress", "json"]) == 2
    out, err = capfd.readouterr()
    assert err == "kdmsi fakejob: error: first line says it\n"
    assert _events(out)[-1]["message"] == "first line says it"


@pytest.mark.parametrize("behaviour", ["interrupt", "cancel"])
def test_cli_cancel_exit_130(fake_cli, capfd, behaviour: str) -> None:  # type: ignore[no-untyped-def]
    fake_cli(behaviour)
    assert cli.main(["fakejob", "--progress", "json"]) == 130
    out, err = capfd.readouterr()
    assert _events(out)[-1]["event"] == "error"
    assert _events(out)[-1]["data"]["type"] == "CancelledError"
    assert err.count("\n") == 1 and "nothing was written" in err


def test_cli_usage_error_one_line(fake_cli, capfd) -> None:  # type: ignore[no-untyped-def]
    fake_cli("ok")
    with pytest.raises(SystemExit) as info:
        cli.main(["fakejob", "--no-such-option"])
    assert info.value.code == 2
    _, err = capfd.readouterr()
    assert err.count("\n") == 1 and "unrecognized arguments: --no-such-option" in err
