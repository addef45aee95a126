"""Shards damaged after the build, met by real runs: two DeepSpeed ranks stop together on one
line (the pre-run check against the manifest; a damaged sample mid-epoch with either loader) and
leave no model behind; evaluate.py refuses the same shards. Marked slow, run in CI."""
from __future__ import annotations

import re
import shutil
import sys

import pytest

from _launch import REPO, deepspeed_cmd, python_cmd, run, tiny_run_args
from data_pipeline.manifest import read_manifest
from data_pipeline.torch_loader import read_keyed_index

CFG = REPO / "launcher" / "configs" / "demo_distill.yaml"
EVALUATE = REPO / "launcher" / "evaluate.py"


def _one_error_line(proc) -> str:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    return errors[0]


def _damage(shards, split: str, shard_no: int, sample_no: int, ext: str, data: bytes):
    """Overwrite the start of one member in place; (tar, key)."""
    shard = read_manifest(shards)["splits"][split]["shards"][shard_no]
    tar, key, members = read_keyed_index(str(shards / shard["name"]), str(shards / shard["index"]))[sample_no]
    with open(tar, "r+b") as f:
        f.seek(members[ext][0])
        f.write(data)
    return tar, key


@pytest.mark.slow
def test_damaged_shards_stop_training_and_evaluation_with_one_line_naming_shard_and_sample(
        cxr_shards, random_teacher, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(cxr_shards, shards)
    args = lambda name, *extra: tiny_run_args(  # noqa: E731
        CFG, shards, tmp_path, random_teacher, f"run.name={name}", "train.batch_size_per_gpu=2",
        "train.warmup_steps=1", *extra)
    sound = run(python_cmd(*args("sound", "train.max_steps=2")))
    assert sound.returncode == 0, sound.stdout[-2000:] + sound.stderr[-3000:]

    train_tar, train_key = _damage(shards, "train", 1, 3, "lbl", b"\xff")
    # during the epoch (the size check passes): every rank stops at the damaged batch
    for loader in ("torch", "dali"):
        name = f"read_{loader}"
        proc = run(deepspeed_cmd(2, *args(name, "data.verify=size", f"data.loader={loader}")))
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
        line = _one_error_line(proc)
        assert re.fullmatch(rf"error: {re.escape(train_tar)}: sample {train_key}: label vector \[255, [0-9, ]+\] "
                            rf"is not multi-hot \(0/1\); the run stopped there \(its last checkpoint is kept: "
                            rf"fix or rebuild the shards, then --resume auto\)", line), line
        assert not (tmp_path / name / "final").exists() and not (tmp_path / name / "best").exists()
        assert not (tmp_path / name / "run.lock").exists()

    val_tar, val_key = _damage(shards, "val", 0, 1, "png", b"\x00" * 16)
    hint = f"; rebuild the shards, or list every problem with python -m data_pipeline.build_shards " \
           f"--verify-only --out {shards}"
    # before training: rank 1 checks train-000001 and val-000000 (shard i is rank i % 2's)
    checked = run(deepspeed_cmd(2, *args("checked")))
    assert checked.returncode == 2
    assert _one_error_line(checked) == (f"error: {train_tar}: sha256 differs from the manifest (the shard "
                                        f"was changed after the build) (and 1 more on this rank){hint}")
    assert not (tmp_path / "checked" / "checkpoints").exists()
    assert not (tmp_path / "checked" / "run.lock").exists()

    evaluate = lambda *extra: run([sys.executable, str(EVALUATE), "--checkpoint",  # noqa: E731
                                   str(tmp_path / "sound"), "--no-teacher", "--bootstrap", "20", *extra])
    refused = evaluate()
    assert refused.returncode == 2
    assert _one_error_line(refused) == (f"error: {val_tar}: sha256 differs from the manifest (the shard was "
                                        f"changed after the build){hint}")
    unchecked = evaluate("--verify", "none", "--loader", "torch")  # DALI may crash on it (docs/design.md)
    assert unchecked.returncode == 2
    assert re.fullmatch(rf"error: {re.escape(val_tar)}: sample {val_key}: image does not decode: .+",
                        _one_error_line(unchecked))
    assert not (tmp_path / "sound" / "eval").exists()
