"""Bad inputs a user's copy of a dataset can contain: every unusable record lands in
`DatasetIndex.rejected` with a reason naming the row or file (never dropped silently, never a
traceback), and a missing dataset raises one FileNotFoundError naming the path.

Each test writes a small synthetic dataset in the real layout and damages one thing in it.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from data_pipeline import build_shards
from data_pipeline.adapters import load_dataset
from data_pipeline.synthetic import make_cxr, make_us

CXR_LABELS = "Data_Entry_2017_v2020.csv"
US_LABELS = "FETAL_PLANES_DB_data.csv"
N = 30


@pytest.fixture
def cxr(tmp_path) -> Path:
    root = tmp_path / "cxr"
    make_cxr(root, N, 32, seed=11)
    return root


@pytest.fixture
def us(tmp_path) -> Path:
    root = tmp_path / "us"
    make_us(root, N, 32, seed=11)
    return root


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def _only_reject(index) -> dict:
    assert len(index.rejected) == 1, index.rejected
    return index.rejected[0]


# ------------------------------------------------------------------------------ ChestX-ray14
@pytest.mark.parametrize("change", ["drop_field", "extra_field"])
def test_cxr_row_with_wrong_field_count_is_rejected_naming_its_line(cxr, change):
    lines = _lines(cxr / CXR_LABELS)
    fields = lines[3].split(",")  # file line 4 = the third data row
    name = fields[0]
    lines[3] = ",".join(fields[:-1] if change == "drop_field" else fields + ["extra"])
    _write_lines(cxr / CXR_LABELS, lines)

    index = load_dataset("chestxray14", cxr)
    rej = _only_reject(index)
    assert rej["input"] == f"{CXR_LABELS}:4"
    assert "malformed row" in rej["reason"]
    assert ("10 fields" if change == "drop_field" else "12 fields") in rej["reason"]
    assert len(index.records) == N - 1 and name.removesuffix(".png") not in {r.key for r in index.records}


def test_cxr_unknown_finding_label_is_rejected_naming_line_image_and_label(cxr):
    lines = _lines(cxr / CXR_LABELS)
    fields = lines[5].split(",")
    fields[1] = "Effusion|Pneumonitis"
    lines[5] = ",".join(fields)
    _write_lines(cxr / CXR_LABELS, lines)

    rej = _only_reject(load_dataset("chestxray14", cxr))
    assert f"{CXR_LABELS}:6" in rej["input"] and fields[0] in rej["input"]
    assert "Pneumonitis" in rej["reason"]


def test_cxr_duplicate_image_name_is_rejected_and_the_first_row_kept(cxr):
    lines = _lines(cxr / CXR_LABELS)
    name = lines[2].split(",")[0]
    _write_lines(cxr / CXR_LABELS, lines + [lines[2]])

    index = load_dataset("chestxray14", cxr)
    rej = _only_reject(index)
    assert f"{CXR_LABELS}:{len(lines) + 1}" in rej["input"] and name in rej["input"]
    assert "duplicate" in rej["reason"]
    assert len(index.records) == N
    assert [r.path.name for r in index.records].count(name) == 1


def test_cxr_missing_image_file_is_rejected_naming_the_image(cxr):
    name = _lines(cxr / CXR_LABELS)[7].split(",")[0]
    (cxr / "images" / name).unlink()

    index = load_dataset("chestxray14", cxr)
    rej = _only_reject(index)
    assert name in rej["input"] and f"{CXR_LABELS}:8" in rej["input"]
    assert "not found" in rej["reason"]
    assert len(index.records) == N - 1


def test_cxr_image_in_neither_split_list_is_rejected_naming_the_image(cxr):
    train_val = _lines(cxr / "train_val_list.txt")
    name = train_val.pop(0)
    _write_lines(cxr / "train_val_list.txt", train_val)

    index = load_dataset("chestxray14", cxr)
    rej = _only_reject(index)
    assert name in rej["input"]
    assert "train_val_list.txt" in rej["reason"] and "test_list.txt" in rej["reason"]
    assert len(index.records) == N - 1


def test_cxr_patient_in_two_splits_has_every_image_rejected_naming_the_patient(cxr):
    train_val, test = _lines(cxr / "train_val_list.txt"), _lines(cxr / "test_list.txt")
    by_patient = defaultdict(list)
    for name in train_val:
        by_patient[name.split("_")[0]].append(name)
    prefix, names = next((p, n) for p, n in by_patient.items() if len(n) >= 2)
    moved = names[0]
    _write_lines(cxr / "train_val_list.txt", [n for n in train_val if n != moved])
    _write_lines(cxr / "test_list.txt", test + [moved])
    patient = str(int(prefix))  # the Patient ID column, as the adapter reads it

    index = load_dataset("chestxray14", cxr)
    assert sorted(Path(r["input"]).name for r in index.rejected) == sorted(names)
    for rej in index.rejected:
        assert f"patient {patient} " in rej["reason"] and "patient-disjoint" in rej["reason"]
    assert patient not in {r.patient for r in index.records}
    assert len(index.records) == N - len(names)


def test_cxr_missing_label_file_raises_file_not_found_naming_the_root(cxr):
    (cxr / CXR_LABELS).unlink()
    with pytest.raises(FileNotFoundError, match="Data_Entry_2017") as e:
        load_dataset("chestxray14", cxr)
    assert str(cxr) in str(e.value)


def test_cxr_missing_split_list_raises_file_not_found_naming_it(cxr):
    (cxr / "test_list.txt").unlink()
    with pytest.raises(FileNotFoundError, match="test_list.txt") as e:
        load_dataset("chestxray14", cxr)
    assert str(cxr / "test_list.txt") in str(e.value)


@pytest.mark.parametrize("dataset", ["chestxray14", "fetal_planes"])
@pytest.mark.parametrize("kind", ["missing", "a_file"])
def test_root_that_is_not_a_directory_raises_file_not_found_naming_it(tmp_path, dataset, kind):
    root = tmp_path / "no_such_dataset"
    if kind == "a_file":
        root.write_text("not a directory")
    with pytest.raises(FileNotFoundError) as e:
        load_dataset(dataset, root)
    assert str(root) in str(e.value)


def test_build_shards_cli_reports_a_missing_root_as_one_error_line_naming_it(tmp_path):
    root = tmp_path / "nowhere"
    with pytest.raises(SystemExit) as e:
        build_shards.main(["--dataset", "chestxray14", "--root", str(root), "--out",
                           str(tmp_path / "out"), "--workers", "1", "--quiet"])
    assert str(e.value.code).startswith("error:") and str(root) in str(e.value.code)
    assert not list((tmp_path).glob("out/*.tar"))


def test_adapter_rejects_reach_the_manifest_with_their_reasons(cxr, tmp_path):
    lines = _lines(cxr / CXR_LABELS)
    lines[3] = ",".join(lines[3].split(",")[:-1])
    _write_lines(cxr / CXR_LABELS, lines)
    out = tmp_path / "shards"
    build_shards.main(["--dataset", "chestxray14", "--root", str(cxr), "--out", str(out), "--size", "32",
                       "--workers", "1", "--quiet", "--max-reject-fraction", "0.2"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rejected"] == [{"input": f"{CXR_LABELS}:4",
                                     "reason": "malformed row: 10 fields, expected 11"}]
    assert manifest["summary"]["rejected"] == 1 and manifest["summary"]["accepted"] == N - 1


# ------------------------------------------------------------------------------ FETAL_PLANES_DB
def _edit_us_row(root: Path, line_no: int, **changes) -> list[str]:
    """Change columns of one data row (file line `line_no`, 1-based); returns the new fields."""
    cols = ["Image_name", "Patient_num", "Plane", "Brain_plane", "Operator", "US_Machine", "Train"]
    lines = _lines(root / US_LABELS)
    fields = lines[line_no - 1].split(";")
    for col, value in changes.items():
        fields[cols.index(col)] = value
    lines[line_no - 1] = ";".join(fields)
    _write_lines(root / US_LABELS, lines)
    return fields


def test_us_row_with_too_few_fields_is_rejected_naming_its_line(us):
    lines = _lines(us / US_LABELS)
    lines[4] = ";".join(lines[4].split(";")[:5])
    _write_lines(us / US_LABELS, lines)

    index = load_dataset("fetal_planes", us)
    rej = _only_reject(index)
    assert rej["input"] == f"{US_LABELS}:5"
    assert "malformed row" in rej["reason"] and "5 fields" in rej["reason"]
    assert len(index.records) == N - 1


def test_us_unknown_plane_is_rejected_naming_line_image_and_plane(us):
    fields = _edit_us_row(us, 3, Plane="Fetal heart")
    rej = _only_reject(load_dataset("fetal_planes", us))
    assert f"{US_LABELS}:3" in rej["input"] and fields[0] in rej["input"]
    assert "Fetal heart" in rej["reason"]


def test_us_train_flag_other_than_0_or_1_is_rejected(us):
    fields = _edit_us_row(us, 6, Train="yes")
    rej = _only_reject(load_dataset("fetal_planes", us))
    assert fields[0] in rej["input"] and "'yes'" in rej["reason"]


def test_us_duplicate_image_name_is_rejected(us):
    lines = _lines(us / US_LABELS)
    _write_lines(us / US_LABELS, lines + [lines[1]])
    index = load_dataset("fetal_planes", us)
    rej = _only_reject(index)
    assert f"{US_LABELS}:{len(lines) + 1}" in rej["input"] and lines[1].split(";")[0] in rej["input"]
    assert "duplicate" in rej["reason"]
    assert len(index.records) == N


def test_us_missing_image_file_is_rejected_naming_the_file(us):
    name = _lines(us / US_LABELS)[2].split(";")[0]
    (us / "Images" / f"{name}.png").unlink()
    index = load_dataset("fetal_planes", us)
    rej = _only_reject(index)
    assert name in rej["input"] and f"Images/{name}.png" in rej["reason"]
    assert len(index.records) == N - 1


def test_us_patient_in_train_and_test_has_every_image_rejected(us):
    lines = _lines(us / US_LABELS)
    patient = lines[1].split(";")[1]
    rows_of_patient = [i + 1 for i, line in enumerate(lines) if i and line.split(";")[1] == patient]
    assert len(rows_of_patient) >= 2
    flipped = "0" if lines[1].split(";")[6] == "1" else "1"
    _edit_us_row(us, rows_of_patient[0], Train=flipped)

    index = load_dataset("fetal_planes", us)
    assert len(index.rejected) == len(rows_of_patient)
    for rej in index.rejected:
        assert f"patient {patient} " in rej["reason"] and "patient-disjoint" in rej["reason"]
        assert Path(rej["input"]).is_file()
    assert patient not in {r.patient for r in index.records}


def test_us_missing_label_file_raises_file_not_found_naming_it(us):
    (us / US_LABELS).unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("fetal_planes", us)
    assert str(us / US_LABELS) in str(e.value)
