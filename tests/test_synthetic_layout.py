"""The synthetic datasets are written in the real on-disk layouts (docs/design.md, "Datasets"), and
the real adapters read every variant of those layouts into the same records.

The expected header strings, name patterns and label vocabularies are written out here from
docs/design.md, not imported from the code under test.
"""
from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.adapters import load_dataset
from data_pipeline.synthetic import make_cxr, make_us

CXR_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
US_HEADER = "Image_name;Patient_num;Plane;Brain_plane;Operator;US_Machine;Train "
FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
            "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
            "Hernia"]
PLANES = ["Fetal abdomen", "Fetal brain", "Fetal femur", "Fetal thorax", "Maternal cervix", "Other"]
CXR_NAME = re.compile(r"^\d{8}_\d{3}\.png$")


def _csv_rows(path: Path, delimiter: str = ","):
    with path.open(newline="") as f:
        return list(csv.reader(f, delimiter=delimiter))


def _list(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line]


def _record_view(index):
    """What a record means, independent of where the file lies."""
    return sorted((r.key, r.labels, r.patient, r.split) for r in index.records)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ ChestX-ray14
def test_cxr_label_file_has_the_real_header_and_11_field_rows(cxr_root):
    path = cxr_root / "Data_Entry_2017_v2020.csv"
    assert path.read_text().splitlines()[0] == CXR_HEADER
    header, *rows = _csv_rows(path)
    assert len(header) == 11  # the bracketed column names contain commas
    assert rows and all(len(r) == 11 for r in rows)
    for r in rows:
        findings = r[1].split("|")
        assert findings == ["No Finding"] or set(findings) <= set(FINDINGS)


def test_cxr_images_are_named_like_nih_and_are_8bit_grayscale_of_requested_size(cxr_root):
    rows = _csv_rows(cxr_root / "Data_Entry_2017_v2020.csv")[1:]
    names = sorted(p.name for p in (cxr_root / "images").iterdir())
    assert names == sorted(r[0] for r in rows)
    for name in names:
        assert CXR_NAME.match(name), name
        with Image.open(cxr_root / "images" / name) as img:
            assert img.format == "PNG" and img.mode == "L" and img.size == (64, 64)
    for r in rows:  # Patient ID column is the numeric part before '_'
        assert int(r[3]) == int(r[0].split("_")[0])


def test_cxr_official_split_lists_are_patient_disjoint_and_cover_every_image(cxr_root):
    train_val, test = _list(cxr_root / "train_val_list.txt"), _list(cxr_root / "test_list.txt")
    assert train_val and test
    all_names = {r[0] for r in _csv_rows(cxr_root / "Data_Entry_2017_v2020.csv")[1:]}
    assert sorted(train_val + test) == sorted(all_names)  # each image in exactly one list
    patient = lambda name: name.split("_")[0]  # noqa: E731
    assert not {patient(n) for n in train_val} & {patient(n) for n in test}


def test_cxr_patients_have_several_images(cxr_root):
    per_patient = Counter(name.split("_")[0] for name in (p.name for p in (cxr_root / "images").iterdir()))
    assert max(per_patient.values()) > 1
    assert len(per_patient) < sum(per_patient.values()) / 1.5  # on average well above one image each


@pytest.mark.parametrize("variant", [
    {"trailing_comma": True},
    {"label_file": "Data_Entry_2017.csv"},
    {"archive_folders": True},
    {"trailing_comma": True, "label_file": "Data_Entry_2017.csv", "archive_folders": True},
], ids=["trailing-comma", "Data_Entry_2017", "archive-folders", "all-three"])
def test_cxr_layout_variants_are_read_into_the_same_records(tmp_path, variant):
    make_cxr(tmp_path / "plain", 40, 32, seed=3)
    make_cxr(tmp_path / "variant", 40, 32, seed=3, **variant)
    root = tmp_path / "variant"
    label_file = root / variant.get("label_file", "Data_Entry_2017_v2020.csv")
    assert label_file.is_file()
    if variant.get("trailing_comma"):
        lines = label_file.read_text().splitlines()
        assert lines[0] == CXR_HEADER + ","
        assert all(line.endswith(",") for line in lines)
        assert all(len(r) == 12 and r[-1] == "" for r in _csv_rows(label_file)[1:])
    if variant.get("archive_folders"):
        assert not (root / "images").exists()
        folders = sorted(p.parent.parent.name for p in root.glob("images_*/images/*.png"))
        assert len(set(folders)) > 1 and all(re.fullmatch(r"images_\d{3}", f) for f in folders)
        assert len(folders) == 40

    plain = load_dataset("chestxray14", tmp_path / "plain")
    other = load_dataset("chestxray14", root)
    assert other.rejected == [] and plain.rejected == []
    assert len(other.records) == 40
    assert _record_view(other) == _record_view(plain)
    for r in other.records:
        assert r.path.is_file() and r.path.name == f"{r.key}.png"


