"""The ablation tool's scoring: confusion over thresholds, balanced subsets, the table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks.ablation import Confusion, balanced_subset, format_table
from kdmsi_engine.training.samples import SceneSource, TileRef, TrainingSet


def test_confusion_matches_hand_counts() -> None:
    prob = torch.tensor([[[0.9, 0.6], [0.2, 0.7]], [[0.0, 0.4], [0.55, 0.1]]])
    truth = torch.tensor([[[1, 0], [1, 1]], [[0, 1], [0, 0]]], dtype=torch.bool)
    valid = torch.ones_like(truth)
    valid[1, 1, 1] = False  # not counted
    conf = Confusion(np.array([0.5, 0.65]))
    conf.add(prob, truth, valid)
    # t=0.5: predicted 0.9, 0.6, 0.7, 0.55 -> TP 2 (0.9, 0.7), FP 2 (0.6, 0.55), FN 2 (0.2, 0.4)
    # t=0.65: predicted 0.9, 0.7 -> TP 2, FP 0, FN 2
    assert conf.tp.tolist() == [2, 2]
    assert conf.fp.tolist() == [2, 0]
    assert conf.fn.tolist() == [2, 2]
    assert conf.iou().tolist() == pytest.approx([2 / 6, 2 / 4])
    summary = conf.summary()
    assert summary["iou_best"] == pytest.approx(0.5)
    assert summary["threshold_best"] == pytest.approx(0.65)
    assert summary["iou_at_0.5"] == pytest.approx(0.3333, abs=1e-4)


def _tset(labels: list[int]) -> TrainingSet:
    scene = SceneSource("s", lambda: None)
    tiles = [TileRef(0, i * 64, 0, lab) for i, lab in enumerate(labels)]
    return TrainingSet([scene], tiles, 64, (1, 2, 3), 3, {}, {"source": "test"})


def test_balanced_subset() -> None:
    tset = _tset([1] * 30 + [0] * 6)
    keep = balanced_subset(tset, 20, seed=0)
    labels = [tset.tiles[i].label for i in keep]
    assert len(keep) == 20 and len(set(keep)) == 20
    assert labels.count(0) == 6 and labels.count(1) == 14  # all unchanged, rest changed
    assert balanced_subset(tset, 20, seed=0) == keep


def test_format_table_lists_every_column() -> None:
    tset = _tset([1, 0])
    score = {"iou_best": 0.25, "threshold_best": 0.3, "iou_at_0.5": 0.2}
    result = {
        "backbone": "resnet18",
        "weights": "none",
        "epochs_run": 2,
        "train_seconds": 60.0,
        "scores": {m: score for m in ("cam", "student", "mi", "msi", "trivial")},
    }
    table = format_table([result], tset)
    assert "| resnet18 none, 2 ep, 1.0 min | 0.250 (0.30) / 0.200 |" in table
    assert "1 changed, 1 unchanged" in table
    assert "student+MSI" in table and "0.527" in table
