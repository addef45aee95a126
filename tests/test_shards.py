"""Shards written by `data_pipeline.build_shards` give back exactly what went in, through both
readers the project relies on (webdataset and DALI's `fn.readers.webdataset` in CPU-only mode),
with a manifest that tells the truth and a DALI index equal to DALI's own `wds2idx`.

Expected pixels come from the original source images, resized with the same functions the builder
uses (`image_io.load_gray8` + `fit_square`); PNG and raw are lossless, so they must match exactly.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_pipeline import build_shards
from data_pipeline.adapters import load_dataset
from data_pipeline.image_io import fit_square, load_gray8

FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
            "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
            "Hernia"]
PLANES = ["Fetal abdomen", "Fetal brain", "Fetal femur", "Fetal thorax", "Maternal cervix", "Other"]
SPLITS = ("train", "val", "test")
DATASETS = {"cxr": ("chestxray14", "cxr_root", "cxr_shards"),
            "us": ("fetal_planes", "us_root", "us_shards")}


def _manifest(shard_dir: Path) -> dict:
    return json.loads((Path(shard_dir) / "manifest.json").read_text())


def _tars(shard_dir: Path, split: str) -> list[str]:
    return [str(Path(shard_dir) / s["name"]) for s in _manifest(shard_dir)["splits"][split]["shards"]]


def _source_records(dataset: str, root: Path, manifest: dict) -> dict:
    """The adapter's records for the same options the shards were built with, by key."""
    index = load_dataset(dataset, root, val_fraction=manifest["val_fraction"], seed=manifest["seed"])
    return {r.key: r for r in index.records}


def _expected_pixels(record, manifest: dict) -> np.ndarray:
    image = manifest["image"]
    return np.asarray(fit_square(load_gray8(record.path), image["size"], image["fit"]))


def _build(root: Path, out: Path, dataset: str = "chestxray14", *extra: str) -> Path:
    build_shards.main(["--dataset", dataset, "--root", str(root), "--out", str(out), "--size", "48",
                       "--shard-size", "16", "--val-fraction", "0.2", "--workers", "1", "--quiet",
                       *extra])
    return out


def _shard_files(shard_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(shard_dir.iterdir()) if p.suffix in (".tar", ".idx")}


@pytest.fixture(params=list(DATASETS))
def built(request):
    """(dataset name, root, shard dir, manifest, source records by key) for each dataset."""
    dataset, root_fixture, shards_fixture = DATASETS[request.param]
    root = request.getfixturevalue(root_fixture)
    shards = request.getfixturevalue(shards_fixture)
    manifest = _manifest(shards)
    return dataset, root, shards, manifest, _source_records(dataset, root, manifest)


# ------------------------------------------------------------------------------ round trip
def test_webdataset_reads_back_every_key_pixel_and_label_exactly(built):
    dataset, _, shards, manifest, records = built
    seen = []
    for split in SPLITS:
        samples = list(wds.WebDataset(_tars(shards, split), shardshuffle=False, empty_check=False))
        assert len(samples) == manifest["splits"][split]["samples"]
        for i, s in enumerate(samples):
            key = s["__key__"]
            rec = records[key]
            assert rec.split == split
            pixels = np.asarray(Image.open(io.BytesIO(s["png"])))
            assert pixels.dtype == np.uint8 and pixels.shape == (48, 48)
            np.testing.assert_array_equal(pixels, _expected_pixels(rec, manifest), err_msg=key)
            assert np.frombuffer(s["lbl"], dtype=np.uint8).tolist() == list(rec.labels)
            assert int(np.frombuffer(s["sid"], dtype="<i8")[0]) == i  # ids run 0..n-1 in order
            meta = json.loads(s["json"])
            assert meta["key"] == key and meta["patient"] == rec.patient and meta["split"] == split
            seen.append(key)
    assert sorted(seen) == sorted(records)  # every accepted record exactly once


