"""Export a trained change detector as one ONNX segmentation model (Deepness, onnxruntime).

The ONNX model has **one input**, ``input``: float32 ``(N, 2*B, T, T)``, the detector's B bands
of the before date followed by the same B bands of the after date, as **raw values** (the
numbers in the rasters, any data type). The band scaling the detector was trained with is folded
into the graph, exactly as detection applies it (:class:`~kdmsi_engine.data.scaling.BandScaling`:
``(value - low) / (high - low)`` clipped to [0, 1], NaN -> 0), then the backbone's ImageNet
normalisation, the Siamese network, and a softmax. The **output**, ``probabilities``, is float32
``(N, 2, T, T)``: per pixel, the probability of class 0 (``unchanged``) and class 1
(``changed``), which sum to 1. N is free; T (the tile size) is fixed, as Deepness wants square
tiles of a known size.

Why raw values: Deepness divides every value by 255 and then standardises with the
``standardization_mean`` / ``standardization_std`` of the model's metadata, ``(v / 255 - mean) /
std``. That is one linear map per channel; it could express the scaling, but not its clip to
[0, 1] (percentile scaling clips about 4 % of the pixels of every band). So the graph takes raw
values and the metadata asks Deepness to undo its division (mean 0, std 1/255): Deepness then
feeds the raw values, whatever the rasters' data type (uint16 Sentinel-2 as well as 8-bit), and
onnxruntime users feed the raster values as they are.

The metadata Deepness reads (``metadata_props``, JSON values): ``model_type`` ``"Segmentor"``,
``class_names``, ``resolution`` (cm per pixel, from the grid of the scene the detector was
trained on), ``tile_size`` (and ``tiles_size``, the spelling of Deepness's documentation),
``tiles_overlap`` (per cent), ``seg_thresh``, ``standardization_mean`` and
``standardization_std``; beside them ``kdmsi_*`` keys describe the input bands, the scaling and
the source model file.

:func:`write_stack_vrt` writes the one raster Deepness needs: a VRT that stacks the detector's
bands of both dates on the scene grid (before first), without copying pixels.

The exporter is torch's ``torch.export``-based one (``dynamo=True``, the only one that stays in
torch; the TorchScript exporter is deprecated and writes output shapes Deepness refuses). It
needs the ``onnx`` and ``onnxscript`` packages; the export is then checked with ``onnxruntime``
against torch on a probe tile before the file gets its name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np
import torch
from torch import Tensor, nn

from kdmsi_engine import __version__, defaults
from kdmsi_engine.atomic import atomic_output, check_output
from kdmsi_engine.data.scaling import BandScaling
from kdmsi_engine.errors import InputError, KdmsiError, ModelFileError, RasterError
from kdmsi_engine.progress import Progress
from kdmsi_engine.results import ExportResult

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
#: Deepness's name of a per-pixel classifier.
MODEL_TYPE = "Segmentor"
CLASS_NAMES = {0: "unchanged", 1: "changed"}
#: Packages the export needs (the ``export`` extra of the engine).
EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
#: Largest probability difference between onnxruntime and torch (float32) the export accepts on
#: its probe tile; measured differences are about 1e-6 (README).
VERIFY_TOLERANCE = 1e-4
#: The exporter writes opset 18 or later (torch's ONNX functions start there).
MIN_OPSET = 18
#: GDAL's names of the raster data types a VRT band can have.
_GDAL_TYPES = {
    "uint8": "Byte",
    "int8": "Int8",
    "uint16": "UInt16",
    "int16": "Int16",
    "uint32": "UInt32",
    "int32": "Int32",
    "float32": "Float32",
    "float64": "Float64",
}


class StackedDetector(nn.Module):
    """A detector that takes both dates as one raw raster and returns class probabilities.

    Args:
        detector: the Siamese detector (``forward(before, after)`` -> 2-class logits).
        scaling: the band scaling of the B bands of one date (applied to both dates).
    """

    def __init__(self, detector: nn.Module, scaling: BandScaling) -> None:
        super().__init__()
        self.detector = detector
        self.num_bands = scaling.num_bands
        low = torch.from_numpy(scaling._low_arr.reshape(-1))
        factor = torch.from_numpy(scaling._scale_arr.reshape(-1))
        # The same per-band float32 numbers BandScaling.apply uses, once per date.
        self.register_buffer("low", torch.cat([low, low]).view(1, -1, 1, 1))
        self.register_buffer("factor", torch.cat([factor, factor]).view(1, -1, 1, 1))

    low: Tensor
    factor: Tensor

    def forward(self, stacked: Tensor) -> Tensor:
        scaled = ((stacked - self.low) * self.factor).clamp(0.0, 1.0)
        scaled = torch.where(torch.isnan(scaled), torch.zeros_like(scaled), scaled)
        before = scaled[:, : self.num_bands]
        after = scaled[:, self.num_bands :]
        return torch.softmax(self.detector(before, after).float(), dim=1)


# ----------------------------------------------------------------------------- checks


def export_packages_missing() -> list[str]:
    """The packages of :data:`EXPORT_PACKAGES` this Python cannot import."""
    import importlib

    missing = []
    for name in EXPORT_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def require_export_packages() -> None:
    """Raise a clear error naming the install command when an export package is missing."""
    missing = export_packages_missing()
    if missing:
        names = " ".join(missing)
        raise KdmsiError(
            f"exporting to ONNX needs the Python package(s) {', '.join(missing)}, which this "
            f'Python lacks; install them: "{sys.executable}" -m pip install {names}'
        )


def check_opset(opset: int) -> int:
    """``opset`` if the exporter can write it, else an :class:`InputError`."""
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise InputError(
            f"ONNX opset {opset!r} is too old for torch's exporter; give {MIN_OPSET} or later "
            f"(default {defaults.EXPORT_OPSET})"
        )
    return opset


def export_tile_size(metadata: dict[str, Any], tile_size: int | None) -> int:
    """The fixed tile size of the export: the given one, or the window ``kdmsi detect`` uses
    (the training tile size, at least 128 pixels)."""
    tile = int(tile_size) if tile_size else max(128, int(metadata.get("tile_size") or 256))
    if tile < 32 or tile % 16 or tile > 4096:
        raise InputError(
            f"tile size {tile} must be a multiple of 16 (the detector's stride) from 32 to 4096"
        )
    return tile


def detector_scaling(metadata: dict[str, Any], model: Path) -> BandScaling | None:
    """The band scaling stored with a one-scene detector (``None`` for a multi-scene one)."""
    record = metadata.get("scaling")
    if not record:
        return None
    try:
        return BandScaling.from_dict(record)
    except InputError as exc:
        raise ModelFileError(
            f"{model.name} has an unreadable band scaling ({exc}); retrain the detector"
        ) from exc


def training_resolution_cm(metadata: dict[str, Any]) -> float | None:
    """Pixel size (cm) of the grid of the first scene the detector was trained on.

    ``None`` when the training grid has no CRS (plain images) or no linear unit.
    """
    scenes = (metadata.get("training") or {}).get("scenes") or []
    grid = scenes[0].get("grid") if scenes and isinstance(scenes[0], dict) else None
    if not isinstance(grid, dict) or not grid.get("crs") or not grid.get("transform"):
        return None
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    try:
        crs = CRS.from_user_input(grid["crs"])
        a, b, _c, d, e, _f = (float(v) for v in grid["transform"][:6])
    except (CRSError, TypeError, ValueError):
        return None
    if crs.is_geographic or b or d:
        return None
    try:
        _unit, metres = crs.linear_units_factor
    except CRSError:  # a CRS without a linear unit
        return None
    size = (abs(a) + abs(e)) / 2.0 * float(metres)
    return round(size * 100.0, 6) if math.isfinite(size) and size > 0 else None


# ----------------------------------------------------------------------------- the stacked VRT


def _stack_grid(before: Path, after: Path, bands: list[int]) -> tuple[Any, list[tuple]]:
    """The scene grid of a pair and, per date, ``(dataset facts, (row, col) offset)``.

    Raises:
        RasterError / GridError: unreadable rasters, missing bands, or a date that is not on
            the before raster's pixel grid (the VRT does not resample).
    """
    from kdmsi_engine.data.grid import choose_grid, offset_in
    from kdmsi_engine.data.raster import open_raster

    with open_raster(before, what="before raster") as ds_b:
        with open_raster(after, what="after raster") as ds_a:
            if ds_b.crs is None or ds_a.crs is None:
                raise RasterError(
                    "a stacked VRT for Deepness needs georeferenced rasters; give GeoTIFFs "
                    "with a CRS"
                )
            grid = choose_grid(ds_b, ds_a)
            parts = []
            for ds, what in ((ds_b, "before"), (ds_a, "after")):
                missing = [b for b in bands if not 1 <= b <= ds.count]
                if missing:
                    raise RasterError(
                        f"{what} raster {Path(ds.name).name} has {ds.count} band(s), the "
                        f"detector needs band(s) {bands}; use the rasters it was trained on"
                    )
                offset = offset_in(ds.transform, grid) if ds.crs == grid.crs else None
                if offset is None:
                    res = grid.res
                    left, bottom, right, top = grid.bounds
                    raise RasterError(
                        f"the {what} raster {Path(ds.name).name} is not on the pixel grid "
                        f"{grid.crs} at {res[0]:g} x {res[1]:g} (a VRT stacks without "
                        f"resampling); warp it first, e.g. gdalwarp -r bilinear -t_srs "
                        f"{grid.crs} -tr {res[0]:g} {res[1]:g} -te {left:.6f} {bottom:.6f} "
                        f"{right:.6f} {top:.6f} IN.tif OUT.tif"
                    )
                dtypes = [ds.dtypes[b - 1] for b in bands]
                unknown = sorted({t for t in dtypes if t not in _GDAL_TYPES})
                if unknown:
                    raise RasterError(
                        f"{what} raster {Path(ds.name).name} has bands of type "
                        f"{', '.join(unknown)}, which the export cannot stack; convert to "
                        "integers or float32"
                    )
                parts.append((Path(ds.name), dtypes, ds.nodatavals, offset))
    return grid, parts


def _source_name(source: Path, vrt: Path) -> tuple[str, str]:
    """``(path text, relativeToVRT)``: relative to the VRT's folder when possible."""
    try:
        return os.path.relpath(source.absolute(), vrt.absolute().parent), "1"
    except ValueError:  # another drive (Windows)
        return str(source.absolute()), "0"


