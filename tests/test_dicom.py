"""DICOM inputs: rescale slope/intercept, the window (file's, first of several, or the configured
override; min-max when none), 8-bit mapping and MONOCHROME1 inversion give the pixels worked out by
hand here; damaged files are rejects; missing pydicom is one clear error naming the file; a CSV
dataset of DICOM files goes through build_shards and back unchanged.

The DICOM files are written here with pydicom (FileDataset + minimal file meta, uint16 PixelData).
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from data_pipeline import build_shards  # noqa: E402
from data_pipeline.image_io import BadImage, MissingDependency, load_gray8  # noqa: E402

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def write_dicom(path: Path, stored: np.ndarray, *, photometric: str = "MONOCHROME2", slope=None,
                intercept=None, center=None, width=None, frames: int = 1, pixels: bool = True) -> Path:
    """A minimal single-frame (or `frames`-frame) 16-bit grayscale DICOM file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = stored.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for name, value in (("RescaleSlope", slope), ("RescaleIntercept", intercept),
                        ("WindowCenter", center), ("WindowWidth", width)):
        if value is not None:
            setattr(ds, name, value)
    if pixels:
        ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        ds.save_as(str(path), enforce_file_format=True)  # pydicom >= 3
    except TypeError:  # pydicom 2.4
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(str(path), write_like_original=False)
    return path


# Stored values chosen so that x = 2 * stored - 1024 (slope 2, intercept -1024) hits round numbers:
STORED = np.array([[512, 612, 562, 532], [487, 662, 552, 572]], dtype=np.uint16)
# x:             [[  0, 200, 100,  40], [-50, 300,  80, 120]]
# Window centre 100.5, width 201: y = ((x - 100) / 200 + 0.5) * 255 = x * 255 / 200, clipped:
# 0 -> 0; 200 -> 255; 100 -> 127.5 -> 128 (half up); 40 -> 51; -50 -> 0; 300 -> 255; 80 -> 102;
# 120 -> 153.
WINDOWED = [[0, 255, 128, 51], [0, 255, 102, 153]]


def _pixels(path: Path, **kw) -> list[list[int]]:
    img = load_gray8(path, **kw)
    assert img.mode == "L"
    return np.asarray(img).tolist()


