"""The shard directory's manifest: its file name, reading, atomic writing and assembly.

`manifest.json` is written last by a build (single-process, or the merge of a sliced one) and marks
the build complete: every loader, the verifier, the evaluator and the exporter read it. Stdlib only,
so that anything (a rank process, the terminal's predict) may import it cheaply.
"""
from __future__ import annotations

import json
from pathlib import Path

from data_pipeline.disk import write_atomic

MANIFEST = "manifest.json"
SYNTHETIC_MARKER = "SYNTHETIC.json"  # in a dataset root; copied into the manifest as `synthetic`


def read_manifest(shard_dir) -> dict:
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no shard manifest (build shards with "
                                f"`python -m data_pipeline.build_shards`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: corrupt manifest ({e})") from None


def make_manifest(head: dict, splits: dict, summary: dict, rejected: list[dict]) -> dict:
    """The manifest from its head (see build_plan.manifest_head) and what the build produced."""
    manifest = {k: v for k, v in head.items() if k != "dataset_options"}
    manifest.update(splits=splits, summary=summary, rejected=rejected)
    if "dataset_options" in head:
        manifest["dataset_options"] = head["dataset_options"]
    return manifest


def write_manifest(out: Path, manifest: dict) -> None:
    """Atomically: a reader sees the previous manifest or this one, never a part."""
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1), fsync=True)


def synthetic_marker(root: Path) -> dict | None:
    """The SYNTHETIC.json that data_pipeline.synthetic leaves in a dataset root, else None."""
    path = root / SYNTHETIC_MARKER
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        doc = None
    return doc if isinstance(doc, dict) else {"marker": SYNTHETIC_MARKER}


def split_warnings(manifest: dict, splits=None) -> list[str]:
    """One line per split on which some class cannot be scored: a multi-label class without a
    positive or without a negative there, a single-label class without a sample there. Its AUROC
    (and, on the validation split, its decision threshold) is then undefined. `splits`: only
    these (default all)."""
    lines = []
    for split, info in manifest["splits"].items():
        if splits is not None and split not in splits:
            continue
        n, pos = int(info["samples"]), info.get("positives") or {}
        if n == 0:
            continue
        if manifest.get("multilabel", True):
            none = [k for k, v in pos.items() if v == 0]
            every = [k for k, v in pos.items() if v == n]
            parts = ([f"no positive of {', '.join(none)}"] if none else []) + \
                    ([f"no negative of {', '.join(every)}"] if every else [])
        else:
            absent = [k for k, v in pos.items() if v == 0]
            parts = [f"no sample of {', '.join(absent)}"] if absent else []
            if len(pos) - len(absent) == 1:
                parts.append("a single class only")
        if parts:
            lines.append(f"split '{split}' ({n} samples) has {' and '.join(parts)}: AUROC (and a threshold "
                         f"chosen there) is undefined for these classes")
    return lines
