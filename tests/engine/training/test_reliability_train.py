"""Training: bad input refused up front, SIGKILL loses nothing, ``--resume`` finishes the run.

Owner: RELIABILITY (issue 6 items 1 and 2). Real Taizhou Landsat pair, four labelled 64 px tiles
(points from the pair's own sample labels), efficientnet-lite0 from scratch: seconds per epoch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_harness import assert_refused
from reliability_helpers import listing, partial_files, tmpfs

from kdmsi_engine.modelfile import CHECKPOINT_FORMAT, load_model

REPO = Path(__file__).resolve().parents[3]
# Two changed and two unchanged sample points of landsat-taizhou-nanjing/label/taizhou.tif
# (EPSG:32651), in four different 64 px tiles.
CHANGED = [(204315.0, 3604605.0), (205575.0, 3598320.0)]
UNCHANGED = [(211950.0, 3604710.0), (209745.0, 3597300.0)]
TRAIN = [
    "--backbone",
    "efficientnet-lite0",
    "--weights",
    "none",
    "--batch-size",
    "2",
    "--tile-size",
    "64",
    "--device",
    "cpu",
    "--seed",
    "0",
]


def _labels(path: Path, points: list[tuple[tuple[float, float], object]], crs: bool = True) -> Path:
    doc: dict = {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "geometry": {"type": "Point", "coordinates": list(xy)},
                "properties": {"change": value},
            }
            for xy, value in points
        ],
    }
    if crs:
        doc["crs"] = {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32651"}}
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def pair(shared_data: Path) -> list[str]:
    root = shared_data / "landsat-taizhou-nanjing"
    return [str(root / "A" / "taizhou.tif"), str(root / "B" / "taizhou.tif")]


@pytest.fixture
def good_labels(tmp_path: Path) -> Path:
    points = [(xy, 1) for xy in CHANGED] + [(xy, 0) for xy in UNCHANGED]
    return _labels(tmp_path / "labels.geojson", points)


def _train_args(pair: list[str], labels: Path, model: Path, epochs: int) -> list[str]:
    return [
        "train",
        *pair,
        "--labels",
        str(labels),
        "-o",
        str(model),
        "--epochs",
        str(epochs),
        *TRAIN,
    ]


def _events(lines: list[str]) -> list[dict]:
    return [json.loads(line) for line in lines if line.startswith("{")]


@pytest.mark.slow
def test_sigkill_during_training_then_resume(pair, good_labels, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "models"
    out.mkdir()
    earlier = out / "earlier.kdmsi"
    earlier.write_bytes(b"an earlier model, must stay as it is")
    model = out / "student.kdmsi"
    ckpt = out / "student.kdmsi.ckpt"
    args = [sys.executable, "-m", "kdmsi_engine", *_train_args(pair, good_labels, model, 2)]
    # One OpenMP thread: on a busy 2-core machine two spinning threads make a step 40x slower.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(  # noqa: S603
            [*args, "--progress", "json"],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=REPO,
            env=env,
        )
    seen: list[str] = []
    deadline = time.monotonic() + 240
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            event = json.loads(line)
            if event["event"] == "progress" and event.get("data", {}).get("epoch") == 2:
                # Epoch 1 is checkpointed, epoch 2 has one of its two batches to go.
                os.kill(proc.pid, signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "training did not reach epoch 2 in time"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-2000:]

    # Nothing lost, nothing half-written under a final name.
    assert earlier.read_bytes() == b"an earlier model, must stay as it is"
    assert not model.exists(), "the model must not exist before training finished"
    checkpoint = load_model(ckpt, file_format=CHECKPOINT_FORMAT)  # complete and verified
    assert checkpoint.extra["epoch"] == 1
    assert set(checkpoint.tensors) >= {"teacher", "student"}
    epoch1 = [e for e in _events(seen) if e["event"] == "log" and "epoch 1/2" in e["message"]]
    assert epoch1, "the killed run logged its first epoch"
    leftovers = partial_files(out)
    assert all(p.name.startswith(".") for p in leftovers)

    # A fresh run without --resume refuses nothing, but --resume continues from epoch 1.
    done = subprocess.run(  # noqa: S603
        [*args, "--resume", "--progress", "json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    events = _events(done.stdout.splitlines())
    assert any(
        e["event"] == "log" and "resuming" in e["message"] and "epoch 1" in e["message"]
        for e in events
    ), [e.get("message") for e in events if e["event"] == "log"]
    train_epochs = {
        e["data"]["epoch"]
        for e in events
        if e["event"] == "progress" and e["stage"] == "train" and "data" in e
    }
    assert train_epochs == {2}, "resume runs the missing epoch only"
    assert events[-1]["event"] == "result"

    from kdmsi_engine.models.kdmsi import load_kdmsi_model

    teacher, student, metadata = load_kdmsi_model(model)
    history = metadata["training"]["history"]
    assert [round(h["epoch"]) for h in history] == [1, 2]
    assert history[0]["loss"] == pytest.approx(epoch1[0]["data"]["loss"]), (
        "epoch 1 kept from the checkpoint"
    )
    assert not ckpt.exists(), "the checkpoint is removed once the model is written"
    assert earlier.read_bytes() == b"an earlier model, must stay as it is"
    assert partial_files(out) == [], "resume removed what the killed run left behind"


def test_sigterm_cancels_training_and_keeps_the_checkpoint(
    pair, good_labels, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM (the plugin's cancel) during epoch 2: exit 130, one line naming --resume, the
    epoch-1 checkpoint kept, no model and no temporary files left."""
    out = tmp_path / "models"
    out.mkdir()
    model, ckpt = out / "student.kdmsi", out / "student.kdmsi.ckpt"
    args = [sys.executable, "-m", "kdmsi_engine", *_train_args(pair, good_labels, model, 2)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(  # noqa: S603
            [*args, "--batch-size", "1", "--progress", "json"],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=REPO,
            env=env,
        )
    events: list[dict] = []
    sent = False
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            event = json.loads(line)
            events.append(event)
            if (
                not sent
                and event["event"] == "progress"
                and event.get("data", {}).get("epoch") == 2
            ):
                os.kill(proc.pid, signal.SIGTERM)
                sent = True
    finally:
        if proc.poll() is None:
            proc.wait(timeout=120)
        if proc.stdout is not None:
            proc.stdout.close()
    lines = (tmp_path / "stderr.txt").read_text().splitlines()
    assert proc.returncode == 130, lines[-20:]
    assert len(lines) == 1 and "--resume" in lines[0], lines
    assert events[-1]["event"] == "error" and events[-1]["data"]["type"] == "CancelledError"
    assert not model.exists()
    assert load_model(ckpt, file_format=CHECKPOINT_FORMAT).extra["epoch"] == 1
    assert partial_files(out) == [], "a cancelled job removes its temporary files"


# --- bad input for training: refused before any work, nothing written -------------------------


@pytest.fixture
def out(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def test_labels_of_one_class_only(pair, tmp_path, out, capfd) -> None:  # type: ignore[no-untyped-def]
    for value, missing in ((1, "unchanged"), (0, "changed")):
        labels = _labels(
            tmp_path / f"only{value}.geojson", [(xy, value) for xy in CHANGED + UNCHANGED]
        )
        args = _train_args(pair, labels, out / "m.kdmsi", 1)
        assert_refused(args, capfd, f"(?i)both.*{missing}|{missing}.*both", watch=[out])


def test_train_label_file_no_features(pair, tmp_path, out, capfd) -> None:  # type: ignore[no-untyped-def]
    labels = _labels(tmp_path / "empty.geojson", [])
    assert_refused(_train_args(pair, labels, out / "m.kdmsi", 1), capfd, "no features", watch=[out])


def test_train_label_missing_field(pair, good_labels, out, capfd) -> None:  # type: ignore[no-untyped-def]
    args = [*_train_args(pair, good_labels, out / "m.kdmsi", 1), "--label-field", "klass"]
    assert_refused(args, capfd, "no field 'klass'", watch=[out])


@pytest.mark.parametrize("value", ["changed", 0.5, 3])
def test_train_label_values_not_integer(pair, tmp_path, out, capfd, value) -> None:  # type: ignore[no-untyped-def]
    labels = _labels(tmp_path / "bad.geojson", [(CHANGED[0], value), (UNCHANGED[0], 0)])
    args = _train_args(pair, labels, out / "m.kdmsi", 1)
    assert_refused(args, capfd, "(?i)integer|1 \\(changed\\)", watch=[out])


def test_train_labels_all_outside(pair, tmp_path, out, capfd) -> None:  # type: ignore[no-untyped-def]
    far = [((x + 500000.0, y), v) for (x, y), v in [(CHANGED[0], 1), (UNCHANGED[0], 0)]]
    labels = _labels(tmp_path / "far.geojson", far)
    assert_refused(
        _train_args(pair, labels, out / "m.kdmsi", 1), capfd, "outside the scene", watch=[out]
    )


def test_train_labels_without_crs(pair, tmp_path, out, capfd) -> None:  # type: ignore[no-untyped-def]
    """GeoJSON without a crs member is WGS84 by definition; UTM numbers then fall outside."""
    points = [(CHANGED[0], 1), (UNCHANGED[0], 0)]
    labels = _labels(tmp_path / "nocrs.geojson", points, crs=False)
    assert_refused(
        _train_args(pair, labels, out / "m.kdmsi", 1),
        capfd,
        "(?i)outside|crs|coordinates",
        watch=[out],
    )


def test_train_output_exists(pair, good_labels, out, capfd) -> None:  # type: ignore[no-untyped-def]
    model = out / "m.kdmsi"
    model.write_bytes(b"earlier")
    assert_refused(_train_args(pair, good_labels, model, 1), capfd, "--overwrite", watch=[out])
    assert model.read_bytes() == b"earlier"


def test_train_resume_without_checkpoint(pair, good_labels, out, capfd) -> None:  # type: ignore[no-untyped-def]
    args = [*_train_args(pair, good_labels, out / "m.kdmsi", 1), "--resume"]
    assert_refused(args, capfd, "no checkpoint", watch=[out])


def test_train_output_folder_not_writable(pair, good_labels, tmp_path, capfd) -> None:  # type: ignore[no-untyped-def]
    with tmpfs(tmp_path, read_only=True) as ro:
        target = (ro or tmp_path / "missing-folder") / "m.kdmsi"
        args = _train_args(pair, good_labels, target, 1)
        assert_refused(args, capfd, "(?i)writable|does not exist", watch=[tmp_path])


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (["t,{a},{b},{labels}", "t,{a},{b},{labels}"], "duplicate name 't'"),
        (["t,{a},{tmp}/missing.tif,{labels}"], "missing.tif does not exist"),
        (["t,{a},{b},{tmp}/nolabels.gpkg"], "nolabels.gpkg does not exist"),
    ],
)
def test_train_bad_manifest(pair, good_labels, tmp_path, out, capfd, rows, message) -> None:  # type: ignore[no-untyped-def]
    manifest = tmp_path / "scenes.csv"
    lines = ["name,before,after,labels"] + [
        r.format(a=pair[0], b=pair[1], labels=good_labels, tmp=tmp_path) for r in rows
    ]
    manifest.write_text("\n".join(lines) + "\n")
    args = ["train", "--scenes", str(manifest), "-o", str(out / "m.kdmsi"), "--epochs", "1", *TRAIN]
    assert_refused(args, capfd, message, watch=[out])


