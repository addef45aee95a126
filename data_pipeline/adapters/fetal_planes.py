"""FETAL_PLANES_DB (Burgos-Artizzu et al., Sci. Rep. 2020) adapter.

Layout handled (see docs/design.md, "Datasets"): `FETAL_PLANES_DB_data.csv`, `;`-separated, header
`Image_name;Patient_num;Plane;Brain_plane;Operator;US_Machine;Train ` (the trailing space after `Train`
is in the real file); `Image_name` has no extension, images are `Images/<Image_name>.png`; 6 planes,
single-label; `Train` is 1 for the official train split, 0 for test. Validation is carved from the
train patients by patient with a seed.
"""
from __future__ import annotations

import csv
from pathlib import Path

from data_pipeline.adapters.common import (DatasetIndex, Record, carve_validation,
                                           check_patient_disjoint, sample_key)
from data_pipeline.labels import FETAL_PLANES

LABEL_FILE = "FETAL_PLANES_DB_data.csv"


def load(root: Path, *, val_fraction: float = 0.1, seed: int = 0) -> DatasetIndex:
    index = DatasetIndex("fetal_planes", FETAL_PLANES, multilabel=False)
    label_file = root / LABEL_FILE
    if not label_file.is_file():
        raise FileNotFoundError(f"{label_file}: FETAL_PLANES_DB label file missing")
    rows, seen = [], set()
    with label_file.open(newline="") as f:
        reader = csv.reader(f, delimiter=";")
        header = [h.strip() for h in next(reader, [])]  # 'Train ' -> 'Train'
        need = ["Image_name", "Patient_num", "Plane", "Train"]
        missing = [h for h in need if h not in header]
        if missing:
            raise ValueError(f"{label_file}: header lacks column(s) {missing} (header {header!r})")
        col = {h: header.index(h) for h in need}
        for line_no, row in enumerate(reader, start=2):
            where = f"{LABEL_FILE}:{line_no}"
            if not row:
                continue
            if len(row) < len(header):
                index.reject(where, f"malformed row: {len(row)} fields, expected {len(header)}")
                continue
            name, patient = row[col["Image_name"]].strip(), row[col["Patient_num"]].strip()
            plane, train = row[col["Plane"]].strip(), row[col["Train"]].strip()
            if plane not in FETAL_PLANES:
                index.reject(f"{where} ({name})", f"unknown plane {plane!r}")
                continue
            if train not in ("0", "1"):
                index.reject(f"{where} ({name})", f"Train must be 0 or 1, got {train!r}")
                continue
            if name in seen:
                index.reject(f"{where} ({name})", "duplicate image name")
                continue
            seen.add(name)
            path = root / "Images" / f"{name}.png"
            if not path.is_file():
                index.reject(f"{where} ({name})", f"image file not found: Images/{name}.png")
                continue
            one_hot = tuple(int(p == plane) for p in FETAL_PLANES)
            rows.append((name, path, one_hot, patient, "train" if train == "1" else "test"))
    val_patients = carve_validation([p for *_, p, s in rows if s == "train"], val_fraction, seed)
    for name, path, labels, patient, split in rows:
        if split == "train" and patient in val_patients:
            split = "val"
        index.records.append(Record(sample_key(name), path, labels, patient, split))
    check_patient_disjoint(index)
    return index
