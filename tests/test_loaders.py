"""The DALI loader (CPU-only mode, device_id=None) and the plain torch fallback read the same shards
into the same batches: same sids and labels per rank, same number of batches on every rank, every
sample of a split scored exactly once after dropping the padding by sid, and pixel values equal
within 1/255 on the evaluation path.

Ground truth (labels, pixels per sid) is read straight from the tars with `webdataset` + PIL.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data_pipeline import build_shards
from data_pipeline.loader import build_loader
from data_pipeline.loader_common import AugmentSpec

BACKENDS = ("dali", "torch")
WORLD = 2
AUGMENT = AugmentSpec(crop_scale=(0.7, 1.0), hflip=0.5, rotate_degrees=10.0, brightness=0.2,
                      contrast=0.2)


def _manifest(shard_dir) -> dict:
    return json.loads((Path(shard_dir) / "manifest.json").read_text())


def _truth(shard_dir, split: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """sid -> (label vector, stored pixels), read directly from the split's tars."""
    m = _manifest(shard_dir)
    ext = m["image"]["ext"]
    tars = [str(Path(shard_dir) / s["name"]) for s in m["splits"][split]["shards"]]
    out = {}
    for s in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
        sid = int(np.frombuffer(s["sid"], dtype="<i8")[0])
        if ext == "raw":
            size = m["image"]["size"]
            pixels = np.frombuffer(s["raw"], dtype=np.uint8).reshape(size, size)
        else:
            pixels = np.asarray(Image.open(io.BytesIO(s[ext])))
        out[sid] = (np.frombuffer(s["lbl"], dtype=np.uint8), pixels)
    return out


def _load(shard_dir, split, backend, *, batch_size, rank=0, world_size=WORLD, train=False, epoch=0,
          image_size=None, augment=None, seed=0):
    size = image_size or _manifest(shard_dir)["image"]["size"]
    loader = build_loader(shard_dir, split, backend=backend, batch_size=batch_size, image_size=size,
                          train=train, rank=rank, world_size=world_size, seed=seed, augment=augment,
                          epoch=epoch)
    batches = list(loader)
    assert len(batches) == len(loader), "len(loader) must be the number of batches it yields"
    return batches


def _sids(batches) -> list[int]:
    return [int(s) for b in batches for s in b["sid"]]


