"""One entry point for the training/evaluation loaders: DALI when it imports, else plain torch."""
from __future__ import annotations

from data_pipeline.loader_common import AugmentSpec


def build_loader(shard_dir, split: str, *, backend: str, batch_size: int, image_size: int,
                 train: bool, rank: int = 0, world_size: int = 1, device_id: int | None = None,
                 num_threads: int = 1, seed: int = 0, augment: AugmentSpec | None = None,
                 epoch: int = 0):
    """backend: "dali" (GPU when device_id is set, else DALI's CPU-only mode), "torch", or "auto".

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
                                 epoch=epoch)
    if backend == "torch":
        from data_pipeline.torch_loader import build_torch_loader
        return build_torch_loader(shard_dir, split, batch_size=batch_size, image_size=image_size,
                                  train=train, rank=rank, world_size=world_size,
                                  num_workers=max(0, num_threads - 1), seed=seed, augment=augment,
                                  epoch=epoch)
    raise ValueError(f"data.loader must be dali, torch or auto, got {backend!r}")
