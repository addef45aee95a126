"""Resumable shard builds: `build_state.json`, written after every shard closes.

A build of a large dataset runs for hours and can be interrupted (node preempted, Ctrl-C, full
disk). Running the same command again, without `--overwrite`, continues it: the shards already
closed are kept and the rest are built, and the result is byte-identical to an uninterrupted build.

The state file (written atomically, so it is always the last complete checkpoint) records:

* `params_sha256`: a digest of every build option that changes the output bytes (see
  `build_parameters` in build_shards.py) and of the adapter's records and rejects (keys, paths,
  labels, patients, splits). A rerun with a different digest is refused: its shards would differ;
* `done`: the manifest entry of every finished split;
* `current`: for the split in progress, its closed shards (with sha256), the position of the next
  record to process in the split's shuffled record list (rejected records included; always the
  first record of a planned shard, see `plan_shards` in build_shards.py), the next sample id, and
  the running positives and patients that the manifest entry will report;
* `rejected`: every rejected input so far, adapter rejects first, in the order they happened.

On resume the kept shards are checked against their recorded sha256 (a mismatch, e.g. a damaged
file, restarts the build from scratch rather than trusting it), leftover `.part` files and any
`.tar`/`.idx` not in the state are deleted, and decoding restarts at the recorded position: the
images before it are not read again. Image *file contents* are not in the digest; a source image
edited between the two runs is not noticed (use `--overwrite` after changing data).

A slice of a sliced build (`--num-slices N --slice I`) keeps its own, per-shard checkpoint
(data_pipeline/slices.py) but shares the checks and the clean-up below (`shards_problem`,
`clean_out`).
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_pipeline.adapters import DatasetIndex
from data_pipeline.disk import write_atomic
from data_pipeline.manifest import MANIFEST
from data_pipeline.shard_format import dali_index, sha256_file

STATE_FILE = "build_state.json"
STATE_VERSION = 2  # 2: shards are fixed ranges of records (a v1 state cannot be resumed)


def parameters_digest(params: dict, index: DatasetIndex) -> str:
    """sha256 over the output-relevant options and everything the adapter produced."""
    h = hashlib.sha256()
    h.update(json.dumps({"params": params, "dataset": index.name, "multilabel": index.multilabel,
                         "label_names": list(index.label_names)}, sort_keys=True).encode())
    for r in sorted(index.records, key=lambda r: r.key):
        h.update(json.dumps([r.key, str(r.path), list(r.labels), r.patient, r.split]).encode() + b"\n")
    h.update(json.dumps(index.rejected, sort_keys=True).encode())
    return h.hexdigest()


def read_checkpoint(path: Path, version: int, digest: str, what: str) -> dict:
    """An interrupted build's checkpoint file, or one clear error: unreadable, another format
    version, or written by a build with other options or inputs (`digest`)."""
    try:
        d = json.loads(Path(path).read_text())
        if d.get("version") != version:
            raise ValueError(f"version {d.get('version')!r}, expected {version}")
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {path}: unreadable checkpoint ({e}); pass --overwrite to build "
                         f"{what} anew") from None
    if d.get("params_sha256") != digest:
        raise SystemExit(f"error: {path} holds an interrupted run of {what} made with different "
                         f"options or inputs; rerun the original command to resume it, or pass "
                         f"--overwrite to discard it")
    return d


@dataclass
class SplitProgress:
    """Where one split's writing stands after its last closed shard."""
    n_classes: int
    position: int = 0  # next index into the split's shuffled records, rejected ones included
    sid: int = 0       # next sample id
    positives: np.ndarray = None
    patients: set = field(default_factory=set)
    shards: list = field(default_factory=list)  # manifest entries of the closed shards

    def __post_init__(self):
        if self.positives is None:
            self.positives = np.zeros(self.n_classes, dtype=np.int64)

    def to_json(self) -> dict:
        return {"position": self.position, "sid": self.sid, "positives": self.positives.tolist(),
                "patients": sorted(self.patients), "shards": self.shards}

    @classmethod
    def from_json(cls, d: dict, n_classes: int) -> "SplitProgress":
        return cls(n_classes, d["position"], d["sid"], np.asarray(d["positives"], dtype=np.int64),
                   set(d["patients"]), list(d["shards"]))


