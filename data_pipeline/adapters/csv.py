"""Generic adapter: any dataset described by one CSV table.

    python -m data_pipeline.build_shards --dataset csv --root data/mine --out shards/mine \
        --csv labels.csv --path-column file --label-columns effusion,mass,nodule --patient-column pid

One row per image. Columns (names from the header; surrounding spaces in names are ignored):

* `path_column`: the image file, relative to `root` or absolute (PNG, JPEG, TIFF, DICOM, ...).
  The sample key is `sample_key(stem)`; two different paths with the same key would collide in
  the shards, so the later row is rejected as a duplicate (as is a repeated path).
* labels, one of three forms:
  - `label_columns=[a, b, c]`: one 0/1 column per class -> multi-label, classes in that order;
  - `label_column=X, label_sep="|"`: `Effusion|Mass` -> multi-label; `negative_label` (e.g.
    `No Finding`) marks a row with no positive class;
  - `label_column=X` alone: a class name per row -> single-label (one-hot).
  For the last two, `labels` fixes the vocabulary and its order (a row naming any other label is
  rejected with the label in the reason); without it the vocabulary is the sorted set of names in
  the rows that pass the row checks, so pass `labels` when two builds must agree on the class order.
* `patient_column` (optional): rows of one patient never straddle splits; without it every image
  is its own patient.
* `split_column` (optional): `train`, `val` (or `valid`/`validation`) or `test`, any case. Without
  it, `test_fraction` of the patients go to test and `val_fraction` of the rest to val, both by
  patient with `seed`; with it but no `val` row, val is carved from train the same way.

A row that cannot be used (wrong field count, empty or unknown label, missing image, duplicate
key, bad split value, patient in two splits) goes to `rejected` with its line and path.
"""
from __future__ import annotations

import csv as _csv
from pathlib import Path

from data_pipeline.adapters.common import (DatasetIndex, Record, carve_validation,
                                           check_patient_disjoint, sample_key)

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
BINARY = {"0": 0, "1": 1, "0.0": 0, "1.0": 1}


def resolve_csv(root: Path, csv_file) -> Path:
    """The table as given (absolute, or relative to the working directory), else under `root`."""
    path = Path(csv_file)
    if path.is_file():
        return path
    if not path.is_absolute() and (root / path).is_file():
        return root / path
    raise FileNotFoundError(f"{csv_file}: CSV file not found (looked as given and under {root})")


def _check_options(label_columns, label_column, label_sep, labels, negative_label) -> None:
    if bool(label_columns) == bool(label_column):
        raise ValueError("csv dataset: give exactly one of --label-columns (0/1 columns) or "
                         "--label-column (class names)")
    if label_columns and (labels or label_sep or negative_label):
        raise ValueError("csv dataset: with --label-columns the columns are the labels; "
                         "--labels, --label-sep and --negative-label go with --label-column")
    if negative_label and not label_sep:
        raise ValueError("csv dataset: --negative-label needs --label-sep (multi-label strings)")
    names = list(label_columns or labels or [])
    if len(set(names)) != len(names):
        raise ValueError(f"csv dataset: label names repeat in {names}")


def _header(reader, label_file: Path, needed: list[str]) -> tuple[list[str], dict[str, int]]:
    header = [h.strip() for h in next(reader, [])]
    if header and header[-1] == "":
        header = header[:-1]  # a trailing delimiter on every line
    missing = [c for c in needed if c not in header]
    if missing:
        raise ValueError(f"{label_file}: header lacks column(s) {missing} (header {header!r}); "
                         f"check the column flags and --delimiter")
    return header, {c: header.index(c) for c in needed}


def _parse_labels(cell: str, label_sep, vocabulary, negative_label) -> tuple[str, ...]:
    """Class names of one row; raises ValueError with the reason for the reject."""
    if label_sep:
        names = [t.strip() for t in cell.split(label_sep) if t.strip()]
        if negative_label and negative_label in names:
            if names != [negative_label]:
                raise ValueError(f"{negative_label!r} combined with other labels in {cell!r}")
            return ()
    else:
        names = [cell.strip()] if cell.strip() else []
    if not names:
        raise ValueError("empty label" + (" (use --negative-label for rows with no positive class)"
                                          if label_sep else ""))
    unknown = [n for n in names if vocabulary is not None and n not in vocabulary]
    if unknown:
        raise ValueError(f"unknown label(s) {unknown!r}; --labels allows {list(vocabulary)}")
    return tuple(dict.fromkeys(names))


