"""Bad input for the model and pipeline jobs: exit 2, one line on stderr, nothing written.

Owner: RELIABILITY (issue 6 item 1): model files that are not ours, altered, pickled code,
of the wrong kind or for another number of bands (``infer``, ``detect``); manifests with missing
files or duplicate names (``batch``); labels of one class (``run``); output folders that cannot
be written and disks that fill up (``infer``, ``detect``). Real Taizhou Landsat pair and the
real 3-band ``rasterio-rgb-byte`` scene; model files are untrained but written by the engine's
own ``save_model`` exactly as training writes them.
"""

from __future__ import annotations

import builtins
import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_harness import assert_refused, run_cli
from reliability_helpers import (
    cached_models,
    make_detector_model,
    make_kdmsi_model,
    partial_files,
    tmpfs,
)


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    """Jobs that run a network here use one thread (the machine is shared; it is also faster)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pair(shared_data: Path) -> list[str]:
    root = shared_data / "landsat-taizhou-nanjing"
    return [str(root / "A" / "taizhou.tif"), str(root / "B" / "taizhou.tif")]


@pytest.fixture(scope="module")
def rgb(shared_data: Path) -> list[str]:
    """A real 3-band scene (Landsat 7 RGB), as both dates."""
    path = str(shared_data / "rasterio-rgb-byte" / "RGB.byte.tif")
    return [path, path]


@pytest.fixture(scope="module")
def models(pair, tmp_path_factory) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    return cached_models(tmp_path_factory.getbasetemp(), Path(pair[0]), Path(pair[1]))


@pytest.fixture
def out(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def infer(pair: list[str], model: Path, target: Path, *extra: str) -> list[str]:
    return [
        "infer",
        *pair,
        "--model",
        str(model),
        "-o",
        str(target),
        "--method",
        "student",
        "--device",
        "cpu",
        *extra,
    ]


def detect(pair: list[str], model: Path, folder: Path, *extra: str) -> list[str]:
    return ["detect", *pair, "--model", str(model), "-o", str(folder), "--device", "cpu", *extra]


# --- controls: the same commands work with good input -----------------------------------------


def test_infer_and_detect_work_with_good_models(pair, models, out, capfd) -> None:  # type: ignore[no-untyped-def]
    run = run_cli(infer(pair, models["kdmsi"], out / "prob.tif"), capfd)
    assert run.code == 0, run.err
    assert (out / "prob.tif").is_file()
    run = run_cli(detect(pair, models["detector"], out / "det"), capfd)
    assert run.code == 0, run.err
    names = sorted(p.name for p in (out / "det").iterdir())
    assert names == ["change.tif", "change_probability.tif", "changes.gpkg", "run.json"]
    assert partial_files(out) == []


# --- model files ---------------------------------------------------------------------------------


def test_model_missing(pair, out, capfd) -> None:  # type: ignore[no-untyped-def]
    for args in (
        infer(pair, out / "none.kdmsi", out / "p.tif"),
        detect(pair, out / "none.kdmsi", out / "d"),
    ):
        assert_refused(args, capfd, "none.kdmsi.*does not exist", watch=[out])


@pytest.mark.parametrize(
    "content",
    [b"", b"random bytes \x00\x01\x02" * 50, b"PK\x03\x04broken zip"],
    ids=["empty", "random", "broken-zip"],
)
def test_model_not_ours(pair, out, tmp_path, capfd, content: bytes) -> None:  # type: ignore[no-untyped-def]
    model = tmp_path / "model.kdmsi"
    model.write_bytes(content)
    assert_refused(infer(pair, model, out / "p.tif"), capfd, "not a KD-MSI model file", watch=[out])
    assert_refused(detect(pair, model, out / "d"), capfd, "not a KD-MSI model file", watch=[out])


def test_model_is_a_raster(pair, out, capfd) -> None:  # type: ignore[no-untyped-def]
    raster = Path(pair[0])
    assert_refused(
        infer(pair, raster, out / "p.tif"), capfd, "not a KD-MSI model file", watch=[out]
    )


def test_model_is_a_plain_state_dict(pair, out, tmp_path, capfd) -> None:  # type: ignore[no-untyped-def]
    """A torch file of another structure (e.g. a torchvision checkpoint) is not our model."""
    model = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 1, 1)}, model)
    assert_refused(infer(pair, model, out / "p.tif"), capfd, "not a KD-MSI model file", watch=[out])


@pytest.mark.parametrize("where", [0.5, 0.9])
def test_model_altered(pair, models, out, tmp_path, capfd, where: float) -> None:  # type: ignore[no-untyped-def]
    for kind, command in (("kdmsi", infer), ("detector", detect)):
        model = tmp_path / f"{kind}.kdmsi"
        shutil.copyfile(models[kind], model)
        data = bytearray(model.read_bytes())
        data[int(len(data) * where)] ^= 0x10
        model.write_bytes(bytes(data))
        target = out / "p.tif" if kind == "kdmsi" else out / "d"
        assert_refused(
            command(pair, model, target), capfd, "altered or damaged|not a KD-MSI", watch=[out]
        )


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (builtins.open, (self.marker, "w"))


def test_model_with_pickled_code_never_runs(pair, out, tmp_path, capfd) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "PWNED"
    model = tmp_path / "evil.kdmsi"
    torch.save({"format": "kdmsi-model", "format_version": 1, "x": _Payload(marker)}, model)
    assert_refused(infer(pair, model, out / "p.tif"), capfd, "not a KD-MSI model file", watch=[out])
    assert_refused(detect(pair, model, out / "d"), capfd, "not a KD-MSI model file", watch=[out])
    assert not marker.exists(), "the pickled payload ran"


def test_model_of_the_wrong_kind(pair, models, out, capfd) -> None:  # type: ignore[no-untyped-def]
    assert_refused(
        infer(pair, models["detector"], out / "p.tif"),
        capfd,
        "'detector' model.*'kdmsi'",
        watch=[out],
    )
    assert_refused(
        detect(pair, models["kdmsi"], out / "d"), capfd, "'kdmsi' model.*'detector'", watch=[out]
    )


def test_model_trained_on_other_bands(rgb, pair, out, tmp_path, capfd) -> None:  # type: ignore[no-untyped-def]
    """Models for four bands (of the 6-band Landsat pair) on a 3-band scene: refused."""
    scaling = {"method": "uint8", "low": [0.0] * 4, "high": [255.0] * 4}
    kd = make_kdmsi_model(tmp_path / "kd4.kdmsi", scaling, bands=(1, 2, 3, 4))
    det = make_detector_model(tmp_path / "det4.kdmsi", scaling, bands=(1, 2, 3, 4))
    assert_refused(infer(rgb, kd, out / "p.tif"), capfd, "(?i)4 band|band 4", watch=[out])
    assert_refused(detect(rgb, det, out / "d"), capfd, "(?i)4 band|band 4", watch=[out])
    # The same models are accepted by the 6-band pair they fit (control).
    run = run_cli(infer(pair, kd, out / "p.tif"), capfd)
    assert run.code == 0, run.err


# --- outputs -------------------------------------------------------------------------------------


def test_infer_output_exists(pair, models, out, capfd) -> None:  # type: ignore[no-untyped-def]
    target = out / "p.tif"
    target.write_bytes(b"earlier")
    assert_refused(
        infer(pair, models["kdmsi"], target), capfd, "already exists.*--overwrite", watch=[out]
    )
    assert target.read_bytes() == b"earlier"


def test_detect_output_is_a_file(pair, models, out, capfd) -> None:  # type: ignore[no-untyped-def]
    blocker = out / "det"
    blocker.write_text("a file, not a folder")
    assert_refused(detect(pair, models["detector"], blocker), capfd, "(?i)is a file", watch=[out])


def test_output_folder_not_writable(pair, models, tmp_path, capfd) -> None:  # type: ignore[no-untyped-def]
    with tmpfs(tmp_path, read_only=True) as ro:
        if ro is None:
            pytest.skip("cannot mount a read-only file system here")
        assert_refused(
            infer(pair, models["kdmsi"], ro / "p.tif"), capfd, "(?i)writable", watch=[tmp_path]
        )
        assert_refused(
            detect(pair, models["detector"], ro / "d"),
            capfd,
            "(?i)writable|cannot create",
            watch=[tmp_path],
        )


def test_disk_full_infer(pair, models, tmp_path, capfd) -> None:  # type: ignore[no-untyped-def]
    with tmpfs(tmp_path, size_kib=16) as small:
        if small is None:
            pytest.skip("cannot mount a small file system here")
        assert_refused(
            infer(pair, models["kdmsi"], small / "p.tif"), capfd, "disk full", watch=[small]
        )
        assert list(small.iterdir()) == []


def test_disk_full_detect(pair, models, tmp_path, capfd) -> None:  # type: ignore[no-untyped-def]
    with tmpfs(tmp_path, size_kib=64) as small:
        if small is None:
            pytest.skip("cannot mount a small file system here")
        folder = small / "det"
        assert_refused(detect(pair, models["detector"], folder), capfd, "disk full", watch=[small])
        left = (
            [p for p in folder.rglob("*") if not p.name.startswith(".")] if folder.exists() else []
        )
        assert left == [], f"no output under a final name: {left}"


# --- manifests (batch) and labels (run) ------------------------------------------------------


def _manifest(folder: Path, rows: list[str]) -> Path:
    path = folder / "scenes.csv"
    path.write_text("\n".join(["name,before,after,labels", *rows]) + "\n")
    return path


def _labels(folder: Path, value: int | None = None) -> Path:
    points = [((204315.0, 3604605.0), 1), ((211950.0, 3604710.0), 0)]
    features = [
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": list(xy)},
            "properties": {"change": v if value is None else value},
        }
        for xy, v in points
    ]
    path = folder / "labels.geojson"
    path.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32651"}},
                "features": features,
            }
        )
    )
    return path


RUN_SMALL = [
    "--kd-backbone",
    "efficientnet-lite0",
    "--kd-weights",
    "none",
    "--kd-epochs",
    "1",
    "--tile-size",
    "64",
    "--device",
    "cpu",
]


def test_batch_manifest_duplicate_names(pair, tmp_path, capfd) -> None:  # type: ignore[no-untyped-def]
    labels = _labels(tmp_path)
    manifest = _manifest(tmp_path, [f"t,{pair[0]},{pair[1]},{labels}"] * 2)
    folder = tmp_path / "batch"
    assert_refused(
        ["batch", str(manifest), "-o", str(folder), *RUN_SMALL],
        capfd,
        "duplicate name 't'",
        watch=[tmp_path],
    )
    assert not folder.exists()


def test_batch_manifest_missing_file(pair, tmp_path, capfd) -> None:  # type: ignore[no-untyped-def]
    labels = _labels(tmp_path)
    manifest = _manifest(tmp_path, [f"t,{pair[0]},{tmp_path}/missing.tif,{labels}"])
    folder = tmp_path / "batch"
    args = ["batch", str(manifest), "-o", str(folder), *RUN_SMALL]
    assert_refused(args, capfd, "missing.tif does not exist", watch=[tmp_path])
    assert not folder.exists() or list(folder.iterdir()) == []


def test_batch_manifest_missing_columns(tmp_path, capfd) -> None:  # type: ignore[no-untyped-def]
    manifest = tmp_path / "scenes.csv"
    manifest.write_text("before,after\na.tif,b.tif\n")
    folder = tmp_path / "batch"
    assert_refused(
        ["batch", str(manifest), "-o", str(folder)], capfd, "lacks column", watch=[tmp_path]
    )
    assert not folder.exists()


@pytest.mark.parametrize("value", [1, 0])
def test_run_labels_of_one_class(pair, tmp_path, capfd, value: int) -> None:  # type: ignore[no-untyped-def]
    labels = _labels(tmp_path, value)
    folder = tmp_path / "run"
    args = ["run", *pair, "--labels", str(labels), "-o", str(folder), *RUN_SMALL]
    assert_refused(args, capfd, "(?i)both", watch=[tmp_path])
    assert not folder.exists() or list(folder.iterdir()) == []


def test_run_label_file_without_features(pair, tmp_path, capfd) -> None:  # type: ignore[no-untyped-def]
    labels = tmp_path / "empty.geojson"
    labels.write_text('{"type": "FeatureCollection", "features": []}')
    folder = tmp_path / "run"
    args = ["run", *pair, "--labels", str(labels), "-o", str(folder), *RUN_SMALL]
    assert_refused(args, capfd, "no features", watch=[tmp_path])
    assert not folder.exists() or list(folder.iterdir()) == []


# --- rasters given to the raster-only jobs ---------------------------------------------------


def test_pseudo_vectorize_evaluate_refuse_non_rasters(tmp_path, out, capfd) -> None:  # type: ignore[no-untyped-def]
    fake = tmp_path / "prob.tif"
    fake.write_text("not a raster")
    labels = _labels(tmp_path)
    args = ["pseudo", str(fake), "-o", str(out / "pseudo.tif"), "--labels", str(labels)]
    assert_refused(args, capfd, "prob.tif", watch=[out])
    assert_refused(
        ["vectorize", str(fake), "-o", str(out / "c.gpkg")], capfd, "prob.tif", watch=[out]
    )
    assert_refused(["evaluate", str(fake), str(fake)], capfd, "prob.tif", watch=[out])


@pytest.fixture(scope="module")
def prob(pair, models, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """A real probability raster of the Taizhou pair (student map of the untrained model)."""
    from kdmsi_engine.inference.scene import infer_scene

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        target = tmp_path_factory.mktemp("prob") / "prob.tif"
        infer_scene(*pair, models["kdmsi"], target, method="student", device="cpu")
    finally:
        torch.set_num_threads(threads)
    return target


def test_evaluate_truth_of_another_place(prob, shared_data, out, capfd) -> None:  # type: ignore[no-untyped-def]
    truth = shared_data / "landsat-taizhou-nanjing" / "label" / "nanjing.tif"
    assert_refused(["evaluate", str(prob), str(truth)], capfd, "(?i)overlap|no pixel", watch=[out])


def test_evaluate_truth_is_an_image(prob, pair, out, capfd) -> None:  # type: ignore[no-untyped-def]
    assert_refused(["evaluate", str(prob), pair[0]], capfd, "(?i)band|mask", watch=[out])


def test_evaluate_works_on_its_own_truth(prob, shared_data, capfd) -> None:  # type: ignore[no-untyped-def]
    """Control: the Taizhou sample labels (1/0, 255 nodata) are a valid truth for Taizhou."""
    truth = shared_data / "landsat-taizhou-nanjing" / "label" / "taizhou.tif"
    run = run_cli(["evaluate", str(prob), str(truth), "--truth-nodata", "255"], capfd)
    assert run.code == 0, run.err
