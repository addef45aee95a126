"""Plain PyTorch fallback loader over the same shards, for machines without DALI.

It reads samples by random access through the DALI index files (offset and size of every member),
so it can partition a split across ranks exactly as DALI does (rank r of k gets the contiguous range
[N*r//k, N*(r+1)//k) of the split, rotating by one shard per epoch) and pad the last batch the same
way (repeating the rank's last sample), giving every rank the same number of iterations. Batches have
the same keys, dtypes and value range as `dali_loader`.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from data_pipeline.loader_common import AugmentSpec, batches_per_epoch, split_shards
from data_pipeline.read_checks import DamagedSample, read_keyed_index
from data_pipeline.shard_format import ID_EXT, LABEL_EXT, label_problem
from data_pipeline.verify_shards import decode_error


def read_index(tar: str, idx: str):
    """[(tar, {ext: (offset, size)})] per sample, from a DALI v1.2 index."""
    return [(t, members) for t, _, members in read_keyed_index(tar, idx)]


class ShardSamples(Dataset):
    def __init__(self, shard_dir, split: str, image_size: int, augment: AugmentSpec | None,
                 skip: frozenset = frozenset()):
        manifest, tars, idxs = split_shards(shard_dir, split)
        self.ext, self.stored = manifest["image"]["ext"], manifest["image"]["size"]
        self.classes, self.multilabel = len(manifest["label_names"]), manifest["multilabel"]
        self.samples = [s for t, i in zip(tars, idxs) for s in read_keyed_index(t, i) if s[1] not in skip]
        self.image_size = image_size
        aug = augment or AugmentSpec.none()
        ops = []
        if aug.crop_scale[0] < 1.0:
            ops.append(T.RandomResizedCrop(image_size, scale=aug.crop_scale, ratio=(0.9, 1.1)))
        elif image_size != self.stored:
            ops.append(T.Resize((image_size, image_size)))
        if aug.rotate_degrees > 0:
            ops.append(T.RandomRotation(aug.rotate_degrees))
        if aug.brightness > 0 or aug.contrast > 0:
            ops.append(T.ColorJitter(brightness=aug.brightness, contrast=aug.contrast))
        if aug.hflip > 0:
            ops.append(T.RandomHorizontalFlip(aug.hflip))
        self.transform = T.Compose(ops) if ops else None

    def __len__(self):
        return len(self.samples)

    def _member(self, tar, where) -> bytes:
        with open(tar, "rb") as f:
            f.seek(where[0])
            return f.read(where[1])

    def _read(self, tar, members):
        """(image (1, s, s) uint8, label (C,) uint8, sid); raises DamagedSample's message as ValueError."""
        missing = {self.ext, LABEL_EXT, ID_EXT} - set(members)
        if missing:
            raise ValueError(f"no .{' .'.join(sorted(missing))} member")
        raw = self._member(tar, members[self.ext])
        if self.ext == "raw":
            if len(raw) != self.stored ** 2:
                raise ValueError(f"raw image has {len(raw)} bytes, expected {self.stored ** 2}")
            img = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(1, self.stored, self.stored)
        else:
            try:
                pil = Image.open(io.BytesIO(raw))
                pil.load()
            except Exception as e:  # PIL raises many types for damaged data
                raise ValueError(f"image does not decode: {decode_error(e)}") from None
            if pil.size != (self.stored, self.stored):
                raise ValueError(f"image is {pil.size}, the manifest says ({self.stored}, {self.stored})")
            img = torch.from_numpy(np.array(pil.convert("L"))).unsqueeze(0)
        label = np.frombuffer(self._member(tar, members[LABEL_EXT]), dtype=np.uint8)
        if (why := label_problem(label, self.classes, self.multilabel)) is not None:
            raise ValueError(why)
        sid_bytes = self._member(tar, members[ID_EXT])
        if len(sid_bytes) != 8:
            raise ValueError(f".{ID_EXT} has {len(sid_bytes)} bytes, expected 8")
        return img, torch.from_numpy(label.copy()), int(np.frombuffer(sid_bytes, dtype="<i8")[0])

    def __getitem__(self, i):
        tar, key, members = self.samples[i]
        try:
            img, label, sid = self._read(tar, members)
        except (ValueError, OSError) as e:
            raise DamagedSample(f"{tar}: sample {key}: {e}") from None
        if self.transform is not None:
            img = self.transform(img)
        return {"image": img.float() / 255.0, "label": label.float(), "sid": torch.tensor(sid)}


class RankSampler(torch.utils.data.Sampler):
    """DALI's sharding and FILL padding: contiguous ranges; the shard read rotates with `epoch`
    (fixed per loader, as DALI's pipeline is: a new loader per epoch), so every pass is the same."""

    def __init__(self, n: int, rank: int, world_size: int, batch_size: int, shuffle: bool, seed: int,
                 epoch: int = 0):
        self.n, self.rank, self.world, self.bs = n, rank, world_size, batch_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, epoch
        self.batches = batches_per_epoch(n, world_size, batch_size)

    def __iter__(self):
        shard = (self.rank + self.epoch) % self.world
        idx = list(range(self.n * shard // self.world, self.n * (shard + 1) // self.world))
        if self.shuffle:
            g = np.random.default_rng([self.seed, self.epoch, self.rank])
            idx = [idx[i] for i in g.permutation(len(idx))]
        idx += [idx[-1]] * (self.batches * self.bs - len(idx))
        return iter(idx)

    def __len__(self):
        return self.batches * self.bs


def build_torch_loader(shard_dir, split: str, *, batch_size: int, image_size: int, train: bool,
                       rank: int = 0, world_size: int = 1, num_workers: int = 0, seed: int = 0,
                       augment: AugmentSpec | None = None, epoch: int = 0,
                       skip: frozenset = frozenset()) -> DataLoader:
    """`skip`: sample keys left out (data.on_damaged: skip), on every rank the same."""
    ds = ShardSamples(shard_dir, split, image_size, augment if train else None, skip)
    if len(ds) < world_size:
        left = f" once {len(skip)} damaged ones are skipped" if skip else ""
        raise ValueError(f"{shard_dir}: split {split!r} has {len(ds)} samples{left}, fewer than the "
                         f"{world_size} ranks it must be split over")
    sampler = RankSampler(len(ds), rank, world_size, batch_size, shuffle=train, seed=seed, epoch=epoch)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      drop_last=False, persistent_workers=num_workers > 0)
