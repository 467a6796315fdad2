"""A PNG quicklook of a detection: before | after | change overlay.

Rasters are read decimated (at most ``max_size`` pixels on the long side, GDAL overviews when
present), so a quicklook of a large scene needs little memory. Bands are stretched per band
between their 2nd and 98th percentiles. The overlay draws the change pixels (``change.tif``
value 1) in red over the after image; pixels of the optional ``truth`` raster are outlined
(changed samples yellow, unchanged samples cyan), so a reader can compare both at a glance.

Usage::

    python -m scripts.quicklook BEFORE AFTER CHANGE.tif -o QUICKLOOK.png
        [--bands 3,2,1] [--truth TRUTH.tif] [--title TEXT]
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import Resampling

from kdmsi_engine.atomic import atomic_output
from kdmsi_engine.errors import InputError, RasterError

logger = logging.getLogger(__name__)

CHANGE_RGBA = (230, 25, 25, 200)


def _out_shape(width: int, height: int, max_size: int) -> tuple[int, int]:
    scale = min(1.0, max_size / max(width, height))
    return max(1, round(height * scale)), max(1, round(width * scale))


def _read(
    path: str | os.PathLike[str],
    bands: Sequence[int],
    shape: tuple[int, int],
    resampling: Resampling,
) -> np.ndarray:
    try:
        with rasterio.open(path) as ds:
            use = [b for b in bands if b <= ds.count] or [1]
            return ds.read(use, out_shape=(len(use), *shape), resampling=resampling)
    except rasterio.errors.RasterioIOError as exc:
        raise RasterError(f"cannot read {path}: {exc}") from exc


def stretch(data: np.ndarray) -> np.ndarray:
    """(C,H,W) -> (H,W,3) float in [0,1], 2-98 % stretch per band (grey for one band)."""
    out = np.zeros(data.shape, dtype=np.float32)
    for i, band in enumerate(data.astype(np.float32)):
        finite = band[np.isfinite(band)]
        if finite.size == 0:
            continue
        low, high = np.percentile(finite, (2, 98))
        out[i] = np.clip((band - low) / max(high - low, 1e-6), 0, 1)
    if out.shape[0] == 1:
        out = np.repeat(out, 3, axis=0)
    return out[:3].transpose(1, 2, 0)


def _edges(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the outline)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    return mask & ~inner


def make_quicklook(
    before: str | os.PathLike[str],
    after: str | os.PathLike[str],
    change: str | os.PathLike[str],
    out_png: str | os.PathLike[str],
    *,
    bands: Sequence[int] = (3, 2, 1),
    truth: str | os.PathLike[str] | None = None,
    title: str | None = None,
    max_size: int = 800,
    overwrite: bool = False,
) -> Path:
    """Write ``out_png``: before | after | change (red) over after; return its path."""
    if Path(out_png).suffix.lower() != ".png":
        raise InputError(f"quicklook {out_png} must be a .png file")
    with rasterio.open(change) as ds:
        shape = _out_shape(ds.width, ds.height, max_size)
    img_before = stretch(_read(before, bands, shape, Resampling.average))
    img_after = stretch(_read(after, bands, shape, Resampling.average))
    classes = _read(change, (1,), shape, Resampling.nearest)[0]
    overlay = img_after.copy()
    alpha = CHANGE_RGBA[3] / 255.0
    is_change = classes == 1
    overlay[is_change] = (1 - alpha) * overlay[is_change] + alpha * np.array(CHANGE_RGBA[:3]) / 255
    overlay[classes == 255] *= 0.4
    if truth is not None:
        ref = _read(truth, (1,), shape, Resampling.nearest)[0]
        overlay[_edges(ref == 1)] = (1.0, 0.9, 0.0)
        overlay[_edges(ref == 0)] = (0.0, 0.9, 0.9)
    panels = [("before", img_before), ("after", img_after), ("change (red)", overlay)]
    with atomic_output(out_png, overwrite=overwrite) as tmp:
        _save(panels, tmp, title, truth is not None)
    return Path(out_png)


def _save(panels: list[tuple[str, np.ndarray]], path: Path, title: str | None, truth: bool) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # PIL fallback: panels side by side, no captions
        from PIL import Image

        row = np.concatenate([p for _, p in panels], axis=1)
        Image.fromarray((row * 255).astype(np.uint8)).save(path, format="PNG")
        return
    height, width = panels[0][1].shape[:2]
    fig_w = 3 * 4.2
    fig_h = 4.2 * height / width + (0.9 if title else 0.5)
    fig, axes = plt.subplots(1, 3, figsize=(fig_w, fig_h))
    for ax, (name, image) in zip(axes, panels):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()
    if truth:
        axes[2].set_title("change (red); samples: changed yellow, unchanged cyan", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="before | after | change overlay PNG")
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("change", help="change.tif (1 change, 0 none, 255 nodata)")
    parser.add_argument("-o", "--output", required=True, help="PNG to write")
    parser.add_argument("--bands", default="3,2,1", help="display bands (default 3,2,1)")
    parser.add_argument("--truth", help="reference raster (1 changed, 0 unchanged samples)")
    parser.add_argument("--title")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    bands = tuple(int(b) for b in args.bands.split(","))
    path = make_quicklook(
        args.before,
        args.after,
        args.change,
        args.output,
        bands=bands,
        truth=args.truth,
        title=args.title,
        overwrite=args.overwrite,
    )
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
