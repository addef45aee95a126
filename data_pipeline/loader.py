"""One entry point for the training/evaluation loaders: DALI when it imports, else plain torch."""
from __future__ import annotations

from data_pipeline.loader_common import AugmentSpec


def build_loader(shard_dir, split: str, *, backend: str, batch_size: int, image_size: int,
                 train: bool, rank: int = 0, world_size: int = 1, device_id: int | None = None,
                 num_threads: int = 1, seed: int = 0, augment: AugmentSpec | None = None,
                 epoch: int = 0, skip: frozenset = frozenset()):
    """backend: "dali" (GPU when device_id is set, else DALI's CPU-only mode), "torch", or "auto".
    `skip`: keys of damaged samples to leave out (the same on every rank: launcher/read_faults.py).

    `epoch` fixes the data order: the shard a rank reads rotates with it and the shuffle seed is
    derived from (seed, epoch, rank), so a loader rebuilt for epoch e after a restart yields the same
    batches as the original run did (exact resume)."""
    if backend == "auto":
        from data_pipeline.dali_loader import dali_available
        backend = "dali" if dali_available() else "torch"
    if backend == "dali":
        from data_pipeline.dali_loader import build_dali_loader
        return build_dali_loader(shard_dir, split, batch_size=batch_size, image_size=image_size,
                                 train=train, rank=rank, world_size=world_size, device_id=device_id,
                                 num_threads=num_threads, seed=seed, augment=augment,
                                 epoch=epoch, skip=skip)
    if backend == "torch":
        from data_pipeline.torch_loader import build_torch_loader
        return build_torch_loader(shard_dir, split, batch_size=batch_size, image_size=image_size,
                                  train=train, rank=rank, world_size=world_size,
                                  num_workers=max(0, num_threads - 1), seed=seed, augment=augment,
                                  epoch=epoch, skip=skip)
    raise ValueError(f"data.loader must be dali, torch or auto, got {backend!r}")


class InterleavedRanks:
    """One process replaying the data order of a k-rank run: batch i of virtual rank 0, then batch
    i of rank 1, ... With gradient accumulation over k micro-batches this is the same optimisation
    as k data-parallel ranks (the mean of k micro-batch means), so a multi-GPU run can be reproduced,
    debugged or checked for equivalence on one device."""

    def __init__(self, loaders):
        self.loaders = loaders

    def __len__(self) -> int:
        return len(self.loaders[0]) * len(self.loaders)

    def __iter__(self):
        for batches in zip(*self.loaders):  # every rank has the same number of batches
            yield from batches


def build_emulated_loader(shard_dir, split: str, *, virtual_world_size: int, **kwargs):
    """`build_loader` for each virtual rank of a `virtual_world_size` run, interleaved."""
    return InterleavedRanks([build_loader(shard_dir, split, rank=r, world_size=virtual_world_size,
                                          **kwargs) for r in range(virtual_world_size)])
