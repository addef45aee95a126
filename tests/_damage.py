"""Damaging a copy of a shard set in place, the way a disk or a careless script would: one member
of one sample overwritten, the tar keeping its size."""
from __future__ import annotations

from data_pipeline.manifest import read_manifest
from data_pipeline.torch_loader import read_keyed_index


def damage(shards, split: str, shard_no: int, sample_no: int, ext: str, data: bytes):
    """Overwrite the start of member `ext` of one sample with `data`; returns (tar path, sample key)."""
    shard = read_manifest(shards)["splits"][split]["shards"][shard_no]
    tar, key, members = read_keyed_index(str(shards / shard["name"]), str(shards / shard["index"]))[sample_no]
    with open(tar, "r+b") as f:
        f.seek(members[ext][0])
        f.write(data)
    return tar, key
