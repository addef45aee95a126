"""Checks at read time, so that a shard damaged after the build stops a run with one line naming it.

* Before a run (`check_shard_files`): every shard of the splits used exists with the size the
  manifest records and, by default, the same sha256 (`data.verify: sha256 | size | none`; sha256
  reads every byte once, `size` is for datasets too large for that). Ranks split the shards
  between them, so the check costs 1/world of the bytes per rank.
* While reading (both loaders; `label_problem` is in shard_format.py): a sample whose image does
  not decode or whose label vector is not 0/1 (one-hot for single-label) is a `DamagedSample`
  naming the shard file and the sample key. The torch loader checks each sample as it reads it; DALI decodes inside
  its pipeline, so its loader checks the labels of every batch and, when the pipeline itself fails,
  finds the damaged sample by re-reading the rank's shard (`first_damaged_sample`).

`python -m data_pipeline.build_shards --verify-only --out DIR` checks a whole shard directory and
lists every problem (data_pipeline/verify_shards.py); this module stops at the first.
"""
from __future__ import annotations

import tarfile
from pathlib import Path

from data_pipeline.shard_format import read_shard, sha256_file
from data_pipeline.verify_shards import sample_problems

VERIFY_MODES = ("sha256", "size", "none")


class DamagedSample(ValueError):
    """A sample that cannot be trained on: the message names the shard file and the sample key."""


class DamagedShard(ValueError):
    """A shard file that differs from the manifest: the message names the file."""


def check_shard_files(shard_dir, manifest: dict, splits, mode: str = "sha256", rank: int = 0,
                      world_size: int = 1) -> list[str]:
    """Problems (one line each, naming the file) with this rank's share of the shards of `splits`:
    shard i of the combined list is checked by rank i % world_size. Empty when all is well."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"data.verify must be one of {', '.join(VERIFY_MODES)}, got {mode!r}")
    if mode == "none":
        return []
    shards = [s for split in dict.fromkeys(splits) for s in manifest["splits"][split]["shards"]]
    problems = []
    for shard in shards[rank::world_size]:
        path = Path(shard_dir) / shard["name"]
        if not path.is_file():
            problems.append(f"{path}: shard listed in the manifest is missing")
        elif (size := path.stat().st_size) != shard["bytes"]:
            problems.append(f"{path}: {size} bytes, the manifest records {shard['bytes']} (truncated or "
                            f"replaced after the build)")
        elif mode == "sha256" and sha256_file(path) != shard["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (the shard was changed after the "
                            f"build)")
        elif not (Path(shard_dir) / shard["index"]).is_file():
            problems.append(f"{Path(shard_dir) / shard['index']}: DALI index listed in the manifest is missing")
    return problems


def shard_hint(shard_dir) -> str:
    return (f"; rebuild the shards, or list every problem with python -m data_pipeline.build_shards "
            f"--verify-only --out {shard_dir}")


def first_damaged_sample(tars, manifest: dict, split: str) -> str | None:
    """'SHARD: sample KEY: what' for the first sample of `tars` that fails the build's checks
    (data_pipeline/verify_shards.py), or None when every sample reads."""
    image = manifest["image"]
    for tar in tars:
        key = None
        try:
            for key, members in read_shard(Path(tar)):
                found = sample_problems(key, members, image["ext"], image["size"],
                                        len(manifest["label_names"]), manifest["multilabel"], split)
                if found:
                    return f"{tar}: sample {key}: {found[0]}"
        except (tarfile.TarError, OSError, ValueError, EOFError) as e:
            return f"{tar}: {'after sample ' + key if key else 'first sample'}: tar unreadable: {e}"
    return None
