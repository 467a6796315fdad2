"""Per-band value scaling to [0, 1], computed once per scene and stored with the model.

Two methods: ``percentile-2-98`` (the 2nd and 98th percentile of each band over both dates,
from a deterministic sample of windows, valid pixels only) and ``uint8`` (divide by 255).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdmsi_engine.errors import InputError

logger = logging.getLogger(__name__)

PERCENTILE_METHOD = "percentile-2-98"
UINT8_METHOD = "uint8"
METHODS = (PERCENTILE_METHOD, UINT8_METHOD)
#: Percentiles of the robust method.
LOW_PERCENTILE = 2.0
HIGH_PERCENTILE = 98.0


@dataclass
class BandScaling:
    """Per-band linear scaling: ``(value - low) / (high - low)`` clipped to [0, 1].

    Attributes:
        low: value mapped to 0, one per band.
        high: value mapped to 1, one per band.
        method: ``percentile-2-98`` or ``uint8``.
    """

    low: list[float]
    high: list[float]
    method: str = PERCENTILE_METHOD
    _low_arr: np.ndarray = field(init=False, repr=False, compare=False)
    _scale_arr: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.low = [float(v) for v in self.low]
        self.high = [float(v) for v in self.high]
        if len(self.low) != len(self.high) or not self.low:
            raise InputError("band scaling needs one low and one high value per band")
        if not all(math.isfinite(v) for v in self.low + self.high):
            raise InputError("band scaling values must be finite numbers")
        low = np.asarray(self.low, dtype=np.float64)
        span = np.asarray(self.high, dtype=np.float64) - low
        # A constant band maps to 0 instead of dividing by zero.
        span = np.where(span > 0, span, 1.0)
        self._low_arr = low.astype(np.float32)[:, None, None]
        self._scale_arr = (1.0 / span).astype(np.float32)[:, None, None]

    @property
    def num_bands(self) -> int:
        return len(self.low)

    def apply(self, data: np.ndarray) -> np.ndarray:
        """Scale ``(C, H, W)`` (or ``(B, C, H, W)``) values to float32 in [0, 1]."""
        arr = np.asarray(data, dtype=np.float32)
        if arr.ndim < 3 or arr.shape[-3] != self.num_bands:
            raise InputError(
                f"data has {arr.shape[-3] if arr.ndim >= 3 else 0} bands but the scaling has "
                f"{self.num_bands}; use the same bands as the model"
            )
        out = (arr - self._low_arr) * self._scale_arr
        np.clip(out, 0.0, 1.0, out=out)
        # NaN (invalid float pixels) become 0.
        np.nan_to_num(out, copy=False, nan=0.0)
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, stored in model files."""
        return {"method": self.method, "low": list(self.low), "high": list(self.high)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BandScaling:
        """Inverse of :meth:`to_dict`."""
        try:
            method = str(data.get("method", PERCENTILE_METHOD))
            return cls(low=list(data["low"]), high=list(data["high"]), method=method)
        except (KeyError, TypeError, AttributeError) as exc:
            raise InputError(
                "band scaling record is incomplete (needs low, high, method); "
                "the model file may be damaged"
            ) from exc

    @classmethod
    def uint8(cls, num_bands: int) -> BandScaling:
        """Divide by 255."""
        return cls([0.0] * num_bands, [255.0] * num_bands, UINT8_METHOD)

    @classmethod
    def from_samples(cls, samples: list[np.ndarray]) -> BandScaling:
        """2nd/98th percentiles from per-band 1-D arrays of valid values."""
        low, high = [], []
        for values in samples:
            if values.size == 0:
                low.append(0.0)
                high.append(1.0)
                continue
            lo, hi = np.percentile(values, [LOW_PERCENTILE, HIGH_PERCENTILE])
            if hi <= lo:
                hi = lo + 1.0
            low.append(float(lo))
            high.append(float(hi))
        return cls(low, high, PERCENTILE_METHOD)