def test_dali_cpu_webdataset_reader_reads_back_every_key_pixel_and_label_exactly(built):
    from nvidia.dali import fn, pipeline_def, types

    dataset, _, shards, manifest, records = built
    for split in SPLITS:
        n = manifest["splits"][split]["samples"]
        tars = _tars(shards, split)
        idxs = [str(Path(t).with_suffix(".idx")) for t in tars]

        @pipeline_def(batch_size=n, num_threads=1, device_id=None)  # device_id=None: CPU-only mode
        def pipe():
            raw, label, sid = fn.readers.webdataset(
                paths=tars, index_paths=idxs, ext=["png", "lbl", "sid"],
                dtypes=[types.UINT8, types.UINT8, types.INT64], missing_component_behavior="error")
            return fn.decoders.image(raw, device="cpu", output_type=types.GRAY), label, sid

        p = pipe()
        p.build()
        assert list(p.epoch_size().values()) == [n]  # the index gives the reader every sample
        images, labels, sids = p.run()
        keys = []
        for i in range(n):
            member = images[i].source_info().rsplit(":", 1)[-1]  # "<tar>:<offset>:<key>.png"
            key = member.split(".", 1)[0]
            rec = records[key]
            assert rec.split == split
            img = np.asarray(images.at(i))
            assert img.shape == (48, 48, 1)
            np.testing.assert_array_equal(img[..., 0], _expected_pixels(rec, manifest), err_msg=key)
            assert np.asarray(labels.at(i)).tolist() == list(rec.labels)
            assert np.asarray(sids.at(i)).tolist() == [i]
            keys.append(key)
        assert len(set(keys)) == n


def test_no_sample_key_or_member_name_contains_a_dot_beyond_the_extension(built):
    _, _, shards, manifest, _ = built
    for split in SPLITS:
        for tar in _tars(shards, split):
            with tarfile.open(tar) as t:
                names = t.getnames()
            assert len(names) % 4 == 0  # image, lbl, sid, json per sample
            for name in names:
                key, ext = name.split(".", 1)
                assert "." not in ext and ext in ("png", "lbl", "sid", "json"), name
                assert "/" not in name and " " not in key


def test_source_names_with_dots_and_spaces_become_dot_free_keys(tmp_path, us_root):
    root = tmp_path / "us"
    shutil.copytree(us_root, root)
    csv_path = root / "FETAL_PLANES_DB_data.csv"
    lines = csv_path.read_text().splitlines()
    old = lines[1].split(";")[0]
    new = "Patient 1.v2.scan"
    (root / "Images" / f"{old}.png").rename(root / "Images" / f"{new}.png")
    lines[1] = lines[1].replace(old, new, 1)
    csv_path.write_text("\n".join(lines) + "\n")

    out = _build(root, tmp_path / "shards", "fetal_planes")
    keys = [s["__key__"] for split in SPLITS
            for s in wds.WebDataset(_tars(out, split), shardshuffle=False, empty_check=False)]
    assert "Patient_1_v2_scan" in keys
    assert all("." not in k and " " not in k for k in keys)


# ------------------------------------------------------------------------------ DALI index
def test_idx_files_equal_what_dalis_own_wds2idx_writes(built, tmp_path):
    _, _, shards, manifest, _ = built
    wds2idx = Path(sys.executable).parent / "wds2idx"
    assert wds2idx.is_file(), wds2idx
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            expected = tmp_path / (shard["name"] + ".idx")
            subprocess.run([str(wds2idx), str(shards / shard["name"]), str(expected)], check=True,
                           capture_output=True, timeout=60)
            assert (shards / shard["index"]).read_text() == expected.read_text(), shard["name"]


