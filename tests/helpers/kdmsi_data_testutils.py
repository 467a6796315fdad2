"""Small synthetic rasters for the data-layer tests (what real data cannot show)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS

UTM33 = CRS.from_epsg(32633)


def write_raster(
    path: Path,
    data: np.ndarray,
    *,
    transform: Affine | None = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0),
    crs: CRS | None = UTM33,
    nodata: float | None = None,
    mask: np.ndarray | None = None,
    alpha: np.ndarray | None = None,
) -> Path:
    """Write a GeoTIFF from ``(C, H, W)`` data; optional nodata, internal mask or alpha band."""
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    count = data.shape[0] + (1 if alpha is not None else 0)
    profile = {
        "driver": "GTiff",
        "width": data.shape[2],
        "height": data.shape[1],
        "count": count,
        "dtype": data.dtype.name,
    }
    if crs is not None:
        profile["crs"] = crs
    if transform is not None:
        profile["transform"] = transform
    if nodata is not None:
        profile["nodata"] = nodata
    if alpha is not None:
        profile["photometric"] = "RGB" if data.shape[0] == 3 else "MINISBLACK"
        profile["alpha"] = "YES"
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data, list(range(1, data.shape[0] + 1)))
            if alpha is not None:
                dst.write(alpha.astype(data.dtype), count)
                interp = list(dst.colorinterp)
                interp[-1] = rasterio.enums.ColorInterp.alpha
                dst.colorinterp = interp
            if mask is not None:
                dst.write_mask(np.where(mask, 255, 0).astype(np.uint8))
    return path


def ramp(bands: int, height: int, width: int, dtype: str = "uint16", seed: int = 0) -> np.ndarray:
    """A deterministic textured image: ramps plus noise, values well inside the type."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width]
    out = np.empty((bands, height, width), dtype=np.float64)
    for b in range(bands):
        out[b] = 100 + rows * (b + 1) + cols * 2 + rng.integers(0, 50, (height, width))
    if dtype == "uint8":
        out = out % 200 + 20
    return out.astype(dtype)
