"""ChestX-ray14 (NIH, Wang et al. 2017) adapter.

Layout handled (see docs/design.md, "Datasets"):
* labels in `Data_Entry_2017_v2020.csv` or `Data_Entry_2017.csv`; the header's bracketed names contain
  commas, so data rows have 11 fields; some copies end every line with a trailing comma (12 fields);
* images in `images/` or in the per-archive folders `images_001/images/` ... `images_012/images/`;
* the official patient-wise split `train_val_list.txt` / `test_list.txt`; validation is carved from
  train_val by patient (never by image) with a seed.
"""
from __future__ import annotations

import csv
from pathlib import Path

from data_pipeline.adapters.common import (DatasetIndex, Record, carve_validation,
                                           check_patient_disjoint, sample_key)
from data_pipeline.labels import CXR14_FINDINGS, CXR14_NO_FINDING

LABEL_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
N_FIELDS = 11


def find_label_file(root: Path) -> Path:
    for name in LABEL_FILES:
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"{root}: no ChestX-ray14 label file (looked for {', '.join(LABEL_FILES)})")


def image_locations(root: Path) -> dict[str, Path]:
    """Map image file name -> path over `images/` and `images_NNN/images/`."""
    found: dict[str, Path] = {}
    folders = [root / "images"] + sorted(root.glob("images_[0-9][0-9][0-9]/images"))
    for folder in folders:
        if folder.is_dir():
            for path in folder.iterdir():
                found.setdefault(path.name, path)
    return found


def parse_labels(text: str) -> tuple[int, ...]:
    """'Effusion|Mass' -> 14-long multi-hot in canonical order; 'No Finding' -> all zeros."""
    names = [t.strip() for t in text.split("|") if t.strip()]
    if names == [CXR14_NO_FINDING]:
        return (0,) * len(CXR14_FINDINGS)
    unknown = [n for n in names if n not in CXR14_FINDINGS]
    if unknown or not names:
        raise ValueError(f"unknown finding label(s) {unknown or [text]!r}")
    return tuple(int(f in names) for f in CXR14_FINDINGS)


def _read_list(path: Path) -> set[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: official split file missing")
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def load(root: Path, *, val_fraction: float = 0.1, seed: int = 0) -> DatasetIndex:
    index = DatasetIndex("chestxray14", CXR14_FINDINGS, multilabel=True)
    label_file = find_label_file(root)
    train_val, test = _read_list(root / "train_val_list.txt"), _read_list(root / "test_list.txt")
    images = image_locations(root)
    seen: set[str] = set()
    rows = []
    with label_file.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or header[:2] != ["Image Index", "Finding Labels"]:
            raise ValueError(f"{label_file}: not a ChestX-ray14 label file (header {header!r})")
        for line_no, row in enumerate(reader, start=2):
            where = f"{label_file.name}:{line_no}"
            if row and row[-1] == "" and len(row) == N_FIELDS + 1:
                row = row[:-1]  # trailing comma
            if not row:
                continue
            if len(row) != N_FIELDS:
                index.reject(where, f"malformed row: {len(row)} fields, expected {N_FIELDS}")
                continue
            name, findings, patient = row[0].strip(), row[1], row[3].strip()
            try:
                labels = parse_labels(findings)
            except ValueError as e:
                index.reject(f"{where} ({name})", str(e))
                continue
            if name in seen:
                index.reject(f"{where} ({name})", "duplicate image name")
                continue
            seen.add(name)
            if name not in images:
                index.reject(f"{where} ({name})", "image file not found under images/ or images_NNN/images/")
                continue
            if name in test:
                split = "test"
            elif name in train_val:
                split = "train"
            else:
                index.reject(f"{where} ({name})", "image in neither train_val_list.txt nor test_list.txt")
                continue
            rows.append((name, labels, patient or name.split("_")[0], split))
    val_patients = carve_validation([p for _, _, p, s in rows if s == "train"], val_fraction, seed)
    for name, labels, patient, split in rows:
        if split == "train" and patient in val_patients:
            split = "val"
        index.records.append(Record(sample_key(Path(name).stem), images[name], labels, patient, split))
    check_patient_disjoint(index)
    return index
