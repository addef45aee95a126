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

* Skipping instead of stopping (`data.on_damaged: skip`, `scan_samples`): the samples of the
  shards that may hold damage are read once before the run, through the DALI index (by offset, as
  both loaders read it, so a damaged tar header does not hide the samples after it), and checked
  as the build checks it; the loaders are then given the keys to leave out. With `data.verify:
  sha256` those are the shards whose size or sha256 differs from the manifest (one that matches
  holds what the build wrote, and the build wrote only samples that pass these checks); with
  `size` or `none`, every shard: one CPU decode of the dataset, split across ranks.

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


def read_keyed_index(tar: str, idx: str):
    """[(tar, sample key, {ext: (offset, size)})] per sample, from a DALI v1.2 index (`ext offset
    size name` per member; the key is the name without its extension)."""
    out = []
    for n, line in enumerate(Path(idx).read_text().splitlines()[1:], start=2):
        f = line.split()
        if not f or len(f) % 4:
            raise DamagedShard(f"{idx}: line {n} is not a DALI index entry; rebuild the shards")
        key = Path(f[3]).name.split(".", 1)[0]
        out.append((tar, key, {f[i]: (int(f[i + 1]), int(f[i + 2])) for i in range(0, len(f), 4)}))
    return out


def check_shard_files(shard_dir, manifest: dict, splits, mode: str = "sha256", rank: int = 0,
                      world_size: int = 1, changed: list | None = None) -> list[str]:
    """Problems (one line each, naming the file) with this rank's share of the shards of `splits`:
    shard i of the combined list is checked by rank i % world_size. Empty when all is well. With a
    `changed` list, a shard whose size or sha256 differs from the manifest is noted there instead,
    as (shard name, line) (its samples are then read one by one: `scan_samples`); a missing file
    stays a problem."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"data.verify must be one of {', '.join(VERIFY_MODES)}, got {mode!r}")
    if mode == "none":
        return []
    shards = [s for split in dict.fromkeys(splits) for s in manifest["splits"][split]["shards"]]
    problems = []
    for shard in shards[rank::world_size]:
        differs = problems if changed is None else _Named(changed, shard["name"])
        path = Path(shard_dir) / shard["name"]
        if not path.is_file():
            problems.append(f"{path}: shard listed in the manifest is missing")
            continue
        if not (Path(shard_dir) / shard["index"]).is_file():
            problems.append(f"{Path(shard_dir) / shard['index']}: DALI index listed in the manifest is missing")
        if (size := path.stat().st_size) != shard["bytes"]:
            differs.append(f"{path}: {size} bytes, the manifest records {shard['bytes']} (truncated or "
                           f"replaced after the build)")
        elif mode == "sha256" and sha256_file(path) != shard["sha256"]:
            differs.append(f"{path}: sha256 differs from the manifest (the shard was changed after the "
                           f"build)")
    return problems


class _Named:
    """A list that records each line appended to it with a shard name: (name, line)."""

    def __init__(self, into: list, name: str):
        self.into, self.name = into, name

    def append(self, line: str) -> None:
        self.into.append((self.name, line))


def shard_hint(shard_dir) -> str:
    return (f"; rebuild the shards, or list every problem with python -m data_pipeline.build_shards "
            f"--verify-only --out {shard_dir}")


def first_damaged_sample(tars, manifest: dict, split: str, skip: frozenset = frozenset()) -> str | None:
    """'SHARD: sample KEY: what' for the first sample of `tars` (keys in `skip` passed over) that
    fails the build's checks (data_pipeline/verify_shards.py), or None when every sample reads."""
    image = manifest["image"]
    for tar in tars:
        key = None
        try:
            for key, members in read_shard(Path(tar)):
                if key in skip:
                    continue
                found = sample_problems(key, members, image["ext"], image["size"],
                                        len(manifest["label_names"]), manifest["multilabel"], split)
                if found:
                    return f"{tar}: sample {key}: {found[0]}"
        except (tarfile.TarError, OSError, ValueError, EOFError) as e:
            return f"{tar}: {'after sample ' + key if key else 'first sample'}: tar unreadable: {e}"
    return None


def scan_samples(shard_dir, manifest: dict, splits, rank: int = 0, world_size: int = 1,
                 only: set | None = None) -> list[tuple]:
    """(split, key, 'SHARD: sample KEY: what') for every damaged sample of this rank's share of the
    shards of `splits` (shard i of the combined list is rank i % world_size's; with `only`, just
    the shards of those names), read by the offsets of the DALI index the loaders use and checked
    as the build checks it. An index that does not parse is a DamagedShard: without it no sample
    of the shard can be found."""
    image, found = manifest["image"], []
    shards = [(split, s) for split in dict.fromkeys(splits) for s in manifest["splits"][split]["shards"]]
    for split, shard in shards[rank::world_size]:
        if only is not None and shard["name"] not in only:
            continue
        tar, idx = Path(shard_dir) / shard["name"], Path(shard_dir) / shard["index"]
        size = tar.stat().st_size
        with open(tar, "rb") as f:
            for _, key, where in read_keyed_index(str(tar), str(idx)):
                past = [ext for ext, (offset, n) in where.items() if offset + n > size]
                if past:
                    verb = "lies" if len(past) == 1 else "lie"
                    found.append((split, key, f"{tar}: sample {key}: .{', .'.join(past)} {verb} past the "
                                              f"end of the file ({size} bytes: truncated)"))
                    continue
                members = {}
                for ext, (offset, n) in where.items():
                    f.seek(offset)
                    members[ext] = f.read(n)
                problems = sample_problems(key, members, image["ext"], image["size"],
                                           len(manifest["label_names"]), manifest["multilabel"], split)
                if problems:
                    found.append((split, key, f"{tar}: sample {key}: {problems[0]}"))
    return found