def load(root: Path, *, csv_file, path_column: str = "path", label_columns=None,
         label_column: str | None = None, label_sep: str | None = None,
         patient_column: str | None = None, split_column: str | None = None, labels=None,
         negative_label: str | None = None, delimiter: str = ",", val_fraction: float = 0.1,
         test_fraction: float = 0.1, seed: int = 0) -> DatasetIndex:
    _check_options(label_columns, label_column, label_sep, labels, negative_label)
    label_file = resolve_csv(root, csv_file)
    vocabulary = tuple(label_columns or labels or ()) or None
    multilabel = bool(label_columns or label_sep)
    needed = [path_column] + list(label_columns or [label_column])
    needed += [c for c in (patient_column, split_column) if c]
    rows, index = [], DatasetIndex("csv", (), multilabel)
    by_path: dict[Path, int] = {}
    by_key: dict[str, tuple[int, Path]] = {}
    with label_file.open(newline="", encoding="utf-8-sig") as f:  # -sig: Excel writes a BOM
        reader = _csv.reader(f, delimiter=delimiter)
        header, col = _header(reader, label_file, needed)
        for line_no, row in enumerate(reader, start=2):
            if row and row[-1] == "" and len(row) == len(header) + 1:
                row = row[:-1]
            if not row or not any(c.strip() for c in row):
                continue
            cell = row[col[path_column]].strip() if len(row) == len(header) else ""
            where = f"{label_file.name}:{line_no}" + (f" ({cell})" if cell else "")
            if len(row) != len(header):
                index.reject(where, f"malformed row: {len(row)} fields, expected {len(header)}")
                continue
            if not cell:
                index.reject(where, f"empty {path_column!r} cell")
                continue
            try:
                if label_columns:
                    values = [row[col[c]].strip() for c in label_columns]
                    bad = [(c, v) for c, v in zip(label_columns, values) if v not in BINARY]
                    if bad:
                        raise ValueError("label columns must be 0 or 1, got "
                                         + ", ".join(f"{c}={v!r}" for c, v in bad))
                    names = tuple(c for c, v in zip(label_columns, values) if BINARY[v])
                else:
                    names = _parse_labels(row[col[label_column]], label_sep, vocabulary,
                                          negative_label)
            except ValueError as e:
                index.reject(where, str(e))
                continue
            split = None
            if split_column:
                split = SPLIT_NAMES.get(row[col[split_column]].strip().lower())
                if split is None:
                    index.reject(where, f"split must be train, val or test, "
                                        f"got {row[col[split_column]]!r}")
                    continue
            path = Path(cell) if Path(cell).is_absolute() else root / cell
            key = sample_key(Path(cell).stem)
            if path in by_path:
                index.reject(where, f"duplicate image path (first on line {by_path[path]})")
                continue
            if key in by_key:
                first_line, first_path = by_key[key]
                index.reject(where, f"duplicate sample key {key!r}: line {first_line} ({first_path}) "
                                    f"has the same file stem; keys must be unique")
                continue
            if not path.is_file():
                index.reject(where, f"image file not found: {path}")
                continue
            patient = row[col[patient_column]].strip() if patient_column else key
            if not patient:
                index.reject(where, f"empty {patient_column!r} cell")
                continue
            by_path[path], by_key[key] = line_no, (line_no, path)
            rows.append((key, path, names, patient, split))
    index.label_names = vocabulary or tuple(sorted({n for _, _, names, _, _ in rows for n in names}))
    _assign_splits(rows, split_column, val_fraction, test_fraction, seed)
    for key, path, names, patient, split in rows:
        labels_vec = tuple(int(n in names) for n in index.label_names)
        index.records.append(Record(key, path, labels_vec, patient, split))
    check_patient_disjoint(index)
    return index


def _assign_splits(rows: list, split_column, val_fraction: float, test_fraction: float,
                   seed: int) -> None:
    """Fill in the split of every row in place: carve test then val by patient where not given."""
    if not split_column:
        test = carve_validation([r[3] for r in rows], test_fraction, seed)
        for i, r in enumerate(rows):
            rows[i] = (*r[:4], "test" if r[3] in test else "train")
    if not any(r[4] == "val" for r in rows):
        val = carve_validation([r[3] for r in rows if r[4] == "train"], val_fraction, seed)
        for i, r in enumerate(rows):
            if r[4] == "train" and r[3] in val:
                rows[i] = (*r[:4], "val")