def test_validation_split_is_carved_by_patient_and_is_reproducible_in_the_seed(cxr_root):
    test_names = set(_list(cxr_root / "test_list.txt"))
    index = load_dataset("chestxray14", cxr_root, val_fraction=0.3, seed=0)
    patients = {s: {r.patient for r in index.records if r.split == s} for s in ("train", "val", "test")}
    assert all(patients.values())
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    for r in index.records:  # val comes out of train_val, never out of the official test list
        assert (r.split == "test") == (r.path.name in test_names)
    n_pool = len(patients["train"] | patients["val"])
    assert len(patients["val"]) == round(0.3 * n_pool)

    again = load_dataset("chestxray14", cxr_root, val_fraction=0.3, seed=0)
    assert _record_view(again) == _record_view(index)
    val_sets = {frozenset(r.patient for r in load_dataset("chestxray14", cxr_root, val_fraction=0.3,
                                                          seed=s).records if r.split == "val")
                for s in range(6)}
    assert len(val_sets) > 1  # the seed, not the file order, picks the validation patients


def test_cxr_prevalence_keeps_the_real_rank_order_infiltration_first_hernia_last(tmp_path):
    make_cxr(tmp_path, 800, 32, seed=0)
    counts = Counter()
    for row in _csv_rows(tmp_path / "Data_Entry_2017_v2020.csv")[1:]:
        counts.update(f for f in row[1].split("|") if f != "No Finding")
    assert set(counts) == set(FINDINGS)  # every class has positives
    ranked = [f for f, _ in counts.most_common()]
    assert ranked[0] == "Infiltration" and counts["Infiltration"] > counts[ranked[1]]
    assert ranked[-1] == "Hernia" and counts["Hernia"] < counts[ranked[-2]]
    index = load_dataset("chestxray14", tmp_path)  # the adapter's vectors give the same counts
    positives = np.sum([r.labels for r in index.records], axis=0)
    assert dict(zip(FINDINGS, positives.tolist())) == {f: counts[f] for f in FINDINGS}


# ------------------------------------------------------------------------------ FETAL_PLANES_DB
def test_us_label_file_has_the_real_header_with_trailing_space(us_root):
    path = us_root / "FETAL_PLANES_DB_data.csv"
    assert path.read_text().splitlines()[0] == US_HEADER
    header, *rows = _csv_rows(path, delimiter=";")
    assert header[-1] == "Train "
    assert rows and all(len(r) == 7 for r in rows)
    assert {r[6] for r in rows} == {"0", "1"}
    assert all("." not in r[0] for r in rows)  # Image_name has no extension


def test_us_images_exist_as_png_of_varying_sizes(us_root):
    rows = _csv_rows(us_root / "FETAL_PLANES_DB_data.csv", delimiter=";")[1:]
    sizes = set()
    for r in rows:
        path = us_root / "Images" / f"{r[0]}.png"
        assert path.is_file(), path
        with Image.open(path) as img:
            assert img.mode == "L"
            sizes.add(img.size)
    assert len(sizes) > 1
    assert len(list((us_root / "Images").iterdir())) == len(rows)


def test_us_all_six_planes_appear_and_the_adapter_gives_one_hot_labels(tmp_path):
    make_us(tmp_path, 200, 32, seed=0)
    rows = _csv_rows(tmp_path / "FETAL_PLANES_DB_data.csv", delimiter=";")[1:]
    assert {r[2] for r in rows} == set(PLANES)
    index = load_dataset("fetal_planes", tmp_path)
    assert index.rejected == [] and not index.multilabel
    assert list(index.label_names) == PLANES
    assert len(index.records) == len(rows)
    plane_of = {r[0]: r[2] for r in rows}
    train_of = {r[0]: r[6] for r in rows}
    for rec in index.records:
        assert sum(rec.labels) == 1
        assert PLANES[rec.labels.index(1)] == plane_of[rec.key]
        assert (rec.split == "test") == (train_of[rec.key] == "0")
    assert {r.split for r in index.records} == {"train", "val", "test"}


# ------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("kind", ["cxr", "us"])
def test_generation_is_byte_identical_for_the_same_seed(tmp_path, kind):
    make = make_cxr if kind == "cxr" else make_us
    make(tmp_path / "a", 30, 32, seed=5)
    make(tmp_path / "b", 30, 32, seed=5)
    make(tmp_path / "c", 30, 32, seed=6)
    a, b, c = (_tree_bytes(tmp_path / x) for x in "abc")
    assert len(a) > 30 and a == b
    assert a != c


def test_parallel_generation_matches_serial_generation(tmp_path):
    make_cxr(tmp_path / "serial", 24, 32, seed=1, workers=1)
    make_cxr(tmp_path / "parallel", 24, 32, seed=1, workers=2)
    assert _tree_bytes(tmp_path / "serial") == _tree_bytes(tmp_path / "parallel")
