"""The set-up: the venv sees the system's GDAL/PROJ stack and PROJ finds its data."""

from __future__ import annotations

import os
import subprocess
import sys

SNIPPET = """
import kdmsi_engine, pyproj, rasterio
from rasterio.warp import transform
xs, ys = transform("EPSG:4326", "EPSG:32651", [120.0], [32.5])
print(round(xs[0]), round(ys[0]), pyproj.datadir.get_data_dir())
"""


def test_proj_data_found_without_environment() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PROJ_DATA", "PROJ_LIB")}
    run = subprocess.run(
        [sys.executable, "-W", "always", "-c", SNIPPET],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "PROJ" not in run.stderr, run.stderr
    x, y, datadir = run.stdout.split()
    # 120E is 3 degrees west of zone 51's central meridian (123E): about
    # 3 * 111.32 km * cos(32.5) * 0.9996 = 281.5 km west of the 500 km false easting, and
    # 32.5 degrees of latitude are about 3600 km north: a plain spherical check of the result.
    assert abs(int(x) - 218_500) < 2_000 and abs(int(y) - 3_600_000) < 5_000
    assert os.path.isfile(os.path.join(datadir, "proj.db"))


def test_gis_stack_is_the_systems() -> None:
    """QGIS and the engine must share one GDAL: rasterio must be Debian's, not a pip wheel."""
    import rasterio

    assert rasterio.__file__.startswith("/usr/lib/python3/dist-packages"), rasterio.__file__