def test_slope_intercept_and_the_files_window_give_the_hand_computed_pixels(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", STORED, slope=2, intercept=-1024, center=100.5, width=201)
    assert _pixels(path) == WINDOWED


def test_monochrome1_is_inverted_after_windowing(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", STORED, photometric="MONOCHROME1", slope=2, intercept=-1024,
                       center=100.5, width=201)
    assert _pixels(path) == [[255, 0, 127, 204], [255, 0, 153, 102]]  # 255 - WINDOWED


def test_multi_valued_window_uses_the_first_value(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", STORED, slope=2, intercept=-1024, center=[100.5, 40],
                       width=[201, 80])
    assert _pixels(path) == WINDOWED


def test_configured_window_overrides_the_files(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", STORED, slope=2, intercept=-1024, center=100.5, width=201)
    # Centre 50.5, width 101: y = ((x - 50) / 100 + 0.5) * 255 = x * 255 / 100, clipped:
    # 0 -> 0, 200 -> 255, 100 -> 255, 40 -> 102, -50 -> 0, 300 -> 255, 80 -> 204, 120 -> 255.
    assert _pixels(path, window=(50.5, 101)) == [[0, 255, 255, 102], [0, 255, 204, 255]]


def test_without_any_window_the_image_range_is_stretched_min_max(tmp_path):
    stored = np.array([[0, 10], [20, 40]], dtype=np.uint16)  # no slope/intercept: x = stored
    path = write_dicom(tmp_path / "a.dcm", stored)
    # y = (x - 0) / (40 - 0) * 255: 0, 63.75 -> 64, 127.5 -> 128, 255
    assert _pixels(path) == [[0, 64], [128, 255]]
    flat = write_dicom(tmp_path / "flat.dcm", np.full((2, 2), 7, np.uint16))
    assert _pixels(flat) == [[0, 0], [0, 0]]


def test_window_width_of_one_is_a_threshold(tmp_path):
    stored = np.array([[99, 100], [101, 102]], dtype=np.uint16)
    path = write_dicom(tmp_path / "a.dcm", stored, center=100.5, width=1)  # x > 100 -> 255
    assert _pixels(path) == [[0, 0], [255, 255]]


def test_dicom_is_recognised_by_its_preamble_without_the_dcm_suffix(tmp_path):
    plain = write_dicom(tmp_path / "IM000001", STORED, slope=2, intercept=-1024, center=100.5, width=201)
    upper = write_dicom(tmp_path / "B.DCM", STORED, slope=2, intercept=-1024, center=100.5, width=201)
    assert _pixels(plain) == WINDOWED and _pixels(upper) == WINDOWED


@pytest.mark.parametrize("damage", ["text", "truncated", "no_pixels", "multi_frame", "too_big"])
def test_unusable_dicom_files_raise_bad_image_with_a_reason(tmp_path, damage):
    path = tmp_path / "bad.dcm"
    if damage == "text":
        path.write_text("this is a report, not a DICOM file\n")
    elif damage == "truncated":
        write_dicom(path, np.zeros((64, 64), np.uint16))
        path.write_bytes(path.read_bytes()[:-1000])
    elif damage == "no_pixels":
        write_dicom(path, STORED, pixels=False)
    elif damage == "multi_frame":
        write_dicom(path, np.zeros((2, 4, 4), np.uint16), frames=2)
    else:
        write_dicom(path, np.zeros((64, 64), np.uint16))
    with pytest.raises(BadImage) as e:
        load_gray8(path, max_pixels=1000 if damage == "too_big" else 10**8)
    reason = str(e.value)
    expected = {"text": "DICOM", "truncated": "DICOM", "no_pixels": "no pixel data",
                "multi_frame": "multi-frame", "too_big": "exceeds the limit"}[damage]
    assert expected in reason, reason


def test_missing_pydicom_is_one_clear_error_naming_the_file(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "scan.dcm", STORED)
    monkeypatch.setitem(sys.modules, "pydicom", None)  # `import pydicom` now raises ImportError
    with pytest.raises(MissingDependency) as e:
        load_gray8(path)
    assert str(path) in str(e.value) and "pip install" in str(e.value)


def test_missing_pydicom_stops_build_shards_with_an_error_line(tmp_path, monkeypatch):
    root = tmp_path / "root"
    write_dicom(root / "scan.dcm", STORED)
    (root / "table.csv").write_text("path,label\nscan.dcm,x\n")
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(SystemExit) as e:
        build_shards.main(["--dataset", "csv", "--root", str(root), "--out", str(tmp_path / "o"),
                           "--csv", "table.csv", "--label-column", "label", "--size", "16",
                           "--workers", "1", "--quiet"])
    assert str(e.value.code).startswith("error:") and "scan.dcm" in str(e.value.code)
    assert "pydicom" in str(e.value.code)


# ------------------------------------------------------------------------------ through build_shards
def _expected(stored, slope, intercept, center, width, invert) -> np.ndarray:
    """The mapping of image_io's docstring, written out again independently of the code."""
    x = stored.astype(np.float64) * slope + intercept
    y = np.clip(np.floor(((x - (center - 0.5)) / (width - 1) + 0.5) * 255 + 0.5), 0, 255)
    return (255 - y if invert else y).astype(np.uint8)


def test_csv_dataset_of_dicom_files_round_trips_through_build_shards(tmp_path):
    rng = np.random.default_rng(0)
    root, rows, expected = tmp_path / "root", [], {}
    findings = ["Effusion", "Mass", "Effusion|Mass", "No Finding"]
    for i in range(12):
        stored = rng.integers(0, 4096, (16, 16)).astype(np.uint16)  # 16x16 = --size: no resampling
        slope, intercept, center, width = 1 + i % 2, -1000 * (i % 3), 1500 + 100 * i, 2000 + 50 * i
        invert = i % 4 == 3
        write_dicom(root / f"study{i % 5}" / f"img{i:02d}.dcm", stored, slope=slope, intercept=intercept,
                    center=center, width=width, photometric="MONOCHROME1" if invert else "MONOCHROME2")
        rows.append(f"study{i % 5}/img{i:02d}.dcm,{findings[i % 4]},P{i % 5}")
        expected[f"img{i:02d}"] = _expected(stored, slope, intercept, center, width, invert)
    (root / "table.csv").write_text("file,findings,patient\n" + "\n".join(rows) + "\n")
    out = tmp_path / "shards"
    build_shards.main(["--dataset", "csv", "--root", str(root), "--out", str(out), "--csv", "table.csv",
                       "--path-column", "file", "--label-column", "findings", "--label-sep", "|",
                       "--negative-label", "No Finding", "--labels", "Mass,Effusion",
                       "--patient-column", "patient", "--size", "16", "--shard-size", "4",
                       "--val-fraction", "0.3", "--test-fraction", "0.2", "--workers", "1", "--quiet",
                       "--verify"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["label_names"] == ["Mass", "Effusion"] and manifest["multilabel"] is True
    assert manifest["summary"]["accepted"] == 12 and manifest["rejected"] == []
    seen = {}
    for split, entry in manifest["splits"].items():
        tars = [str(out / s["name"]) for s in entry["shards"]]
        for s in wds.WebDataset(tars, shardshuffle=False, empty_check=False) if tars else []:
            seen[s["__key__"]] = (np.asarray(Image.open(io.BytesIO(s["png"]))),
                                  np.frombuffer(s["lbl"], np.uint8).tolist())
    assert sorted(seen) == sorted(expected)
    for key, (pixels, labels) in seen.items():
        np.testing.assert_array_equal(pixels, expected[key], err_msg=key)
        i = int(key[3:])
        text = findings[i % 4]
        assert labels == [int("Mass" in text), int("Effusion" in text)], key


def test_dicom_window_flag_overrides_every_file_and_is_recorded(tmp_path):
    root = tmp_path / "root"
    write_dicom(root / "a.dcm", np.tile(STORED, (8, 4)), slope=2, intercept=-1024, center=0, width=10)
    (root / "table.csv").write_text("path,label\na.dcm,x\n")
    out = tmp_path / "shards"
    build_shards.main(["--dataset", "csv", "--root", str(root), "--out", str(out), "--csv", "table.csv",
                       "--label-column", "label", "--size", "16", "--test-fraction", "0",
                       "--val-fraction", "0", "--workers", "1", "--quiet", "--dicom-window", "100.5,201"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image"]["dicom_window"] == [100.5, 201.0]
    (shard,) = manifest["splits"]["train"]["shards"]
    (sample,) = wds.WebDataset([str(out / shard["name"])], shardshuffle=False, empty_check=False)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))),
                                  np.tile(np.array(WINDOWED, np.uint8), (8, 4)))


def test_dicom_window_flag_rejects_a_malformed_value(capsys):
    for bad in ("40", "40,0", "a,b"):
        with pytest.raises(SystemExit):
            build_shards.parse_args(["--dataset", "csv", "--root", "r", "--out", "o", "--csv", "t.csv",
                                     "--dicom-window", bad])
        assert "--dicom-window" in capsys.readouterr().err
