"""What every dataset adapter shares: the record and index types, split names, sample keys, the
validation carve-out and the patient-disjointness check (data_pipeline/adapters/__init__.py
dispatches to the adapters and re-exports these names)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    """One labelled image. `key` is the WebDataset sample key (no dots: see docs/design.md, "Library behaviour the code relies on")."""
    key: str
    path: Path
    labels: tuple[int, ...]  # multi-hot (multi-label) or one-hot (single-label), len = classes
    patient: str
    split: str


@dataclass
class DatasetIndex:
    name: str
    label_names: tuple[str, ...]
    multilabel: bool
    records: list[Record] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)

    def reject(self, item: str, reason: str) -> None:
        self.rejected.append({"input": str(item), "reason": reason})


def sample_key(stem: str) -> str:
    """A WebDataset/DALI-safe key from a file stem: both split member names at the first dot of the
    basename, so a dot inside a key would silently cut it; dots and spaces become '_'."""
    return stem.replace(".", "_").replace(" ", "_").replace("/", "_")


def carve_validation(patients: list[str], fraction: float, seed: int) -> set[str]:
    """Choose validation patients from the train_val pool, by patient and reproducibly.

    Ranks patients by a seeded hash (stable across Python versions and set orders) and takes the
    first `fraction` of them; every image of a chosen patient goes to validation.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    ranked = sorted(set(patients), key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    return set(ranked[: round(fraction * len(ranked))])


def check_patient_disjoint(index: DatasetIndex) -> None:
    """Reject every image of a patient found in more than one split (it would leak into the test)."""
    splits_of: dict[str, set[str]] = {}
    for r in index.records:
        splits_of.setdefault(r.patient, set()).add(r.split)
    leaking = {p for p, s in splits_of.items() if len(s) > 1}
    if leaking:
        kept = []
        for r in index.records:
            if r.patient in leaking:
                index.reject(r.path, f"patient {r.patient} appears in splits "
                                     f"{sorted(splits_of[r.patient])}; splits must be patient-disjoint")
            else:
                kept.append(r)
        index.records = kept

