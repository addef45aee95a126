"""Dataset adapters: a dataset on disk in, a `DatasetIndex` (records + rejects) out.

Each adapter knows one dataset's layout and quirks and nothing about shards; the shard builder
knows shards and nothing about layouts. A record that cannot be used is never dropped silently: it
goes to `DatasetIndex.rejected` with its reason, and the builder reports it in the manifest.
"""
from __future__ import annotations

from pathlib import Path

from data_pipeline.adapters.common import (SPLITS, DatasetIndex, Record, carve_validation,  # noqa: F401
                                           check_patient_disjoint, sample_key)


def load_dataset(name: str, root: Path, **options) -> DatasetIndex:
    """Dispatch to the adapter of `name` (plain if/elif: there are few datasets)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} is not a directory")
    if name == "chestxray14":
        from data_pipeline.adapters.chestxray14 import load
    elif name == "fetal_planes":
        from data_pipeline.adapters.fetal_planes import load
    elif name == "csv":
        from data_pipeline.adapters.csv import load
    else:
        raise ValueError(f"unknown dataset {name!r}; choose chestxray14, fetal_planes or csv")
    return load(root, **options)
