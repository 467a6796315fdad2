"""The one training loop: KD-MSI and the detector share resume, finite-loss and cancel rules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from kdmsi_engine.errors import CancelledError, InputError, TrainingError
from kdmsi_engine.progress import Progress
from kdmsi_engine.training.common import checkpoint_path
from kdmsi_engine.training.detector import train_detector
from kdmsi_engine.training.kd import train_kdmsi
from kdmsi_engine.training.loop import _differences

DETECTOR = dict(
    backbone="resnet18", weights="none", tile_size=32, batch_size=2, device="cpu", max_tiles=4
)


@pytest.fixture(scope="module")
def taizhou(shared_data: Path) -> dict[str, Path]:
    root = shared_data / "landsat-taizhou-nanjing"
    # the sample reference is a 1/0/255 raster on the scene grid, like pseudo labels
    return {"before": root / "A" / "taizhou.tif", "after": root / "B" / "taizhou.tif",
            "pseudo": root / "label" / "taizhou.tif"}  # fmt: skip


def _detector(taizhou: dict[str, Path], out: Path, **options: object) -> dict:
    return train_detector(
        taizhou["before"], taizhou["after"], taizhou["pseudo"], out, **{**DETECTOR, **options}
    )


def test_detector_resume_without_checkpoint_is_refused(tmp_path: Path, taizhou) -> None:
    """Same rule as KD training: resume needs a checkpoint (it used to start afresh silently)."""
    with pytest.raises(InputError, match="no checkpoint") as caught:
        _detector(taizhou, tmp_path / "d.kdmsi", epochs=1, resume=True)
    assert caught.value.parameters == ("resume",)
    assert list(tmp_path.iterdir()) == []


def test_detector_divergence_stops_without_a_model(tmp_path: Path, taizhou) -> None:
    """Same rule as KD training: a NaN/inf loss stops the run (no model of NaNs is written)."""
    with pytest.raises(TrainingError, match="diverged") as caught:
        _detector(taizhou, tmp_path / "d.kdmsi", epochs=2, lr=1e30)
    assert "lr" in caught.value.parameters
    assert not (tmp_path / "d.kdmsi").exists()


def test_kd_divergence_stops_without_a_model(shared_data: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for sub in ("A", "B", "label"):
        (root / sub).mkdir(parents=True)
        (root / sub / "9_3.png").symlink_to(shared_data / "dsifn-cd-samples" / sub / "9_3.png")
    with pytest.raises(TrainingError, match="diverged"):
        train_kdmsi(
            dataset=root, out=tmp_path / "m.kdmsi", backbone="efficientnet-lite0",
            weights="none", epochs=2, batch_size=2, tile_size=128, lr=1e30, device="cpu",
        )  # fmt: skip
    assert not (tmp_path / "m.kdmsi").exists()


def test_detector_cancel_names_the_checkpoint_and_other_options_are_refused(
    tmp_path: Path, taizhou
) -> None:
    steps = {"n": 0}

    def count(event) -> None:  # type: ignore[no-untyped-def]
        if event.kind == "progress" and event.stage == "train-detector":
            steps["n"] += 1

    out = tmp_path / "d.kdmsi"
    with pytest.raises(CancelledError, match="saved in .*d.kdmsi.ckpt") as caught:
        _detector(taizhou, out, epochs=2, progress=Progress(count, lambda: steps["n"] >= 3))
    assert caught.value.parameters == ("resume",)
    assert checkpoint_path(out).is_file() and not out.exists()
    with pytest.raises(InputError, match=r"other training parameters \(lr\)|other .*lr"):
        _detector(taizhou, out, epochs=2, lr=0.5, resume=True)
    result = _detector(taizhou, out, epochs=2, resume=True)
    assert out.is_file() and not checkpoint_path(out).exists()
    assert result["final_loss"] is not None and math.isfinite(result["final_loss"])


def test_resume_key_differences_are_named() -> None:
    saved = {"bands": [1, 2], "parameters": {"lr": 0.1, "seed": 0}}
    assert _differences(saved, saved) == ""
    wanted = {"bands": [1, 2, 3], "parameters": {"lr": 0.1, "seed": 1}}
    assert _differences(saved, wanted) == "bands, training parameters (seed)"
