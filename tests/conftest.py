"""Session-wide synthetic datasets and shards, generated once through the real code paths.

The datasets are written by `data_pipeline.synthetic` in the real on-disk layouts and turned into
shards by the real CLI (`data_pipeline.build_shards.main`), so every test that uses them also
exercises the adapters and the shard builder. They are tiny (tens of images) to keep the suite fast
on a 2-core CPU machine; read sizes and counts from `manifest.json` rather than hard-coding them.

    cxr_root    ChestX-ray14 layout, 60 images of 64x64, seed 0
    cxr_shards  its shards: 48x48 PNG, at most 16 samples per shard (train has several shards),
                validation carved from train_val with --val-fraction 0.2 (so val is not empty)
    us_root     FETAL_PLANES_DB layout, 40 images of about 64 px (varying sizes), seed 0
    us_shards   its shards: 48x48 PNG (padded to square), 16 per shard, --val-fraction 0.2

The fixtures are read-only by convention: a test that needs to damage a dataset copies it first.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from data_pipeline import build_shards
from data_pipeline.synthetic import make_cxr, make_us

CXR_IMAGES, US_IMAGES = 60, 40
SOURCE_SIZE, SHARD_SIZE_PX, SAMPLES_PER_SHARD = 64, 48, 16


def _build(dataset: str, root: Path, out: Path) -> Path:
    build_shards.main(["--dataset", dataset, "--root", str(root), "--out", str(out),
                       "--size", str(SHARD_SIZE_PX), "--shard-size", str(SAMPLES_PER_SHARD),
                       "--val-fraction", "0.2", "--workers", "1", "--quiet"])
    return out


def make_cxr_with_rejects(root: Path, n: int, seed: int, bad: tuple[int, ...]) -> Path:
    """A small synthetic ChestX-ray14 whose images number `bad` (in name order) are truncated PNGs,
    so a build of it has image rejects."""
    make_cxr(root, n, 32, seed=seed)
    images = sorted((root / "images").iterdir())
    for i in bad:
        images[i].write_bytes(images[i].read_bytes()[:40])
    return root


@pytest.fixture(scope="session")
def cxr_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cxr_root")
    make_cxr(root, CXR_IMAGES, SOURCE_SIZE, seed=0)
    return root


@pytest.fixture(scope="session")
def cxr_shards(tmp_path_factory, cxr_root) -> Path:
    return _build("chestxray14", cxr_root, tmp_path_factory.mktemp("cxr_shards"))


@pytest.fixture(scope="session")
def us_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("us_root")
    make_us(root, US_IMAGES, SOURCE_SIZE, seed=0)
    return root


@pytest.fixture(scope="session")
def us_shards(tmp_path_factory, us_root) -> Path:
    return _build("fetal_planes", us_root, tmp_path_factory.mktemp("us_shards"))


def _random_teacher(tmp_path_factory, classes: int) -> Path:
    """A resnet18 teacher checkpoint in the format the project writes; random weights are enough
    to exercise distillation end to end."""
    import torch

    from rmsnet.teachers import create_tapped_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(f"teacher{classes}") / "model.pt"
    torch.save({"model": create_tapped_model("resnet18", classes, in_chans=3).model.state_dict(),
                "meta": {"arch": "resnet18"}}, path)
    return path


@pytest.fixture(scope="session")
def random_teacher(tmp_path_factory) -> Path:
    """Teacher checkpoint for the 14 chest findings."""
    return _random_teacher(tmp_path_factory, 14)


@pytest.fixture(scope="session")
def us_teacher(tmp_path_factory) -> Path:
    """Teacher checkpoint for the 6 fetal planes."""
    return _random_teacher(tmp_path_factory, 6)
