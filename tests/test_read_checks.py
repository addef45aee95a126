"""Shards damaged after the build, met at read time: the pre-run check against the manifest (size,
sha256, split across ranks) and damaged samples in both loaders, each named by shard and key."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from data_pipeline.loader import build_loader
from data_pipeline.manifest import read_manifest
from data_pipeline.read_checks import DamagedSample, check_shard_files, first_damaged_sample
from data_pipeline.torch_loader import read_keyed_index
from launcher.read_faults import AgreedBatches, _one_line


@pytest.fixture
def shards(cxr_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(cxr_shards, out)
    return out


def _member(shards, split: str, shard_no: int, sample_no: int, ext: str):
    """(tar path, sample key, (offset, size)) of one member of one sample."""
    m = read_manifest(shards)
    shard = m["splits"][split]["shards"][shard_no]
    tar, key, members = read_keyed_index(str(shards / shard["name"]), str(shards / shard["index"]))[sample_no]
    return tar, key, members[ext]


def _overwrite(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _read_all(shards, split: str, backend: str, batch_size: int = 4):
    loader = build_loader(shards, split, backend=backend, batch_size=batch_size, image_size=48, train=False)
    return [b for b in AgreedBatches(loader, None)]


def test_the_check_before_a_run_finds_size_and_sha256_changes_and_splits_shards_across_ranks(shards):
    m = read_manifest(shards)
    assert check_shard_files(shards, m, ["train", "val", "test"]) == []
    tar, key, (offset, size) = _member(shards, "train", 1, 2, "lbl")
    _overwrite(tar, offset, b"\x07")  # same size, other bytes
    assert check_shard_files(shards, m, ["train"], "sha256") == [
        f"{tar}: sha256 differs from the manifest (the shard was changed after the build)"]
    assert check_shard_files(shards, m, ["train"], "size") == []  # size only: not seen
    assert check_shard_files(shards, m, ["train"], "none") == []
    # shard i is rank i % world's: train-000001 is rank 1 of 2's
    assert check_shard_files(shards, m, ["train"], "sha256", rank=0, world_size=2) == []
    assert len(check_shard_files(shards, m, ["train"], "sha256", rank=1, world_size=2)) == 1
    last = shards / m["splits"]["test"]["shards"][-1]["name"]
    last.write_bytes(last.read_bytes()[:-1024])
    assert check_shard_files(shards, m, ["test"], "size") == [
        f"{last}: {last.stat().st_size} bytes, the manifest records {last.stat().st_size + 1024} "
        f"(truncated or replaced after the build)"]
    last.unlink()
    assert check_shard_files(shards, m, ["test"], "size") == [f"{last}: shard listed in the manifest is missing"]
    with pytest.raises(ValueError, match="data.verify must be one of sha256, size, none, got 'md5'"):
        check_shard_files(shards, m, ["test"], "md5")


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_a_label_that_is_not_0_or_1_stops_reading_naming_shard_and_sample(shards, backend):
    tar, key, (offset, _) = _member(shards, "train", 1, 3, "lbl")
    _overwrite(tar, offset, b"\xff")
    with pytest.raises(DamagedSample) as e:
        _read_all(shards, "train", backend)
    assert str(e.value).startswith(f"{tar}: sample {key}: label vector [255, ")
    assert str(e.value).endswith("] is not multi-hot (0/1)")


def test_an_image_that_does_not_decode_stops_reading_naming_shard_and_sample(shards):
    tar, key, (offset, size) = _member(shards, "val", 0, 1, "png")
    _overwrite(tar, offset, b"\x00" * 16)  # the PNG signature and header gone
    with pytest.raises(DamagedSample) as e:
        _read_all(shards, "val", "torch")
    assert str(e.value) == (f"{tar}: sample {key}: image does not decode: PIL cannot identify the image "
                            f"format (the header is damaged or not an image)")


def test_a_dali_pipeline_failure_is_named_by_the_sample_behind_it(shards):
    """DALI's own error names no file; `_damaged` re-reads the shards to find the sample. (The
    pipeline is not run on the damaged image here: DALI 2.4's CPU decoder at times crashes the
    process on one instead of raising; the size/sha256 check before a run is what stops those.)"""
    from data_pipeline.dali_loader import _damaged

    m = read_manifest(shards)
    tars = [str(shards / s["name"]) for s in m["splits"]["val"]["shards"]]
    dali_error = RuntimeError("Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.decoders."
                              "image`,\n\nencountered:\n\nnvImageCodec failure: '#4'\nCurrent pipeline "
                              "object is no longer valid.")
    assert _damaged(dali_error, tars, m, "val") is dali_error  # every sample reads: the error stands
    tar, key, (offset, _) = _member(shards, "val", 0, 1, "png")
    _overwrite(tar, offset, b"\x00" * 16)
    named = _damaged(dali_error, tars, m, "val")
    assert isinstance(named, DamagedSample)
    assert str(named).startswith(f"{tar}: sample {key}: image does not decode: ")
    assert str(named).endswith(" (DALI: nvImageCodec failure: '#4')")


def test_the_undamaged_shards_read_the_same_through_the_check(shards):
    batches = _read_all(shards, "val", "torch")
    plain = list(build_loader(shards, "val", backend="torch", batch_size=4, image_size=48, train=False))
    assert len(batches) == len(plain)
    for a, b in zip(batches, plain):
        assert np.array_equal(a["image"].numpy(), b["image"].numpy()) and np.array_equal(a["sid"], b["sid"])


def test_first_damaged_sample_scans_in_order_and_finds_none_in_sound_shards(shards):
    m = read_manifest(shards)
    tars = [str(shards / s["name"]) for s in m["splits"]["train"]["shards"]]
    assert first_damaged_sample(tars, m, "train") is None
    tar, key, (offset, _) = _member(shards, "train", 2, 0, "lbl")
    _overwrite(tar, offset, b"\x02")
    assert first_damaged_sample(tars, m, "train").startswith(f"{tar}: sample {key}: label vector [2, ")


def test_a_worker_reraised_message_comes_back_to_one_line():
    inner = DamagedSample("s/train-000001.tar: sample 00000001_000: image does not decode: x")
    wrapped = DamagedSample("Caught DamagedSample in DataLoader worker process 0.\nOriginal Traceback "
                            "(most recent call last):\n  File \"x.py\", line 1\ndata_pipeline.read_checks."
                            f"DamagedSample: {inner}")
    assert _one_line(wrapped) == str(inner)
    assert _one_line(inner) == str(inner)
