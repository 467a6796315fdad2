"""A trust report for a change map, from the analyst's weak labels alone (no pixel truth).

The tile labels say where change is (tiles labelled changed) and where it is not (tiles
labelled unchanged). A map that deserves trust agrees with them: it marks change in most tiles
labelled changed, in few tiles labelled unchanged, and its change pixels are much more frequent
in the former. The report gives those numbers for the detector's map *before* the labelled
unchanged tiles are kept out of the final raster (so the model's own disagreement shows), the
teacher's separation of the labelled tiles (ROC AUC of its tile logits, on its training tiles),
and warnings in plain words when a number says the map should not be trusted.

A tile labelled changed is *found* when at least :data:`FOUND_SHARE` of its valid pixels are
change (a change region of about 20 pixels in a 64 px tile). A tile labelled unchanged is
*flagged* when more of its pixels are change than :data:`FLAG_FACTOR` times the false-positive
rate the threshold allows on unchanged land (``1 - quantile``): a few false alarms are expected
by construction, a tile well beyond them is not.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
from rasterio.windows import Window

from kdmsi_engine import defaults
from kdmsi_engine.rasterio_out import bounded_gdal_cache, open_raster, valid_values

logger = logging.getLogger(__name__)

#: Share of a changed tile's valid pixels that must be change for the tile to be found.
FOUND_SHARE = 0.005
#: An unchanged tile is flagged above this many times the allowed false-positive rate.
FLAG_FACTOR = 4.0


def tile_change_shares(prob_path: str | os.PathLike[str], threshold: float, tiles: Any) -> Any:
    """Per tile: the share of its valid pixels above ``threshold`` (NaN without valid pixels)."""
    shares = np.full(tiles.label.size, np.nan)
    with bounded_gdal_cache(), open_raster(prob_path, "probability raster") as src:
        nodata = src.nodata
        for i in np.flatnonzero(tiles.label >= 0):
            window = Window(
                int(tiles.col_off[i]), int(tiles.row_off[i]), int(tiles.width[i]),
                int(tiles.height[i]),
            )  # fmt: skip
            prob = src.read(1, window=window)
            valid = valid_values(prob, nodata)
            if valid.any():
                shares[i] = float(np.count_nonzero(prob[valid] > threshold)) / valid.sum()
    return shares


def _share(values: np.ndarray) -> float | None:
    return round(float(np.mean(values)), 4) if values.size else None


def trust_report(
    prob_path: str | os.PathLike[str],
    threshold: float,
    tiles: Any,
    *,
    quantile: float = defaults.DETECT_QUANTILE,
    teacher: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Agreement of a change map with the weak tile labels, and warnings.

    Args:
        prob_path: the detector's change probability raster.
        threshold: the threshold of the final map.
        tiles: :class:`~kdmsi_engine.pseudo.TileLabels` on the raster's grid.
        quantile: the quantile of unchanged land the threshold was set at (its false-positive
            rate is ``1 - quantile``).
        teacher: the KD stage's ``teacher_separation`` record, if any.

    Returns:
        ``changed_tiles_found``, ``unchanged_tiles_flagged``,
        ``tile_agreement`` (mean of the share of changed tiles showing change and of unchanged
        tiles not showing it), ``change_share_in_changed_tiles``,
        ``change_share_in_unchanged_tiles``, ``teacher_auc``, ``warnings`` (plain sentences)
        and ``trusted`` (no warning).
    """
    shares = tile_change_shares(prob_path, float(threshold), tiles)
    known = np.isfinite(shares)
    changed = shares[known & (tiles.label == 1)]
    unchanged = shares[known & (tiles.label == 0)]
    flag_share = FLAG_FACTOR * (1.0 - float(quantile))
    found = _share(changed >= FOUND_SHARE)
    flagged = _share(unchanged > flag_share)
    report: dict[str, Any] = {
        "tiles": {"changed": int(changed.size), "unchanged": int(unchanged.size)},
        "found_share": FOUND_SHARE,
        "flag_share": round(flag_share, 6),
        "changed_tiles_found": found,
        "unchanged_tiles_flagged": flagged,
        "tile_agreement": (
            round((found + (1.0 - flagged)) / 2.0, 4)
            if found is not None and flagged is not None
            else None
        ),
        "change_share_in_changed_tiles": _share(changed),
        "change_share_in_unchanged_tiles": _share(unchanged),
        "teacher_auc": (teacher or {}).get("auc"),
        "note": (
            "the detector's map at the final threshold, before the tiles labelled unchanged "
            "are kept out; the teacher's AUC is measured on its own training tiles"
        ),
    }
    report["warnings"] = trust_warnings(report)
    report["trusted"] = not report["warnings"]
    return report


def trust_warnings(report: dict[str, Any]) -> list[str]:
    """Plain-language warnings for the numbers of a trust report."""
    warnings: list[str] = []
    auc = report.get("teacher_auc")
    if auc is not None and auc < defaults.TRUST_MIN_TEACHER_AUC:
        warnings.append(
            f"the teacher tells changed from unchanged tiles poorly (AUC {auc:.2f}, 0.5 is "
            "chance): the labels may contradict each other, or mark changes the images do not "
            "show; check a few tiles of each kind"
        )
    flagged = report.get("unchanged_tiles_flagged")
    if flagged is not None and flagged > defaults.TRUST_MAX_UNCHANGED_FLAGGED:
        warnings.append(
            f"the map marks much change on {flagged:.0%} of the tiles you labelled unchanged: it "
            "does not follow your labels there; look at those tiles (a missed change, or "
            "differences such as season or haze that the map takes for change)"
        )
    found = report.get("changed_tiles_found")
    if found is not None and found < defaults.TRUST_MIN_CHANGED_FOUND:
        warnings.append(
            f"the map finds change on only {found:.0%} of the tiles you labelled changed: it "
            "misses much of what you marked; label more changed tiles or lower the threshold"
        )
    inside = report.get("change_share_in_changed_tiles")
    outside = report.get("change_share_in_unchanged_tiles")
    if inside is not None and outside is not None and inside < 2.0 * outside:
        warnings.append(
            "change is hardly more frequent in the tiles you labelled changed than in those you "
            f"labelled unchanged ({inside:.1%} against {outside:.1%} of their pixels): the map "
            "does not separate what you marked"
        )
    if report["tiles"]["unchanged"] == 0:
        warnings.append(
            "no tile is labelled unchanged: the threshold could not be calibrated on known "
            "unchanged land; label some unchanged areas"
        )
    return warnings
