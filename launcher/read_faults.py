"""Damaged input stops every rank together, with one line naming the shard and the sample.

`check_shards` (before the loaders start): each rank checks its share of the shards of the splits
the run reads against the manifest (data_pipeline/read_checks.py; `data.verify`), and the ranks
agree on the first problem. `AgreedBatches` (around every loader): a sample that fails to read on
one rank (data_pipeline.read_checks.DamagedSample) would leave the other ranks waiting in the
step's collectives until a timeout, so before each batch is used the ranks agree whether every
one of them has it: one tiny all-reduce on a CPU (gloo) group per batch, no device sync. When one
has not, every rank raises DamagedSample with the lowest failing rank's message. Building a
loader is agreed the same way (`agreed_loader`).
"""
from __future__ import annotations

import torch

from data_pipeline.read_checks import DamagedSample, DamagedShard, check_shard_files, shard_hint
from launcher.dist import first_error


def check_shards(shard_dir, manifest: dict, splits, mode: str, rank: int, world_size: int) -> None:
    """Collective: raise DamagedShard (same message on every rank) if any shard of `splits` differs
    from the manifest (`mode`: data.verify)."""
    problems = check_shard_files(shard_dir, manifest, splits, mode, rank, world_size)
    more = f" (and {len(problems) - 1} more on this rank)" if len(problems) > 1 else ""
    error = first_error(f"{problems[0]}{more}{shard_hint(shard_dir)}" if problems else None)
    if error:
        raise DamagedShard(error)


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
    as it is built, so a damaged sample can surface there, on one rank)."""
    loader, error = None, None
    try:
        loader = build()
    except DamagedSample as e:
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
