"""The whole chain's parameters: one typed config for ``run`` and ``batch``."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kdmsi_engine import defaults
from kdmsi_engine.errors import InputError


@dataclass
class RunConfig:
    """Parameters of the whole chain; every default comes from :mod:`kdmsi_engine.defaults`."""

    # stage 1: KD-MSI
    kd_backbone: str = defaults.BACKBONE
    kd_weights: str = defaults.WEIGHTS_DEFAULT
    kd_epochs: int = defaults.KD_EPOCHS
    kd_batch_size: int = defaults.KD_BATCH_SIZE
    kd_lr: float = defaults.KD_LR
    kd_weight: float = defaults.KD_WEIGHT
    tile_size: int = defaults.TILE_SIZE
    label_field: str = defaults.LABEL_FIELD
    unmarked_unchanged: bool = False
    # MSI and pseudo labels
    msi_scales: tuple[float, ...] = defaults.MSI_SCALES
    pseudo_source: str = defaults.PSEUDO_SOURCE
    pseudo_threshold: float | str = defaults.PSEUDO_THRESHOLD
    unchanged_quantile: float = defaults.UNCHANGED_QUANTILE
    calibration_fraction: float = defaults.CALIBRATION_FRACTION
    # stage 2: detector
    detector_backbone: str = defaults.BACKBONE
    detector_weights: str = defaults.WEIGHTS_DEFAULT
    detector_epochs: int = defaults.DETECTOR_EPOCHS
    detector_batch_size: int = defaults.DETECTOR_BATCH_SIZE
    detector_lr: float = defaults.DETECTOR_LR
    detector_tile_size: int | None = defaults.DETECTOR_TILE_SIZE
    min_labelled: float = defaults.MIN_LABELLED
    detector_class_weights: str = defaults.DETECTOR_CLASS_WEIGHTS
    detector_from_student: bool = defaults.DETECTOR_FROM_STUDENT
    # detection and polygons
    threshold: float | str = defaults.RUN_THRESHOLD
    detect_quantile: float = defaults.DETECT_QUANTILE
    fuse_evidence: bool = defaults.FUSE_EVIDENCE
    evidence_gate: float = defaults.EVIDENCE_GATE
    fusion_detector_weight: float = defaults.FUSION_DETECTOR_WEIGHT
    keep_unchanged_out: bool = defaults.KEEP_UNCHANGED_OUT
    detect_tile_size: int | None = None
    detect_scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    min_area: float = defaults.MIN_AREA
    simplify: float = defaults.SIMPLIFY
    fill_holes: float = defaults.FILL_HOLES
    # common
    bands: str | None = defaults.BANDS
    batch_size: int = defaults.INFER_BATCH_SIZE
    seed: int = defaults.SEED

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["msi_scales"] = list(self.msi_scales)
        data["detect_scales"] = list(self.detect_scales)
        return data

    def check(self) -> None:
        from kdmsi_engine.pseudo import parse_threshold
        from kdmsi_engine.thresholds import parse_threshold_spec

        self.threshold = parse_threshold_spec(self.threshold)
        self.pseudo_threshold = parse_threshold(self.pseudo_threshold)
        if self.pseudo_source not in defaults.PSEUDO_SOURCES:
            raise InputError(
                f"pseudo-label source {self.pseudo_source!r} unknown; choose one of "
                f"{', '.join(defaults.PSEUDO_SOURCES)}"
            )
        if not 0.0 <= float(self.calibration_fraction) < 1.0:
            raise InputError(
                f"calibration fraction {self.calibration_fraction} must be in [0, 1), e.g. 0.2"
            )
        if not 0.0 <= float(self.fusion_detector_weight) <= 1.0:
            raise InputError(
                f"fusion weight {self.fusion_detector_weight} must be in [0, 1], e.g. 0.25"
            )
        if not 0.0 < float(self.evidence_gate) <= 1.0:
            raise InputError(f"evidence gate {self.evidence_gate} must be in (0, 1], e.g. 0.1")
        for name in ("unchanged_quantile", "detect_quantile"):
            if not 0.5 <= float(getattr(self, name)) < 1.0:
                raise InputError(
                    f"{name.replace('_', ' ')} {getattr(self, name)} must be in [0.5, 1), e.g. 0.99"
                )
        for name in ("kd_epochs", "detector_epochs", "kd_batch_size", "detector_batch_size"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name.replace('_', ' ')} must be at least 1")

    def resolve(self, device: Any) -> dict[str, str]:
        """Turn ``auto`` backbones into the one this machine can start from; say which."""
        from kdmsi_engine.models.backbones import resolve_backbone

        notes: dict[str, str] = {}
        for stage in ("kd", "detector"):
            name = getattr(self, f"{stage}_backbone")
            weights = str(getattr(self, f"{stage}_weights"))
            chosen, reason = resolve_backbone(name, weights, device)
            if chosen != name:
                setattr(self, f"{stage}_backbone", chosen)
                notes[stage] = reason
        return notes
