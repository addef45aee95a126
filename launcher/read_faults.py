"""Damaged input stops every rank together, with one line naming the shard and the sample.

`check_shards` (before the loaders start): each rank checks its share of the shards of the splits
the run reads against the manifest (data_pipeline/read_checks.py; `data.verify`), and the ranks
agree on the first problem. `AgreedBatches` (around every loader): a sample that fails to read on
one rank (data_pipeline.read_checks.DamagedSample) would leave the other ranks waiting in the
step's collectives until a timeout, so before each batch is used the ranks agree whether every
one of them has it: one tiny all-reduce on a CPU (gloo) group per batch, no device sync. When one
has not, every rank raises DamagedSample with the lowest failing rank's message. Building a
loader is agreed the same way (`agreed_loader`).

With `data.on_damaged: skip`, `check_shards` also reads the samples of the shards that may hold
damage once (each rank its share, data_pipeline.read_checks.scan_samples: with `data.verify:
sha256` the shards that differ from the manifest, else all of them), and every rank learns the
full list of damaged samples (`Skipped`): the loaders leave those keys out on every rank alike,
so the ranks still run equal batch counts, and the run reports what it left out.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from data_pipeline.disk import write_atomic
from data_pipeline.read_checks import (DamagedSample, DamagedShard, check_shard_files, scan_samples,
                                       shard_hint)
from launcher.dist import all_gather_objects, first_error

SKIPPED_FILE = "skipped_samples.json"


@dataclass(frozen=True)
class Skipped:
    """The damaged samples a run leaves out (`data.on_damaged: skip`), the same on every rank:
    `samples` = ((split, key, 'SHARD: sample KEY: what'), ...); `changed` = the shards found to
    differ from the manifest (whose samples were then scanned); `scanned`: whether every sample
    was read to find them (on_damaged="skip"), so that an empty list means none was damaged."""
    samples: tuple = ()
    changed: tuple = ()
    scanned: bool = False

    def keys(self, split: str) -> frozenset:
        return frozenset(k for s, k, _ in self.samples if s == split)

    def count(self, split: str) -> int:
        return sum(s == split for s, _, _ in self.samples)

    def document(self, splits) -> dict:
        """What metrics.json and skipped_samples.json record."""
        return {"counts": {s: self.count(s) for s in dict.fromkeys(splits)},
                "samples": [{"split": s, "key": k, "problem": why} for s, k, why in self.samples],
                "shards_changed": list(self.changed)}

    def report(self, splits, where: Path | None) -> list[str]:
        """Lines to print: each changed shard, then the count per split and its first sample."""
        lines = [f"warning: {c}; its samples were read one by one (data.on_damaged: skip)"
                 for c in self.changed]
        listed = f" (listed in {where})" if where else ""
        for split in dict.fromkeys(splits):
            if n := self.count(split):
                first = next(why for s, _, why in self.samples if s == split)
                lines.append(f"warning: skipping {n} damaged sample{'s' * (n != 1)} of split "
                             f"'{split}'{listed}, the first: {first}")
        return lines

    def write(self, run_dir: Path, splits) -> Path:
        """skipped_samples.json in `run_dir`, atomically (rank 0)."""
        path = Path(run_dir) / SKIPPED_FILE
        write_atomic(path, json.dumps(self.document(splits), indent=1) + "\n")
        return path


def check_shards(shard_dir, manifest: dict, splits, mode: str, rank: int, world_size: int,
                 on_damaged: str = "stop") -> Skipped:
    """Collective: raise DamagedShard (same message on every rank) if any shard of `splits` differs
    from the manifest (`mode`: data.verify). With `on_damaged="skip"` a shard that differs is no
    error: every sample of the splits is read, and the damaged ones are returned (`Skipped`)."""
    if on_damaged not in ("stop", "skip"):
        raise ValueError(f"data.on_damaged must be stop or skip, got {on_damaged!r}")
    changed = [] if on_damaged == "skip" else None
    problems = check_shard_files(shard_dir, manifest, splits, mode, rank, world_size, changed)
    more = f" (and {len(problems) - 1} more on this rank)" if len(problems) > 1 else ""
    error = first_error(f"{problems[0]}{more}{shard_hint(shard_dir)}" if problems else None)
    if error:
        raise DamagedShard(error)
    if on_damaged == "stop":
        return Skipped()
    found, error = [], None
    only = {name for name, _ in changed} if mode == "sha256" else None  # a matching sha256: as built
    try:
        found = scan_samples(shard_dir, manifest, splits, rank, world_size, only)
    except (DamagedShard, OSError) as e:  # an index that does not parse: no sample of it is found
        error = f"{e}{shard_hint(shard_dir)}"
    if error := first_error(error):
        raise DamagedShard(error)
    order = {s: i for i, s in enumerate(dict.fromkeys(splits))}
    every = all_gather_objects((found, changed))
    samples = sorted((x for f, _ in every for x in f), key=lambda x: (order[x[0]], x[2]))
    return Skipped(tuple(samples), tuple(sorted(line for _, ch in every for _, line in ch)), True)


def cpu_group():
    """A gloo group over every rank (collective: every rank calls it at the same point), or None
    in a single process."""
    dist = torch.distributed
    if dist.is_initialized() and dist.get_world_size() > 1:
        return dist.new_group(backend="gloo")
    return None


def _agree(error: str | None, group, done: bool = False) -> bool:
    """Collective on `group`: raise DamagedSample on every rank when any rank has an `error` (the
    lowest such rank's message); else whether any rank is `done`."""
    if group is None:
        if error:
            raise DamagedSample(error)
        return done
    state = torch.tensor([error is not None, done], dtype=torch.int64)
    torch.distributed.all_reduce(state, op=torch.distributed.ReduceOp.MAX, group=group)
    if state[0]:
        raise DamagedSample(first_error(error))
    return bool(state[1])


def agreed_loader(build, group) -> "AgreedBatches":
    """`AgreedBatches(build())`, the building agreed too (DALI's iterator reads its first batches
    as it is built, so a damaged sample can surface there, on one rank; a split left with fewer
    samples than ranks is a ValueError): every rank raises DamagedSample with the message."""
    loader, error = None, None
    try:
        loader = build()
    except (DamagedSample, ValueError) as e:
        error = _one_line(e)
    _agree(error, group)
    return AgreedBatches(loader, group)


class AgreedBatches:
    """A loader whose batches every rank has, or DamagedSample on every rank at the same batch."""

    def __init__(self, loader, group):
        self.loader, self.group = loader, group

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            batch, error, done = None, None, False
            try:
                batch = next(batches)
            except StopIteration:
                done = True
            except DamagedSample as e:
                error = _one_line(e)
            if _agree(error, self.group, done):  # ranks run equal batch counts: done together
                return
            yield batch


def _one_line(e: DamagedSample) -> str:
    """The message of a DamagedSample, also when a DataLoader worker re-raised it (its message then
    carries the worker's traceback: the last line holds the original message)."""
    text = str(e).strip()
    if "Traceback" in text:
        last = text.splitlines()[-1]  # "data_pipeline.read_checks.DamagedSample: SHARD: sample KEY: ..."
        return last.split("DamagedSample: ", 1)[-1]
    return text
