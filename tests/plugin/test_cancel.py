"""Cancelling a running training ends the worker within seconds and leaves no output."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest


def worker_processes(marker: str) -> list[int]:
    """Live processes whose command line mentions ``marker`` (the unique output path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            state = (entry / "stat").read_text().split()[2]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def test_cancel_training_ends_worker_and_writes_nothing(plugin, taizhou, weak_labels, tmp_path):
    from qgis.core import QgsProcessingException, QgsProcessingFeedback
    from qgis_env import run_algorithm as run

    folder = tmp_path / "cancel"
    folder.mkdir()
    output = folder / "model.kdmsi"

    class CancelWhenTraining(QgsProcessingFeedback):
        """Cancels once the worker reports training progress (or 20 s after it started)."""

        def __init__(self) -> None:
            super().__init__()
            self.cancelled_at: float | None = None
            self.seen_worker = threading.Event()

        def _cancel(self) -> None:
            if self.cancelled_at is None:
                assert worker_processes(str(output)), "the worker should be running"
                self.cancelled_at = time.monotonic()
                self.cancel()

        def setProgressText(self, text: str) -> None:  # noqa: N802
            super().setProgressText(text)
            self.seen_worker.set()
            if "train" in text.lower() or "epoch" in text.lower():
                self._cancel()

        def pushDebugInfo(self, text: str) -> None:  # noqa: N802 (progress with numbers)
            super().pushDebugInfo(text)
            self._cancel()

    feedback = CancelWhenTraining()
    fallback = threading.Timer(60.0, feedback._cancel)
    fallback.start()
    try:
        with pytest.raises(QgsProcessingException, match="Cancelled"):
            run(
                "trainmodel",
                {
                    "BEFORE": taizhou["before"],
                    "AFTER": taizhou["after"],
                    "LABELS": weak_labels["file"],
                    "LABEL_FIELD": "change",
                    "BACKBONE": 1,
                    "WEIGHTS": 1,
                    "EPOCHS": 500,
                    "BATCH_SIZE": 4,
                    "TILE_SIZE": 64,
                    "DEVICE": "cpu",
                    "OUTPUT": str(output),
                },
                feedback=feedback,
            )
    finally:
        fallback.cancel()
    assert feedback.cancelled_at is not None
    assert time.monotonic() - feedback.cancelled_at < 10.0
    assert worker_processes(str(output)) == []
    assert not output.exists()
    # not even a partial file; only a training checkpoint (for resuming) may stay
    left = [p.name for p in folder.iterdir() if "ckpt" not in p.name and "checkpoint" not in p.name]
    assert left == []
