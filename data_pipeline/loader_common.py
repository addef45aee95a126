"""What the DALI loader and the torch fallback share: the manifest, shard lists, augmentation spec."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.manifest import read_manifest


@dataclass(frozen=True)
class AugmentSpec:
    """Training-time augmentation, the same semantics in both loaders.

    crop_scale: area range of the random resized crop ((1, 1) = no crop); hflip: probability of a
    horizontal flip (0 for chest X-rays by default: the heart's side is anatomy, not noise);
    rotate_degrees: uniform rotation range; brightness / contrast: +- relative jitter.
    """
    crop_scale: tuple[float, float] = (0.8, 1.0)
    hflip: float = 0.0
    rotate_degrees: float = 5.0
    brightness: float = 0.1
    contrast: float = 0.1

    @staticmethod
    def none() -> "AugmentSpec":
        return AugmentSpec((1.0, 1.0), 0.0, 0.0, 0.0, 0.0)


def split_shards(shard_dir, split: str):
    """(manifest, tar paths, DALI index paths) of one split, checked to exist."""
    manifest = read_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise ValueError(f"{shard_dir}: manifest has no split {split!r} "
                         f"(has {sorted(manifest['splits'])})")
    shards = manifest["splits"][split]["shards"]
    if not shards:
        raise ValueError(f"{shard_dir}: split {split!r} has no samples")
    tars = [str(Path(shard_dir) / s["name"]) for s in shards]
    idxs = [str(Path(shard_dir) / s["index"]) for s in shards]
    for f in tars + idxs:
        if not Path(f).is_file():
            raise FileNotFoundError(f"{f}: shard listed in the manifest is missing")
    return manifest, tars, idxs


def split_patients(shard_dir, split: str) -> dict[int, str]:
    """Sample id -> patient id of every sample of a split, read from the shards' `.json` members
    (for statistics that resample patients, not images)."""
    from data_pipeline.shard_format import ID_EXT, META_EXT, decode_sid, read_shard

    _, tars, _ = split_shards(shard_dir, split)
    out: dict[int, str] = {}
    for tar in tars:
        for key, members in read_shard(Path(tar)):
            if ID_EXT not in members or META_EXT not in members:
                raise ValueError(f"{tar}: sample {key} has no .{ID_EXT} or .{META_EXT} member")
            patient = json.loads(members[META_EXT]).get("patient")
            out[decode_sid(members[ID_EXT])] = str(key if patient is None else patient)
    return out


def batches_per_epoch(samples: int, world_size: int, batch_size: int) -> int:
    """Batches every rank yields per epoch: ranks read contiguous ranges of the split (rank r:
    [n*r//w, n*(r+1)//w)), and the shorter ones are padded to the longest (DALI's pad_last_batch
    with FILL; torch_loader's RankSampler does the same), so every rank runs the same count."""
    if samples < world_size:
        raise ValueError(f"{samples} samples cannot be split over {world_size} ranks")
    longest = max(samples * (r + 1) // world_size - samples * r // world_size for r in range(world_size))
    return math.ceil(longest / batch_size)
