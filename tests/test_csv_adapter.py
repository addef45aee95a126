"""The generic CSV adapter (`--dataset csv`): the three label forms, patients and splits given or
carved by patient, a fixed label vocabulary, and every unusable row rejected with its line and reason.

Each test writes a tiny dataset: 8x8 PNGs and a CSV table describing them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline import build_shards
from data_pipeline.adapters import load_dataset


def _png(path: Path, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


def _dataset(root: Path, rows: list[list[str]], header: list[str], delimiter: str = ",",
             name: str = "table.csv") -> Path:
    """Write the table and an image for every path in its first column (unless it says 'missing')."""
    root.mkdir(parents=True, exist_ok=True)
    for row in rows:
        if row and "missing" not in row[0]:
            path = Path(row[0]) if Path(row[0]).is_absolute() else root / row[0]
            _png(path)
    lines = [delimiter.join(header)] + [delimiter.join(r) for r in rows]
    (root / name).write_text("\n".join(lines) + "\n")
    return root


def _load(root: Path, **options):
    options.setdefault("csv_file", "table.csv")
    return load_dataset("csv", root, **options)


def _by_key(index) -> dict:
    return {r.key: r for r in index.records}


# ------------------------------------------------------------------------------ label forms
def test_several_0_1_columns_give_multilabel_vectors_in_column_order(tmp_path):
    root = _dataset(tmp_path, [["img/a.png", "1", "0", "1", "p1", "train"],
                               ["img/b.png", "0", "0", "0", "p2", "test"],
                               ["img/c.png", "0", "1", "0", "p3", "val"]],
                    ["file", "mass", "effusion", "nodule", "pid", "split"])
    index = _load(root, path_column="file", label_columns=["mass", "effusion", "nodule"],
                  patient_column="pid", split_column="split")
    assert index.name == "csv" and index.multilabel
    assert index.label_names == ("mass", "effusion", "nodule")
    recs = _by_key(index)
    assert recs["a"].labels == (1, 0, 1) and recs["b"].labels == (0, 0, 0) and recs["c"].labels == (0, 1, 0)
    assert (recs["a"].patient, recs["a"].split) == ("p1", "train")
    assert recs["b"].split == "test" and recs["c"].split == "val"
    assert recs["a"].path == root / "img/a.png"
    assert index.rejected == []


def test_a_label_column_value_other_than_0_or_1_is_rejected_naming_column_and_value(tmp_path):
    root = _dataset(tmp_path, [["a.png", "1", "0"], ["b.png", "-1", "0"], ["c.png", "", "1"]],
                    ["path", "mass", "effusion"])
    index = _load(root, label_columns=["mass", "effusion"])
    assert sorted(_by_key(index)) == ["a"]
    reasons = {r["input"]: r["reason"] for r in index.rejected}
    assert reasons["table.csv:3 (b.png)"] == "label columns must be 0 or 1, got mass='-1'"
    assert "mass=''" in reasons["table.csv:4 (c.png)"]


def test_separator_string_with_fixed_labels_keeps_their_order_and_rejects_unknown_labels(tmp_path):
    root = _dataset(tmp_path, [["a.png", "Effusion|Mass"], ["b.png", "No Finding"],
                               ["c.png", "Mass|Pneumonitis"], ["d.png", "Mass"]],
                    ["path", "findings"])
    index = _load(root, label_column="findings", label_sep="|", labels=["Mass", "Nodule", "Effusion"],
                  negative_label="No Finding")
    assert index.multilabel and index.label_names == ("Mass", "Nodule", "Effusion")
    recs = _by_key(index)
    assert recs["a"].labels == (1, 0, 1) and recs["b"].labels == (0, 0, 0) and recs["d"].labels == (1, 0, 0)
    assert len(index.rejected) == 1
    rej = index.rejected[0]
    assert rej["input"] == "table.csv:4 (c.png)"
    assert "unknown label" in rej["reason"] and "Pneumonitis" in rej["reason"]


def test_separator_string_without_labels_infers_the_sorted_vocabulary(tmp_path):
    root = _dataset(tmp_path, [["a.png", "Mass ; Effusion"], ["b.png", "Nodule"], ["c.png", "Effusion"]],
                    ["path", "findings"])
    index = _load(root, label_column="findings", label_sep=";")
    assert index.label_names == ("Effusion", "Mass", "Nodule")
    assert _by_key(index)["a"].labels == (1, 1, 0)


def test_empty_label_string_is_rejected_and_the_negative_label_must_stand_alone(tmp_path):
    root = _dataset(tmp_path, [["a.png", ""], ["b.png", "No Finding|Mass"], ["c.png", "Mass"]],
                    ["path", "findings"])
    index = _load(root, label_column="findings", label_sep="|", negative_label="No Finding")
    reasons = {r["input"]: r["reason"] for r in index.rejected}
    assert reasons["table.csv:2 (a.png)"].startswith("empty label")
    assert "combined with other labels" in reasons["table.csv:3 (b.png)"]
    assert sorted(_by_key(index)) == ["c"]


def test_single_class_column_gives_one_hot_single_label_records(tmp_path):
    root = _dataset(tmp_path, [["a.png", "Fetal brain"], ["b.png", "Other"], ["c.png", "Fetal femur"]],
                    ["path", "plane"])
    index = _load(root, label_column="plane")
    assert not index.multilabel
    assert index.label_names == ("Fetal brain", "Fetal femur", "Other")
    recs = _by_key(index)
    assert recs["a"].labels == (1, 0, 0) and recs["b"].labels == (0, 0, 1) and recs["c"].labels == (0, 1, 0)


def test_single_class_column_with_labels_fixes_order_and_rejects_unknown_class(tmp_path):
    root = _dataset(tmp_path, [["a.png", "cat"], ["b.png", "dog"], ["c.png", "bird"]], ["path", "cls"])
    index = _load(root, label_column="cls", labels=["dog", "cat"])
    assert index.label_names == ("dog", "cat")
    assert _by_key(index)["a"].labels == (0, 1)
    assert [r["input"] for r in index.rejected] == ["table.csv:4 (c.png)"]
    assert "'bird'" in index.rejected[0]["reason"]


# ------------------------------------------------------------------------------ patients and splits
def _many(root: Path, n: int, patients: int | None = None, split: list[str] | None = None) -> Path:
    header = ["path", "label"] + (["patient"] if patients else []) + (["split"] if split else [])
    rows = []
    for i in range(n):
        row = [f"img/{i:03d}.png", "yes" if i % 3 == 0 else "no"]
        if patients:
            row.append(f"P{i % patients}")
        if split:  # by patient when there are patients, so no patient straddles two splits
            row.append(split[(i % patients if patients else i) % len(split)])
        rows.append(row)
    return _dataset(root, rows, header)


def test_without_patient_or_split_columns_each_image_is_a_patient_and_splits_are_carved(tmp_path):
    root = _many(tmp_path, 100)
    index = _load(root, label_column="label", val_fraction=0.2, test_fraction=0.1, seed=3)
    assert all(r.patient == r.key for r in index.records)
    counts = {s: sum(r.split == s for r in index.records) for s in ("train", "val", "test")}
    assert counts == {"test": 10, "val": 18, "train": 72}  # val: 20 % of the 90 non-test patients
    again = _load(root, label_column="label", val_fraction=0.2, test_fraction=0.1, seed=3)
    assert [(r.key, r.split) for r in again.records] == [(r.key, r.split) for r in index.records]
    other = _load(root, label_column="label", val_fraction=0.2, test_fraction=0.1, seed=4)
    assert {r.key for r in other.records if r.split == "test"} != \
        {r.key for r in index.records if r.split == "test"}


def test_carved_splits_keep_every_patient_in_one_split(tmp_path):
    root = _many(tmp_path, 120, patients=30)
    index = _load(root, label_column="label", patient_column="patient", val_fraction=0.25,
                  test_fraction=0.2, seed=0)
    splits_of = {}
    for r in index.records:
        splits_of.setdefault(r.patient, set()).add(r.split)
    assert all(len(s) == 1 for s in splits_of.values())
    per_split = {s: sum(split == {s} for split in splits_of.values()) for s in ("train", "val", "test")}
    assert per_split == {"test": 6, "val": 6, "train": 18}
    assert len(index.records) == 120 and index.rejected == []


def test_split_column_values_are_used_and_a_bad_value_is_rejected(tmp_path):
    root = _dataset(tmp_path, [["a.png", "x", "TRAIN"], ["b.png", "x", "Valid"], ["c.png", "y", "test"],
                               ["d.png", "y", "holdout"]], ["path", "label", "split"])
    index = _load(root, label_column="label", split_column="split")
    assert {r.key: r.split for r in index.records} == {"a": "train", "b": "val", "c": "test"}
    assert index.rejected == [{"input": "table.csv:5 (d.png)",
                               "reason": "split must be train, val or test, got 'holdout'"}]


def test_split_column_without_val_rows_gets_val_carved_from_train_by_patient(tmp_path):
    root = _many(tmp_path, 60, patients=20, split=["train", "train", "test"])
    index = _load(root, label_column="label", patient_column="patient", split_column="split",
                  val_fraction=0.5)
    by_split = {s: {r.patient for r in index.records if r.split == s} for s in ("train", "val", "test")}
    assert by_split["test"] == {f"P{p}" for p in range(20) if p % 3 == 2}  # as the column says
    assert len(by_split["val"]) == 7 and len(by_split["train"]) == 7  # half of the 14 train patients
    assert not by_split["val"] & by_split["train"] and index.rejected == []


def test_patient_in_two_given_splits_has_every_row_rejected(tmp_path):
    root = _dataset(tmp_path, [["a.png", "x", "P1", "train"], ["b.png", "x", "P1", "test"],
                               ["c.png", "y", "P2", "train"]], ["path", "label", "patient", "split"])
    index = _load(root, label_column="label", patient_column="patient", split_column="split")
    assert [r.key for r in index.records] == ["c"]
    assert len(index.rejected) == 2
    assert all("patient P1" in r["reason"] and "patient-disjoint" in r["reason"] for r in index.rejected)


def test_empty_patient_cell_is_rejected(tmp_path):
    root = _dataset(tmp_path, [["a.png", "x", ""], ["b.png", "x", "P2"]], ["path", "label", "patient"])
    index = _load(root, label_column="label", patient_column="patient")
    assert [r["input"] for r in index.rejected] == ["table.csv:2 (a.png)"]
    assert "patient" in index.rejected[0]["reason"]


# ------------------------------------------------------------------------------ keys and paths
def test_two_paths_with_the_same_stem_reject_the_later_row_as_a_duplicate_key(tmp_path):
    root = _dataset(tmp_path, [["site1/scan.png", "x"], ["site2/scan.png", "y"], ["site2/other.png", "x"],
                               ["site1/scan.png", "x"]], ["path", "label"])
    index = _load(root, label_column="label")
    assert sorted(r.path.relative_to(root).as_posix() for r in index.records) == \
        ["site1/scan.png", "site2/other.png"]
    reasons = {r["input"]: r["reason"] for r in index.rejected}
    assert set(reasons) == {"table.csv:3 (site2/scan.png)", "table.csv:5 (site1/scan.png)"}
    assert "duplicate sample key 'scan'" in reasons["table.csv:3 (site2/scan.png)"]
    assert "line 2" in reasons["table.csv:3 (site2/scan.png)"]
    assert "duplicate image path" in reasons["table.csv:5 (site1/scan.png)"]


def test_absolute_paths_dotted_names_and_missing_images(tmp_path):
    elsewhere = tmp_path / "elsewhere" / "study 1.v2.png"
    root = _dataset(tmp_path / "root", [[str(elsewhere), "x"], ["missing.png", "y"], ["b.png", "y"]],
                    ["path", "label"])
    index = _load(root, label_column="label")
    recs = _by_key(index)
    assert set(recs) == {"study_1_v2", "b"}  # no dots or spaces in keys
    assert recs["study_1_v2"].path == elsewhere
    assert index.rejected == [{"input": "table.csv:3 (missing.png)",
                               "reason": f"image file not found: {root / 'missing.png'}"}]


def test_malformed_row_is_rejected_and_trailing_delimiters_and_bom_are_tolerated(tmp_path):
    root = tmp_path
    _png(root / "a.png")
    _png(root / "b.png")
    (root / "table.csv").write_text("\ufeffpath;label;\na.png;x;\nb.png;y;extra;more\n", encoding="utf-8")
    index = _load(root, label_column="label", delimiter=";")
    assert [r.key for r in index.records] == ["a"]
    assert index.rejected == [{"input": "table.csv:3",
                               "reason": "malformed row: 4 fields, expected 2"}]


def test_tab_delimited_table_via_the_cli_flag(tmp_path):
    root = _dataset(tmp_path / "root", [["a.png", "x"], ["b.png", "y"]], ["path", "label"], delimiter="\t")
    args = build_shards.parse_args(["--dataset", "csv", "--root", str(root), "--out", str(tmp_path / "o"),
                                    "--csv", "table.csv", "--label-column", "label", "--delimiter", "tab"])
    assert args.delimiter == "\t"
    index = load_dataset("csv", root, **build_shards.adapter_options(args))
    assert sorted(_by_key(index)) == ["a", "b"]


# ------------------------------------------------------------------------------ option errors
def test_missing_column_names_the_column_and_the_file(tmp_path):
    root = _dataset(tmp_path, [["a.png", "x"]], ["path", "label"])
    with pytest.raises(ValueError, match="'diagnosis'") as e:
        _load(root, label_column="diagnosis")
    assert str(root / "table.csv") in str(e.value)


def test_csv_file_not_found_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        _load(tmp_path, csv_file="nope.csv", label_column="x")


@pytest.mark.parametrize("options", [dict(), dict(label_columns=["a"], label_column="b"),
                                     dict(label_columns=["a"], labels=["a"]),
                                     dict(label_column="b", negative_label="none"),
                                     dict(label_column="b", labels=["x", "x"])])
def test_contradictory_label_options_raise(tmp_path, options):
    _dataset(tmp_path, [["a.png", "1", "x"]], ["path", "a", "b"])
    with pytest.raises(ValueError, match="csv dataset"):
        _load(tmp_path, **options)


def test_cli_refuses_csv_flags_for_other_datasets_and_csv_without_table(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_shards.parse_args(["--dataset", "chestxray14", "--root", "r", "--out", "o", "--labels", "a,b"])
    assert "only apply to --dataset csv" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_shards.parse_args(["--dataset", "csv", "--root", "r", "--out", "o", "--label-column", "x"])
    assert "--csv" in capsys.readouterr().err


# ------------------------------------------------------------------------------ through the builder
def test_build_shards_over_a_csv_dataset_writes_its_labels_and_options_to_the_manifest(tmp_path):
    root = _many(tmp_path / "root", 30, patients=10)
    out = tmp_path / "shards"
    build_shards.main(["--dataset", "csv", "--root", str(root), "--out", str(out), "--csv", "table.csv",
                       "--label-column", "label", "--labels", "no,yes", "--patient-column", "patient",
                       "--size", "16", "--shard-size", "8", "--workers", "1", "--quiet",
                       "--val-fraction", "0.3", "--test-fraction", "0.2", "--verify"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "csv" and manifest["label_names"] == ["no", "yes"]
    assert manifest["multilabel"] is False
    assert manifest["dataset_options"]["labels"] == ["no", "yes"]
    assert manifest["dataset_options"]["patient_column"] == "patient"
    splits = manifest["splits"]
    assert sum(s["samples"] for s in splits.values()) == 30
    assert sum(s["patients"] for s in splits.values()) == 10
    assert splits["test"]["patients"] == 2 and splits["val"]["patients"] == 2
    assert sum(s["positives"]["yes"] for s in splits.values()) == 10


# ------------------------------------------------------------------------------ small data
def test_a_split_without_positives_or_negatives_of_a_class_is_warned_about_at_build_time(tmp_path, capsys):
    """16 images, splits given: val holds no 'b' positive and only 'a' positives, so neither class
    can be scored (nor a threshold chosen) there; test is fine."""
    rows = [[f"i{k}.png", "1", str(k % 2), "train", f"p{k}"] for k in range(8)]
    rows += [[f"v{k}.png", "1", "0", "val", f"q{k}"] for k in range(4)]
    rows += [[f"t{k}.png", str(k % 2), str(1 - k % 2), "test", f"r{k}"] for k in range(4)]
    root = _dataset(tmp_path / "root", rows, ["path", "a", "b", "split", "patient"])
    build_shards.main(["--dataset", "csv", "--root", str(root), "--out", str(tmp_path / "out"), "--csv",
                       "table.csv", "--label-columns", "a,b", "--split-column", "split", "--patient-column",
                       "patient", "--size", "16", "--workers", "1", "--quiet"])
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning: ")]
    assert err == ["warning: split 'train' (8 samples) has no negative of a: AUROC (and a threshold chosen "
                   "there) is undefined for these classes",
                   "warning: split 'val' (4 samples) has no positive of b and no negative of a: AUROC (and a "
                   "threshold chosen there) is undefined for these classes"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]["val"]["samples"] == 4


def test_a_single_label_split_with_one_class_only_is_warned_about():
    from data_pipeline.manifest import split_warnings
    manifest = {"multilabel": False, "splits": {
        "val": {"samples": 5, "positives": {"x": 5, "y": 0, "z": 0}},
        "test": {"samples": 6, "positives": {"x": 2, "y": 2, "z": 2}}}}
    assert split_warnings(manifest) == ["split 'val' (5 samples) has no sample of y, z and a single class only: "
                                        "AUROC (and a threshold chosen there) is undefined for these classes"]
    assert split_warnings(manifest, ("test",)) == []
