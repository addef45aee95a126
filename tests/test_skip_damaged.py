"""`data.on_damaged: skip`: every sample of the splits used is read once before the run (each rank
its share of the shards), the damaged ones are listed the same on every rank, and both loaders
leave them out while every rank still gets the same number of batches."""
from __future__ import annotations

import json
import shutil

import pytest

from _damage import damage
from data_pipeline.loader import build_loader
from data_pipeline.loader_common import batches_per_epoch
from data_pipeline.manifest import read_manifest
from data_pipeline.read_checks import DamagedShard, check_shard_files, first_damaged_sample, scan_samples
from data_pipeline.torch_loader import read_keyed_index
from launcher.read_faults import SKIPPED_FILE, Skipped, check_shards


@pytest.fixture
def shards(cxr_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(cxr_shards, out)
    return out


def _damage_three(shards):
    """A label of 255 and an undecodable PNG in train, a test shard cut short: (train label,
    train image, test shard path, keys past the cut)."""
    label = damage(shards, "train", 1, 3, "lbl", b"\xff")
    image = damage(shards, "train", 0, 2, "png", b"\x00" * 16)
    last = read_manifest(shards)["splits"]["test"]["shards"][-1]
    path = shards / last["name"]
    entries = read_keyed_index(str(path), str(shards / last["index"]))
    cut = entries[-2][2]["png"][0] + 8  # inside the second-last sample's image
    path.write_bytes(path.read_bytes()[:cut])
    return label, image, path, [key for _, key, _ in entries[-2:]]


def test_the_scan_finds_every_damaged_sample_through_the_index_and_splits_shards_over_ranks(shards):
    m = read_manifest(shards)
    assert scan_samples(shards, m, ["train", "val", "test"]) == []
    (ltar, lkey), (itar, ikey), cut, past = _damage_three(shards)
    found = scan_samples(shards, m, ["train", "val", "test"])
    size = cut.stat().st_size
    assert [(s, k) for s, k, _ in found] == [("train", ikey), ("train", lkey), ("test", past[0]), ("test", past[1])]
    assert found[0][2] == (f"{itar}: sample {ikey}: image does not decode: PIL cannot identify the image "
                           f"format (the header is damaged or not an image)")
    assert found[1][2].startswith(f"{ltar}: sample {lkey}: label vector [255, ")
    assert found[2][2] == (f"{cut}: sample {past[0]}: .png, .lbl, .sid, .json lie past the end of the "
                           f"file ({size} bytes: truncated)")
    assert found[3][2] == found[2][2].replace(past[0], past[1])
    # shard i of the combined list is rank i % world's: together the ranks find the same
    halves = [scan_samples(shards, m, ["train", "val", "test"], r, 2) for r in (0, 1)]
    assert sorted(halves[0] + halves[1]) == sorted(found) and all(halves)
    # `only`: the shards named (those whose sha256 differs from the manifest, in sha256 mode)
    label_shard = m["splits"]["train"]["shards"][1]["name"]
    assert scan_samples(shards, m, ["train", "val", "test"], only={label_shard}) == [found[1]]
    # what the loaders' own fallback search passes over
    tars = [str(shards / s["name"]) for s in m["splits"]["train"]["shards"]]
    assert first_damaged_sample(tars, m, "train", frozenset({ikey, lkey})) is None


def test_skip_mode_turns_changed_shards_into_warnings_but_missing_files_stay_errors(shards):
    m = read_manifest(shards)
    assert check_shards(shards, m, ["train"], "sha256", 0, 1) == Skipped()  # stop: nothing scanned
    clean = check_shards(shards, m, ["train", "val"], "sha256", 0, 1, "skip")
    assert clean == Skipped((), (), True)
    assert clean.document(["train", "val"]) == {"counts": {"train": 0, "val": 0}, "samples": [],
                                                "shards_changed": []}
    (ltar, lkey), (itar, ikey), cut, past = _damage_three(shards)
    with pytest.raises(DamagedShard, match="sha256 differs from the manifest"):
        check_shards(shards, m, ["train"], "sha256", 0, 1)
    skipped = check_shards(shards, m, ["train", "val", "test"], "sha256", 0, 1, "skip")
    assert skipped.keys("train") == {lkey, ikey} and skipped.keys("test") == set(past)
    by_size = check_shards(shards, m, ["train", "val", "test"], "size", 0, 1, "skip")  # every shard read
    assert by_size.samples == skipped.samples and len(by_size.changed) == 1  # only the cut one's size differs
    assert skipped.count("val") == 0 and skipped.count("test") == 2
    assert skipped.changed == tuple(sorted([
        f"{itar}: sha256 differs from the manifest (the shard was changed after the build)",
        f"{ltar}: sha256 differs from the manifest (the shard was changed after the build)",
        f"{cut}: {cut.stat().st_size} bytes, the manifest records {m['splits']['test']['shards'][-1]['bytes']} "
        f"(truncated or replaced after the build)"]))
    lines = skipped.report(["train", "val", "test"], shards / SKIPPED_FILE)
    assert lines[:3] == [f"warning: {c}; its samples were read one by one (data.on_damaged: skip)"
                         for c in skipped.changed]
    assert lines[3] == (f"warning: skipping 2 damaged samples of split 'train' (listed in "
                        f"{shards / SKIPPED_FILE}), the first: {skipped.samples[0][2]}")
    assert lines[4].startswith("warning: skipping 2 damaged samples of split 'test' (listed in ")
    written = json.loads(skipped.write(shards, ["train", "val", "test"]).read_text())
    assert written["counts"] == {"train": 2, "val": 0, "test": 2}
    assert [s["key"] for s in written["samples"]] == [k for _, k, _ in skipped.samples]
    assert not (shards / (SKIPPED_FILE + ".part")).exists()

    index = shards / m["splits"]["val"]["shards"][0]["index"]
    index.write_text(index.read_text().replace("png ", "png", 1))
    with pytest.raises(DamagedShard, match=rf"^{index}: line 2 is not a DALI index entry; rebuild the shards; "):
        check_shards(shards, m, ["val"], "size", 0, 1, "skip")
    (shards / m["splits"]["val"]["shards"][0]["name"]).unlink()
    with pytest.raises(DamagedShard, match="shard listed in the manifest is missing"):
        check_shards(shards, m, ["val"], "size", 0, 1, "skip")
    assert check_shard_files(shards, m, ["train"], "sha256", changed=[]) == []
    with pytest.raises(ValueError, match="data.on_damaged must be stop or skip, got 'ignore'"):
        check_shards(shards, m, ["val"], "size", 0, 1, "ignore")


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_both_loaders_leave_the_skipped_samples_out_and_ranks_still_get_equal_batch_counts(shards, backend):
    m = read_manifest(shards)
    n = m["splits"]["train"]["samples"]
    (_, lkey), (_, ikey), _, _ = _damage_three(shards)
    skip = check_shards(shards, m, ["train"], "size", 0, 1, "skip").keys("train")
    assert skip == {lkey, ikey}
    keys = [key for s in m["splits"]["train"]["shards"]  # sample ids run 0..n-1 in shard order
            for _, key, _ in read_keyed_index(str(shards / s["name"]), str(shards / s["index"]))]
    every = dict(enumerate(keys))
    bs, seen = 4, set()
    for train in (False, True):
        lengths = []
        for rank in (0, 1):
            loader = build_loader(shards, "train", backend=backend, batch_size=bs, image_size=48, train=train,
                                  rank=rank, world_size=2, skip=skip)
            batches = list(loader)
            lengths.append((len(loader), len(batches)))
            for b in batches:
                assert b["label"].max() <= 1
                seen |= set(b["sid"].tolist())
        expected = batches_per_epoch(n - 2, 2, bs)
        assert lengths == [(expected, expected)] * 2, lengths
    assert {every[s] for s in seen} == set(every.values()) - skip


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_a_split_left_too_small_by_skipping_is_one_agreed_error(shards, backend):
    from data_pipeline.read_checks import DamagedSample
    from launcher.read_faults import agreed_loader

    m = read_manifest(shards)
    shard = m["splits"]["val"]["shards"][0]
    keys = [k for _, k, _ in read_keyed_index(str(shards / shard["name"]), str(shards / shard["index"]))]
    build = lambda skip: agreed_loader(lambda: build_loader(  # noqa: E731
        shards, "val", backend=backend, batch_size=2, image_size=48, train=False, rank=0, world_size=2,
        skip=frozenset(skip)), None)
    with pytest.raises(DamagedSample) as e:
        build(keys)  # nothing left
    assert str(e.value) in (f"every sample of {shards / shard['name']} is damaged: nothing is left to read",
                            f"{shards}: split 'val' has 0 samples once {len(keys)} damaged ones are skipped, "
                            f"fewer than the 2 ranks it must be split over")
    assert len(build(keys[:-2])) == 1  # two left: one each