def stack_vrt_xml(
    before: str | os.PathLike[str],
    after: str | os.PathLike[str],
    target: str | os.PathLike[str],
    bands: list[int],
) -> tuple[str, Any]:
    """The XML of a VRT stacking ``bands`` of both dates on the scene grid, and that grid."""
    grid, parts = _stack_grid(Path(before), Path(after), bands)
    root = ElementTree.Element(
        "VRTDataset", rasterXSize=str(grid.width), rasterYSize=str(grid.height)
    )
    srs = ElementTree.SubElement(root, "SRS", dataAxisToSRSAxisMapping="1,2")
    srs.text = grid.crs.to_wkt()
    t = grid.transform
    ElementTree.SubElement(root, "GeoTransform").text = ", ".join(
        repr(float(v)) for v in (t.c, t.a, t.b, t.f, t.d, t.e)
    )
    number = 0
    for date, (path, dtypes, nodata, (row, col)) in zip(("before", "after"), parts):
        name, relative = _source_name(path, Path(target))
        for band, dtype in zip(bands, dtypes):
            number += 1
            element = ElementTree.SubElement(
                root, "VRTRasterBand", dataType=_GDAL_TYPES[dtype], band=str(number)
            )
            ElementTree.SubElement(element, "Description").text = f"{date} band {band}"
            if nodata[band - 1] is not None:
                ElementTree.SubElement(element, "NoDataValue").text = repr(float(nodata[band - 1]))
            source = ElementTree.SubElement(element, "SimpleSource")
            ElementTree.SubElement(source, "SourceFilename", relativeToVRT=relative).text = name
            ElementTree.SubElement(source, "SourceBand").text = str(band)
            size = {"xSize": str(grid.width), "ySize": str(grid.height)}
            src_rect = {"xOff": str(col), "yOff": str(row), **size}
            ElementTree.SubElement(source, "SrcRect", src_rect)
            ElementTree.SubElement(source, "DstRect", {"xOff": "0", "yOff": "0", **size})
    ElementTree.indent(root)
    return ElementTree.tostring(root, encoding="unicode") + "\n", grid