def test_train_checks_before_reading(pair, good_labels, out, capfd) -> None:  # type: ignore[no-untyped-def]
    """Bad parameters are refused at once (no tiling first)."""
    for extra, message in (
        (["--epochs", "0"], "(?i)epoch"),
        (["--batch-size", "0"], "(?i)batch"),
        (["--lr", "-1"], "(?i)lr|learning rate"),
        (["--weights", str(out / "none.pth")], "none.pth"),
    ):
        args = [*_train_args(pair, good_labels, out / "m.kdmsi", 1), *extra]
        run = assert_refused(args, capfd, message, watch=[out])
        assert not any(e.get("stage") == "tiles" and e["event"] == "progress" for e in run.events)


def test_listing_helper_sees_changes(tmp_path: Path) -> None:
    """The "nothing written" checks above can fail: the snapshot sees a new or changed file."""
    before = listing(tmp_path)
    (tmp_path / "x").write_text("1")
    assert listing(tmp_path) != before


@pytest.mark.parametrize("content", [b"", b"garbage" * 100], ids=["empty", "garbage"])
def test_resume_from_damaged_checkpoint(pair, good_labels, out, capfd, content: bytes) -> None:  # type: ignore[no-untyped-def]
    """A damaged OUT.ckpt is refused in one line (and kept for inspection), never half-used."""
    ckpt = out / "m.kdmsi.ckpt"
    ckpt.write_bytes(content)
    args = [*_train_args(pair, good_labels, out / "m.kdmsi", 1), "--resume"]
    assert_refused(args, capfd, "(?i)not a KD-MSI model file|damaged|checkpoint", watch=[out])
    assert ckpt.read_bytes() == content


def test_resume_from_a_model_instead_of_a_checkpoint(pair, good_labels, out, capfd) -> None:  # type: ignore[no-untyped-def]
    """A model file copied over the checkpoint name is of the wrong format: refused."""
    import torch

    from kdmsi_engine.modelfile import save_model

    save_model(out / "m.kdmsi.ckpt", {"kind": "kdmsi"}, {"student": {"w": torch.zeros(1)}})
    args = [*_train_args(pair, good_labels, out / "m.kdmsi", 1), "--resume"]
    assert_refused(
        args, capfd, "(?i)kdmsi-model file, expected kdmsi-checkpoint|checkpoint", watch=[out]
    )