# ------------------------------------------------------------------------------ manifest
def test_manifest_counts_patients_positives_and_checksums_match_the_shards(built):
    dataset, _, shards, manifest, records = built
    label_names = FINDINGS if dataset == "chestxray14" else PLANES
    assert manifest["label_names"] == label_names
    assert manifest["multilabel"] == (dataset == "chestxray14")
    assert manifest["image"]["size"] == 48 and manifest["image"]["format"] == "png"
    total = 0
    for split in SPLITS:
        entry = manifest["splits"][split]
        in_split = [r for r in records.values() if r.split == split]
        assert entry["samples"] == len(in_split) > 0
        assert entry["patients"] == len({r.patient for r in in_split})
        labels, patients = [], set()
        for shard in entry["shards"]:
            path = shards / shard["name"]
            assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
            assert shard["bytes"] == path.stat().st_size
            assert (shards / shard["index"]).is_file()
            samples = list(wds.WebDataset([str(path)], shardshuffle=False, empty_check=False))
            assert shard["samples"] == len(samples) <= 16
            labels += [np.frombuffer(s["lbl"], dtype=np.uint8) for s in samples]
            patients |= {json.loads(s["json"])["patient"] for s in samples}
        sums = np.sum(labels, axis=0).tolist()
        assert entry["positives"] == dict(zip(label_names, sums))  # keys in canonical order, too
        assert list(entry["positives"]) == label_names
        assert len(patients) == entry["patients"]
        total += entry["samples"]
    assert manifest["summary"]["accepted"] == total == len(records)
    assert manifest["summary"]["rejected"] == 0 and manifest["rejected"] == []
    assert len(manifest["splits"]["train"]["shards"]) > 1  # --shard-size really splits


def test_no_temporary_part_files_are_left_behind(cxr_shards, us_shards):
    for d in (cxr_shards, us_shards):
        assert not list(d.glob("*.part"))
        tars = {p.stem for p in d.glob("*.tar")}
        assert tars == {p.stem for p in d.glob("*.idx")}


# ------------------------------------------------------------------------------ determinism
def test_rebuilding_with_the_same_seed_gives_byte_identical_shards(cxr_root, cxr_shards, tmp_path):
    again = _build(cxr_root, tmp_path / "again")
    parallel = _build(cxr_root, tmp_path / "parallel", "chestxray14", "--workers", "2")
    original = _shard_files(cxr_shards)
    assert len(original) > 4
    assert _shard_files(again) == original
    assert _shard_files(parallel) == original
    strip = lambda m: {k: v for k, v in m.items() if k != "summary"}  # noqa: E731  (timings)
    assert strip(_manifest(again)) == strip(_manifest(cxr_shards))

    other = _build(cxr_root, tmp_path / "other_seed", "chestxray14", "--seed", "1")
    assert _shard_files(other) != original


def test_building_over_an_existing_manifest_needs_overwrite(cxr_root, tmp_path):
    out = _build(cxr_root, tmp_path / "out")
    with pytest.raises(SystemExit) as e:
        _build(cxr_root, out)
    assert "manifest.json" in str(e.value.code) and "--overwrite" in str(e.value.code)
    _build(cxr_root, out, "chestxray14", "--overwrite")


# ------------------------------------------------------------------------------ bad images
@pytest.fixture
def damaged_cxr(tmp_path, cxr_root):
    """A copy of cxr_root with a truncated PNG, a zero-byte PNG and a text file named .png."""
    root = tmp_path / "damaged"
    shutil.copytree(cxr_root, root)
    images = sorted((root / "images").iterdir())
    truncated, empty, text = images[3], images[17], images[29]
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    empty.write_bytes(b"")
    text.write_text("this is a radiology report, not an image\n")
    return root, {truncated: "cannot decode image", empty: "zero-byte file", text: "cannot decode image"}


def test_bad_images_are_rejected_with_reasons_and_the_build_succeeds_under_the_limit(damaged_cxr, tmp_path):
    root, bad = damaged_cxr
    out = _build(root, tmp_path / "out", "chestxray14", "--max-reject-fraction", "0.1")
    manifest = _manifest(out)
    rejected = {Path(r["input"]).name: r["reason"] for r in manifest["rejected"]}
    assert set(rejected) == {p.name for p in bad}
    for path, reason in bad.items():
        assert rejected[path.name].startswith(reason), rejected[path.name]
    assert manifest["summary"]["rejected"] == 3 and manifest["summary"]["inputs"] == 60
    assert manifest["summary"]["accepted"] == 57
    keys = {s["__key__"] for split in SPLITS
            for s in wds.WebDataset(_tars(out, split), shardshuffle=False, empty_check=False)}
    assert len(keys) == 57 and not keys & {p.stem for p in bad}