def write_stack_vrt(
    before: str | os.PathLike[str],
    after: str | os.PathLike[str],
    target: str | os.PathLike[str],
    *,
    bands: list[int],
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a VRT of ``bands`` of the before raster, then the same bands of the after raster,
    on the scene grid (the before raster's, cropped to the overlap); read back before it is
    named.

    Raises:
        RasterError: see :func:`stack_vrt_xml`.
        OutputError: ``target`` exists and ``overwrite`` is false, or cannot be written.
    """
    check_output(target, overwrite=overwrite)
    text, grid = stack_vrt_xml(before, after, target, bands)
    _write_checked_vrt(target, text, 2 * len(bands), overwrite=overwrite)
    return {
        "vrt": str(Path(target).absolute()),
        "bands": 2 * len(bands),
        "width": grid.width,
        "height": grid.height,
        "crs": grid.crs.to_string(),
        "resolution": list(grid.res),
    }


def _write_checked_vrt(target: str | os.PathLike[str], text: str, count: int, **kw: Any) -> None:
    with atomic_output(target, **kw) as tmp:
        _write_vrt_text(tmp, text, count)


def _write_vrt_text(path: Path, text: str, count: int) -> None:
    """Write a VRT and read a corner of every band back."""
    import rasterio
    from rasterio.windows import Window

    path.write_text(text, encoding="utf-8")
    with rasterio.open(path) as check:
        if check.count != count:  # pragma: no cover - our own XML
            raise RasterError(f"the VRT {path.name} reads back with {check.count} bands")
        check.read(window=Window(0, 0, min(8, check.width), min(8, check.height)))


# ----------------------------------------------------------------------------- metadata


def deepness_metadata(
    metadata: dict[str, Any],
    scaling: BandScaling,
    tile: int,
    source: Path,
    checksum: str,
    scaling_source: str,
) -> dict[str, str]:
    """The ``metadata_props`` of the export: Deepness's keys and ours, JSON values."""
    bands = [int(b) for b in metadata.get("bands") or range(1, scaling.num_bands + 1)]
    channels = 2 * scaling.num_bands
    props: dict[str, Any] = {
        "model_type": MODEL_TYPE,
        "class_names": CLASS_NAMES,
        "tile_size": tile,
        "tiles_size": tile,
        # detect's overlap: a quarter of the window
        "tiles_overlap": defaults.EXPORT_TILES_OVERLAP,
        "seg_thresh": defaults.DETECT_THRESHOLD,
        # Deepness computes (v / 255 - mean) / std: these give back the raw value v.
        "standardization_mean": [0.0] * channels,
        "standardization_std": [1.0 / 255.0] * channels,
        "kdmsi_input": (
            f"raw values of bands {bands} of the before date, then the same bands of the after "
            "date; the band scaling is in the graph"
        ),
        "kdmsi_bands": [f"before band {b}" for b in bands] + [f"after band {b}" for b in bands],
        "kdmsi_scaling": {**scaling.to_dict(), "from": scaling_source},
        "kdmsi_output": "softmax probabilities: channel 0 unchanged, channel 1 changed",
        "kdmsi_source_model": source.name,
        "kdmsi_source_checksum": checksum,
        "kdmsi_architecture": metadata.get("architecture"),
        "kdmsi_engine_version": __version__,
    }
    resolution = training_resolution_cm(metadata)
    if resolution is not None:
        props["resolution"] = resolution
    return {key: json.dumps(value) for key, value in props.items()}


# ----------------------------------------------------------------------------- export


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep torch's exporter notes (warnings, logging) off the job's output; errors still
    raise."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript")
    saved = {name: logging.getLogger(name).level for name in names}
    try:
        for name in names:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _onnx_model(wrapper: StackedDetector, tile: int, opset: int) -> Any:
    """The ONNX ``ModelProto`` of ``wrapper`` (batch free, tile fixed)."""
    # An example batch of 2: torch.export specialises a dimension whose example size is 1.
    example = torch.rand(2, 2 * wrapper.num_bands, tile, tile)
    batch = torch.export.Dim("batch", min=1, max=1024)
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                wrapper,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                external_data=False,
                verbose=False,
            )
    except Exception as exc:  # the exporter's failures are many types; the user gets one line
        raise ModelFileError(
            f"torch could not export the detector to ONNX opset {opset} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else ''}); try another opset or "
            "report it",
            parameters=("opset",),
        ) from exc
    if program is None:  # torch returns None only when it wrote to a file, which we never ask
        raise ModelFileError("torch's ONNX exporter returned no program; report it")
    return program.model_proto