def _rank_range(n: int, shard: int, world: int) -> list[int]:
    """DALI's contiguous sharding: shard k of w holds [n*k//w, n*(k+1)//w)."""
    return list(range(n * shard // world, n * (shard + 1) // world))


CASES = [  # (shards fixture, split, batch size): per-rank counts that the batch size does not divide
    ("cxr_shards", "train", 3),
    ("cxr_shards", "test", 5),
    ("us_shards", "train", 4),
    ("us_shards", "val", 2),
]


@pytest.mark.parametrize("epoch", [0, 1])
@pytest.mark.parametrize("shards_fixture,split,batch_size", CASES)
def test_dali_and_torch_eval_loaders_agree_per_rank_and_score_every_sample_exactly_once(
        request, shards_fixture, split, batch_size, epoch):
    shard_dir = request.getfixturevalue(shards_fixture)
    n = _manifest(shard_dir)["splits"][split]["samples"]
    truth = _truth(shard_dir, split)
    assert sorted(truth) == list(range(n))
    per_rank_counts = [len(_rank_range(n, r, WORLD)) for r in range(WORLD)]
    assert any(c % batch_size for c in per_rank_counts), "the case must exercise padding"

    n_batches, scored = set(), {}
    for rank in range(WORLD):
        dali = _load(shard_dir, split, "dali", batch_size=batch_size, rank=rank, epoch=epoch)
        tch = _load(shard_dir, split, "torch", batch_size=batch_size, rank=rank, epoch=epoch)
        assert len(dali) == len(tch)
        n_batches.add(len(dali))
        for bd, bt in zip(dali, tch):
            assert bd["sid"].tolist() == bt["sid"].tolist()
            assert torch.equal(bd["label"], bt["label"])
            torch.testing.assert_close(bd["image"], bt["image"], atol=1 / 255 + 1e-6, rtol=0)

        # the rank reads one contiguous shard (rotating with epoch), then repeats its last sample
        own = _rank_range(n, (rank + epoch) % WORLD, WORLD)
        sids = _sids(dali)
        assert len(sids) == len(dali) * batch_size
        assert sids[: len(own)] == own and set(sids[len(own):]) <= {own[-1]}

        for b in dali:
            for sid, label in zip(b["sid"].tolist(), b["label"]):
                np.testing.assert_array_equal(label.numpy(), truth[sid][0])
        for sid in set(sids):  # dedupe by sid, as distributed evaluation does
            scored[sid] = scored.get(sid, 0) + 1

    assert len(n_batches) == 1, f"ranks yield different numbers of batches: {n_batches}"
    assert sorted(scored) == list(range(n)), "after dedupe the union over ranks must be the split"
    assert all(count == 1 for count in scored.values()), "a sample was scored on two ranks"


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_images_are_the_stored_pixels_scaled_to_unit_range(cxr_shards, backend):
    truth = _truth(cxr_shards, "test")
    for b in _load(cxr_shards, "test", backend, batch_size=5, world_size=1):
        for sid, img in zip(b["sid"].tolist(), b["image"]):
            np.testing.assert_allclose(img[0].numpy() * 255.0, truth[sid][1], atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train,image_size", [(False, 48), (False, 32), (True, 32), (True, 48)])
def test_batches_have_documented_shapes_dtypes_and_value_range(us_shards, backend, train, image_size):
    classes = len(_manifest(us_shards)["label_names"])
    batches = _load(us_shards, "train", backend, batch_size=4, rank=1, train=train,
                    image_size=image_size, augment=AUGMENT)
    assert batches
    for b in batches:
        img, label, sid = b["image"], b["label"], b["sid"]
        assert img.shape == (4, 1, image_size, image_size) and img.dtype == torch.float32
        assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0
        assert label.shape == (4, classes) and label.dtype == torch.float32
        assert torch.all(label.sum(1) == 1)  # fetal planes: one-hot
        assert sid.shape == (4,) and sid.dtype == torch.int64


@pytest.mark.parametrize("backend", BACKENDS)
def test_augmented_train_loader_reads_the_ranks_shard_in_shuffled_order_on_every_rank(cxr_shards,
                                                                                      backend):
    n = _manifest(cxr_shards)["splits"]["train"]["samples"]
    truth = _truth(cxr_shards, "train")
    counts = set()
    for rank in range(WORLD):
        batches = _load(cxr_shards, "train", backend, batch_size=6, rank=rank, train=True,
                        image_size=32, augment=AUGMENT, epoch=1, seed=3)
        plain = {sid: img for b in _load(cxr_shards, "train", backend, batch_size=6, rank=rank,
                                         image_size=32, epoch=1)
                 for sid, img in zip(b["sid"].tolist(), b["image"])}
        changed = [float((img - plain[sid]).abs().max()) > 0.05
                   for b in batches for sid, img in zip(b["sid"].tolist(), b["image"])]
        assert sum(changed) > len(changed) // 2, "augmentation must change most images"
        counts.add(len(batches))
        own = _rank_range(n, (rank + 1) % WORLD, WORLD)
        sids = _sids(batches)
        assert set(sids) == set(own)  # the whole shard, nothing from the other rank
        assert sids[: len(own)] != own  # shuffled
        for b in batches:
            assert b["image"].shape[-2:] == (32, 32)
            for sid, label in zip(b["sid"].tolist(), b["label"]):
                np.testing.assert_array_equal(label.numpy(), truth[sid][0])
    assert len(counts) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_order_is_a_function_of_seed_epoch_and_rank(cxr_shards, backend):
    """A loader rebuilt for epoch e after a restart yields the same batches (exact resume)."""
    def order(seed, epoch):
        return _sids(_load(cxr_shards, "train", backend, batch_size=8, rank=0, train=True,
                           augment=AugmentSpec.none(), seed=seed, epoch=epoch))
    first = order(5, 2)
    assert order(5, 2) == first
    assert order(6, 2) != first  # another seed, another order
    assert order(5, 4) != first  # same shard (epoch 4 = epoch 2 mod 2 ranks), another order


@pytest.mark.parametrize("fmt,atol", [("raw", 1e-6), ("jpeg", 2 / 255 + 1e-6)])
def test_raw_and_jpeg_shards_load_the_same_through_both_backends(cxr_root, tmp_path, fmt, atol):
    out = tmp_path / fmt
    build_shards.main(["--dataset", "chestxray14", "--root", str(cxr_root), "--out", str(out),
                       "--size", "48", "--shard-size", "16", "--format", fmt, "--workers", "1",
                       "--quiet"])
    truth = _truth(out, "test")
    dali = _load(out, "test", "dali", batch_size=5, world_size=1)
    tch = _load(out, "test", "torch", batch_size=5, world_size=1)
    assert len(dali) == len(tch)
    for bd, bt in zip(dali, tch):
        assert bd["sid"].tolist() == bt["sid"].tolist()
        torch.testing.assert_close(bd["image"], bt["image"], atol=atol, rtol=0)
        if fmt == "raw":
            for sid, img in zip(bd["sid"].tolist(), bd["image"]):
                np.testing.assert_allclose(img[0].numpy() * 255.0, truth[sid][1], atol=1e-3)


@pytest.mark.parametrize("backend", ["dali", "torch", "auto"])
def test_missing_shard_dir_raises_file_not_found_naming_manifest_json(tmp_path, backend):
    missing = tmp_path / "no_shards_here"
    with pytest.raises(FileNotFoundError, match="manifest.json") as e:
        build_loader(missing, "train", backend=backend, batch_size=4, image_size=48, train=False)
    assert str(missing) in str(e.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unknown_split_raises_value_error_naming_it(cxr_shards, backend):
    with pytest.raises(ValueError, match="'validation'"):
        build_loader(cxr_shards, "validation", backend=backend, batch_size=4, image_size=48,
                     train=False)


def test_unknown_backend_is_refused(cxr_shards):
    with pytest.raises(ValueError, match="dali, torch or auto"):
        build_loader(cxr_shards, "train", backend="tf", batch_size=4, image_size=48, train=False)


def test_dali_refuses_more_ranks_than_samples_when_built(cxr_shards):
    n = _manifest(cxr_shards)["splits"]["val"]["samples"]
    with pytest.raises(RuntimeError, match="number of shards"):
        build_loader(cxr_shards, "val", backend="dali", batch_size=2, image_size=48, train=False,
                     rank=0, world_size=n + 1)


def test_torch_loader_refuses_more_ranks_than_samples_when_built(cxr_shards):
    n = _manifest(cxr_shards)["splits"]["val"]["samples"]
    with pytest.raises(ValueError, match="val"):
        loader = build_loader(cxr_shards, "val", backend="torch", batch_size=2, image_size=48,
                              train=False, rank=0, world_size=n + 1)
        list(loader)
