"""One source for defaults: the command line, the chain's configuration and the training
jobs all take theirs from :mod:`kdmsi_engine.defaults` (the plugin's side is checked in
``tests/plugin/test_defaults_plugin.py``)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from kdmsi_engine import defaults
from kdmsi_engine.cli import build_parser
from kdmsi_engine.cli.run import config_from_args
from kdmsi_engine.jobs.config import RunConfig
from kdmsi_engine.training.detector import DetectorConfig, train_detector
from kdmsi_engine.training.kd import train_kdmsi


def _parse(*argv: str):
    return build_parser().parse_args(list(argv))


def test_kdmsi_run_with_no_options_is_the_chain_config():
    args = _parse("run", "b.tif", "a.tif", "--labels", "l.gpkg", "-o", "out")
    assert config_from_args(args) == RunConfig()
    config = RunConfig()
    assert config.kd_backbone == config.detector_backbone == defaults.BACKBONE == "auto"
    assert config.kd_epochs == defaults.KD_EPOCHS
    assert config.pseudo_source == defaults.PSEUDO_SOURCE == "evidence"
    assert config.pseudo_threshold == defaults.PSEUDO_THRESHOLD
    assert config.threshold == defaults.RUN_THRESHOLD
    assert config.detector_class_weights == defaults.DETECTOR_CLASS_WEIGHTS
    assert config.fuse_evidence is defaults.FUSE_EVIDENCE
    assert config.bands is None  # every band


def test_every_job_reads_the_same_defaults():
    train = _parse("train", "b.tif", "a.tif", "--labels", "l.gpkg", "-o", "m.kdmsi")
    assert (train.backbone, train.epochs, train.batch_size, train.lr, train.tile_size) == (
        defaults.BACKBONE,
        defaults.KD_EPOCHS,
        defaults.KD_BATCH_SIZE,
        defaults.KD_LR,
        defaults.TILE_SIZE,
    )
    detector = _parse("train-detector", "b.tif", "a.tif", "--pseudo", "p.tif", "-o", "d.kdmsi")
    assert (detector.backbone, detector.epochs, detector.lr, detector.class_weights) == (
        defaults.BACKBONE,
        defaults.DETECTOR_EPOCHS,
        defaults.DETECTOR_LR,
        defaults.DETECTOR_CLASS_WEIGHTS,
    )
    pseudo = _parse("pseudo", "p.tif", "-o", "q.tif", "--labels", "l.gpkg")
    assert pseudo.threshold == defaults.PSEUDO_THRESHOLD
    infer = _parse("infer", "b.tif", "a.tif", "--model", "m.kdmsi", "-o", "p.tif")
    assert (infer.method, infer.scales) == (defaults.MAP_METHOD, defaults.MSI_SCALES_TEXT)
    assert _parse("grid", "b.tif", "a.tif", "-o", "g.gpkg").tile_size == defaults.TILE_SIZE
    cva = _parse("cva", "b.tif", "a.tif", "-o", "c.tif")
    assert cva.threshold == defaults.CVA_THRESHOLD
    detect = _parse("detect", "b.tif", "a.tif", "--model", "d.kdmsi", "-o", "out")
    assert float(detect.threshold) == defaults.DETECT_THRESHOLD
    assert defaults.parse_scales(defaults.MSI_SCALES_TEXT) == defaults.MSI_SCALES
    assert defaults.parse_scales(None, (1.0,)) == (1.0,)
    assert defaults.parse_scales([0.5, "2"]) == (0.5, 2.0)
    for bad in ("0", "1,x", "9", ","):
        with pytest.raises(ValueError, match="scales"):
            defaults.parse_scales(bad)


def test_functions_default_to_the_module():
    kd = inspect.signature(train_kdmsi).parameters
    assert (kd["backbone"].default, kd["epochs"].default, kd["tile_size"].default) == (
        defaults.BACKBONE,
        defaults.KD_EPOCHS,
        defaults.TILE_SIZE,
    )
    det = inspect.signature(train_detector).parameters
    assert (det["epochs"].default, det["lr"].default) == (
        defaults.DETECTOR_EPOCHS,
        defaults.DETECTOR_LR,
    )
    assert DetectorConfig().class_weights == defaults.DETECTOR_CLASS_WEIGHTS


def test_defaults_module_needs_only_the_standard_library():
    """The QGIS plugin loads it without torch or GDAL."""
    source = Path(defaults.__file__).read_text(encoding="utf-8")
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "collections"}, imported