@pytest.mark.parametrize("previous_build", [False, True], ids=["fresh-dir", "over-a-good-build"])
def test_too_many_bad_images_fail_the_build_and_leave_no_shards(damaged_cxr, cxr_root, tmp_path,
                                                                  previous_build):
    root, _ = damaged_cxr
    out = tmp_path / "out"
    if previous_build:
        _build(cxr_root, out)
    with pytest.raises(SystemExit) as e:
        _build(root, out, "chestxray14", "--max-reject-fraction", "0.01", "--overwrite")
    assert e.value.code not in (0, None)
    message = str(e.value.code)
    assert "3 of 60" in message and "--max-reject-fraction" in message
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert not [n for n in left if n.endswith((".tar", ".idx", ".part", "manifest.json"))], left


# ------------------------------------------------------------------------------ other formats
def _read_images(shard_dir: Path, ext: str):
    for split in SPLITS:
        for s in wds.WebDataset(_tars(shard_dir, split), shardshuffle=False, empty_check=False):
            yield s["__key__"], s[ext]


def test_raw_format_round_trips_exactly(cxr_root, tmp_path):
    out = _build(cxr_root, tmp_path / "raw", "chestxray14", "--format", "raw")
    manifest = _manifest(out)
    assert manifest["image"]["format"] == "raw" and manifest["image"]["ext"] == "raw"
    records = _source_records("chestxray14", cxr_root, manifest)
    n = 0
    for key, data in _read_images(out, "raw"):
        assert len(data) == 48 * 48
        pixels = np.frombuffer(data, dtype=np.uint8).reshape(48, 48)
        np.testing.assert_array_equal(pixels, _expected_pixels(records[key], manifest), err_msg=key)
        n += 1
    assert n == len(records)


def test_jpeg_format_round_trips_within_tolerance(cxr_root, tmp_path):
    out = _build(cxr_root, tmp_path / "jpeg", "chestxray14", "--format", "jpeg", "--jpeg-quality", "95")
    manifest = _manifest(out)
    assert manifest["image"]["ext"] == "jpg"
    records = _source_records("chestxray14", cxr_root, manifest)
    n = 0
    for key, data in _read_images(out, "jpg"):
        img = Image.open(io.BytesIO(data))
        assert img.format == "JPEG" and img.mode == "L" and img.size == (48, 48)
        diff = np.abs(np.asarray(img, dtype=np.int16)
                      - _expected_pixels(records[key], manifest).astype(np.int16))
        assert diff.mean() < 2.0 and diff.max() <= 32, (key, diff.mean(), diff.max())
        n += 1
    assert n == len(records)


@pytest.mark.parametrize("fit", ["crop", "stretch"])
def test_non_square_ultrasound_images_follow_the_fit_mode(us_root, tmp_path, fit):
    out = _build(us_root, tmp_path / fit, "fetal_planes", "--fit", fit)
    manifest = _manifest(out)
    assert manifest["image"]["fit"] == fit
    records = _source_records("fetal_planes", us_root, manifest)
    for key, data in _read_images(out, "png"):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))),
                                      _expected_pixels(records[key], manifest), err_msg=key)


def test_padded_ultrasound_images_keep_black_borders(us_shards):
    """`pad` keeps the aspect ratio: a wide image gets black rows above and below."""
    for key, data in _read_images(us_shards, "png"):
        pixels = np.asarray(Image.open(io.BytesIO(data)))
        assert pixels[0].max() == 0 and pixels[-1].max() == 0, key  # every source is wider than tall