def _probe(scaling: BandScaling, tile: int, vrt: Path | None, seed: int = 0) -> np.ndarray:
    """A ``(1, 2B, tile, tile)`` tile to compare onnxruntime with torch: the centre of the
    stacked VRT when there is one, else values across (and beyond) the scaling's range."""
    if vrt is not None:
        import rasterio
        from rasterio.windows import Window

        with rasterio.open(vrt) as src:
            col = max(0, (src.width - tile) // 2)
            row = max(0, (src.height - tile) // 2)
            window = Window(col, row, tile, tile)
            data = src.read(window=window, boundless=True, fill_value=0).astype(np.float32)
        return data[None]
    rng = np.random.default_rng(seed)
    low = np.asarray(scaling.low * 2, dtype=np.float32)[:, None, None]
    span = np.asarray(scaling.high * 2, dtype=np.float32)[:, None, None] - low
    span = np.where(span > 0, span, 1.0)
    values = rng.uniform(-0.2, 1.2, size=(2 * scaling.num_bands, tile, tile)).astype(np.float32)
    return (low + values * span)[None]


def verify_export(path: Path, wrapper: StackedDetector, probe: np.ndarray) -> float:
    """Largest absolute probability difference of onnxruntime and torch on ``probe``.

    Raises:
        ModelFileError: onnxruntime cannot load the file or the difference exceeds
            :data:`VERIFY_TOLERANCE`.
    """
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (onnx_out,) = session.run([OUTPUT_NAME], {INPUT_NAME: probe})
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelFileError(
            f"onnxruntime cannot run the exported model ({type(exc).__name__}); report it"
        ) from exc
    with torch.no_grad():
        torch_out = wrapper(torch.from_numpy(probe)).numpy()
    difference = float(np.abs(onnx_out - torch_out).max())
    if not difference <= VERIFY_TOLERANCE:
        raise ModelFileError(
            f"the ONNX model differs from torch by {difference:.3g} in probability (more than "
            f"{VERIFY_TOLERANCE:g}) on a probe tile; nothing was written; try another opset",
            parameters=("opset",),
        )
    return difference


def _scene_scaling(
    scaling: BandScaling | None, vrt: tuple[Any, Any, Any] | None, bands: list[int], model: Path
) -> tuple[BandScaling, str]:
    """The scaling to fold into the graph, and where it came from."""
    if scaling is not None:
        return scaling, "detector"
    if vrt is None:
        raise InputError(
            f"{model.name} was trained on several scenes, so it has no band scaling of its own "
            "(detection scales each scene by its own statistics); give the scene to export for "
            "(its before and after rasters and a VRT to stack them in)",
            parameters=("vrt",),
        )
    from kdmsi_engine.data.scene import ScenePair

    with ScenePair.open(vrt[0], vrt[1], bands=bands) as scene:
        return scene.scaling, f"scene {Path(vrt[0]).name} + {Path(vrt[1]).name}"


def export_detector(
    model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    tile_size: int | None = None,
    opset: int = defaults.EXPORT_OPSET,
    vrt: tuple[Any, Any, Any] | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    """Export a detector model file as an ONNX segmentation model (and optionally the VRT).

    Args:
        model: detector model file (``kdmsi train-detector``).
        output: the ``.onnx`` file to write.
        tile_size: the model's fixed tile size (default: the window ``kdmsi detect`` uses).
        opset: ONNX opset (:data:`MIN_OPSET` or later).
        vrt: ``(BEFORE, AFTER, STACK.vrt)``: also write the stacked VRT of that pair for
            Deepness (and take the band scaling from that pair if the detector has none).
        overwrite: replace existing outputs.
        progress: progress and cancellation.

    Returns:
        paths, tile size, opset, resolution, the probe's largest probability difference, and
        the metadata written.

    Raises:
        ModelFileError: not a detector file (e.g. a KD-MSI student model), or the export does
            not reproduce torch.
        InputError / RasterError / OutputError / KdmsiError: bad options, rasters or outputs,
            or the export packages missing. Nothing is written then.
    """
    # Longer than 80 lines: the job's documented parameters; each step is a helper below.
    progress = progress or Progress()
    source = Path(model)
    target = check_output(output, overwrite=overwrite)
    vrt_target = check_output(vrt[2], overwrite=overwrite) if vrt is not None else None
    if vrt_target is not None and vrt_target == target:
        raise InputError("the ONNX file and the VRT must be two different files")
    check_opset(opset)
    require_export_packages()
    progress.stage("export", total=4, message=f"exporting {source.name}")
    from kdmsi_engine.modelfile import load_model
    from kdmsi_engine.models.deeplab import DETECTOR_KIND, load_detector

    net, metadata = load_detector(source)
    checksum = load_model(source, expected_kind=DETECTOR_KIND).checksum
    bands = [int(b) for b in metadata.get("bands") or []]
    tile = export_tile_size(metadata, tile_size)
    vrt_text = None
    if vrt is not None and vrt_target is not None:
        vrt_text, vrt_grid = stack_vrt_xml(vrt[0], vrt[1], vrt_target, bands)
    scaling, scaling_source = _scene_scaling(detector_scaling(metadata, source), vrt, bands, source)
    if scaling.num_bands != len(bands):
        raise ModelFileError(f"{source.name} has a scaling for another band count; retrain it")
    wrapper = StackedDetector(net.float().eval(), scaling).eval()
    progress.advance(1, message="loaded")
    progress.check_cancelled()
    proto = _onnx_model(wrapper, tile, opset)
    props = deepness_metadata(metadata, scaling, tile, source, checksum, scaling_source)
    _set_metadata(proto, props)
    progress.advance(1, message="exported")
    progress.check_cancelled()
    vrt_out = (vrt_target, vrt_text) if vrt_target is not None and vrt_text else None
    result = _write_verified(proto, target, wrapper, scaling, tile, vrt_out, overwrite)
    progress.advance(2, message="verified")
    result["model"] = str(source.absolute())
    result["tile_size"] = tile
    result["opset"] = opset
    result["bands"] = bands
    result["scaling"] = scaling_source
    result["resolution_cm"] = json.loads(props["resolution"]) if "resolution" in props else None
    result["metadata"] = {k: json.loads(v) for k, v in props.items() if not k.startswith("kdmsi")}
    if vrt_text is not None:
        result["vrt_resolution"] = list(vrt_grid.res)
        _note_resolution(progress, vrt_grid, result["resolution_cm"])
    progress.log(f"ONNX model written to {target}")
    return result


def _set_metadata(proto: Any, props: dict[str, str]) -> None:
    """Replace the ONNX model's ``metadata_props`` with ``props`` and name the producer."""
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name, proto.producer_version = "kdmsi", __version__
    proto.doc_string = "KD-MSI change detector: " + json.loads(props["kdmsi_input"])


def _note_resolution(progress: Progress, grid: Any, model_cm: float | None) -> None:
    """Say so when the VRT's pixels are not the size the detector was trained on."""
    from rasterio.errors import CRSError

    try:
        _unit, metres = grid.crs.linear_units_factor
    except CRSError:  # no linear unit: nothing to compare
        return
    vrt_cm = grid.res[0] * float(metres) * 100.0
    if model_cm and not math.isclose(vrt_cm, model_cm, rel_tol=0.01):
        progress.log(
            f"the VRT's pixels are {vrt_cm:g} cm, the detector was trained on {model_cm:g} cm; "
            "Deepness resamples the VRT to the model's resolution"
        )


def _write_verified(
    proto: Any,
    target: Path,
    wrapper: StackedDetector,
    scaling: BandScaling,
    tile: int,
    vrt: tuple[Path, str] | None,
    overwrite: bool,
) -> ExportResult:
    """Write the VRT (if any) and the ONNX file, the ONNX checked against torch on a probe
    tile before either gets its name; on failure neither is written."""
    import onnx

    result: ExportResult = {"onnx": str(target)}
    with contextlib.ExitStack() as stack:
        vrt_tmp = None
        if vrt is not None:
            # Named last (the outer block): a failed ONNX check leaves no VRT either.
            vrt_tmp = stack.enter_context(atomic_output(vrt[0], overwrite=overwrite))
            _write_vrt_text(vrt_tmp, vrt[1], 2 * wrapper.num_bands)
            result["vrt"] = str(vrt[0])
        with atomic_output(target, overwrite=overwrite) as tmp:
            onnx.save_model(proto, str(tmp))
            onnx.checker.check_model(str(tmp))
            probe = _probe(scaling, tile, vrt_tmp)
            result["verified_max_abs_diff"] = verify_export(tmp, wrapper, probe)
            result["probe"] = "centre of the VRT" if vrt_tmp is not None else "synthetic"
    return result