class BuildState:
    """The checkpoint of one build in `out`; `rejected` is the list the builder appends to."""

    def __init__(self, out: Path, digest: str, rejected: list[dict]):
        self.path = Path(out) / STATE_FILE
        self.digest = digest
        self.rejected = rejected
        self.done: dict[str, dict] = {}
        self.current: tuple[str, dict] | None = None  # (split, SplitProgress.to_json())

    def progress(self, split: str, n_classes: int) -> SplitProgress:
        if self.current is not None and self.current[0] == split:
            return SplitProgress.from_json(self.current[1], n_classes)
        return SplitProgress(n_classes)

    def checkpoint(self, split: str, progress: SplitProgress) -> None:
        """Called right after a shard of `split` closed; `progress.position` is the next record."""
        self.current = (split, progress.to_json())
        self.save()

    def finish(self, split: str, entry: dict) -> None:
        self.done[split] = entry
        self.current = None
        self.save()

    def kept_shards(self) -> list[dict]:
        shards = [s for entry in self.done.values() for s in entry["shards"]]
        return shards + (self.current[1]["shards"] if self.current else [])

    def save(self) -> None:
        state = {"version": STATE_VERSION, "params_sha256": self.digest, "done": self.done,
                 "current": ({"split": self.current[0], **self.current[1]} if self.current else None),
                 "rejected": self.rejected}
        write_atomic(self.path, json.dumps(state))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    @classmethod
    def load(cls, out: Path, digest: str) -> "BuildState":
        path = Path(out) / STATE_FILE
        d = read_checkpoint(path, STATE_VERSION, digest, "the build")
        state = cls(out, digest, d["rejected"])
        state.done = d["done"]
        if d["current"] is not None:
            current = dict(d["current"])
            state.current = (current.pop("split"), current)
        return state


def shards_problem(out: Path, shards: list[dict]) -> str | None:
    """None when every shard (manifest entries) is on disk with its recorded sha256; else what is
    wrong."""
    for shard in shards:
        path = out / shard["name"]
        if not path.is_file():
            return f"{shard['name']} is missing"
        if path.stat().st_size != shard["bytes"] or sha256_file(path) != shard["sha256"]:
            return f"{shard['name']} does not match its recorded sha256"
    return None


def clean_out(out: Path, kept: list[dict], owned: set[str] | None = None) -> None:
    """Rewrite the DALI index of every kept shard where it is missing or stale, and delete leftover
    `.part` files and every `.tar`/`.idx` that is not kept; with `owned` (file names), only those
    names and their `.part` files are touched (a slice leaves the other slices' files alone)."""
    keep = set()
    for shard in kept:
        keep |= {shard["name"], shard["index"]}
        idx, text = out / shard["index"], dali_index(out / shard["name"])
        if not idx.is_file() or idx.read_text() != text:  # derived from the tar: just rewrite it
            idx.write_text(text)
    if owned is None:
        for stale in out.iterdir():
            if stale.name.endswith(".part") or (stale.suffix in (".tar", ".idx")
                                                and stale.name not in keep):
                stale.unlink()
        return
    for name in owned - keep:
        (out / name).unlink(missing_ok=True)
    for name in owned:
        (out / (name + ".part")).unlink(missing_ok=True)


def start_or_resume(out: Path, digest: str, rejected: list[dict], overwrite: bool,
                    quiet: bool = False) -> BuildState:
    """The state to build with: resumed from `out` when it holds a matching interrupted build
    (and not `overwrite`), else fresh. Clears everything in `out` the build will (re)write."""
    out = Path(out)
    state = None
    if (out / STATE_FILE).exists() and not overwrite:
        state = BuildState.load(out, digest)
        problem = shards_problem(out, state.kept_shards())
        if problem:
            print(f"resume: {problem}; building {out} from scratch", file=sys.stderr)
            state = None
        elif not quiet:
            where = (f"{state.current[0]} at record {state.current[1]['position']}" if state.current
                     else "after the last finished split")
            print(f"resume: keeping {len(state.kept_shards())} shard(s) in {out}, continuing "
                  f"{where}", file=sys.stderr)
    clean_out(out, state.kept_shards() if state else [])
    (out / MANIFEST).unlink(missing_ok=True)
    if state is None:
        (out / STATE_FILE).unlink(missing_ok=True)
        state = BuildState(out, digest, list(rejected))
    return state
