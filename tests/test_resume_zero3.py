"""Resuming a ZeRO-3 run (parameters partitioned over ranks) gives the uninterrupted result."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from _launch import REPO, assert_same_student, deepspeed_cmd, run, tiny_run_args

CFG = REPO / "launcher" / "configs" / "demo_distill.yaml"
BATCH = 4


def _args(shards, out, teacher, *extra):
    return tiny_run_args(CFG, shards, out, teacher, f"train.batch_size_per_gpu={BATCH}", "train.epochs=2",
                         "train.zero_stage=3") + list(extra)


@pytest.mark.slow
def test_zero3_run_resumed_after_one_epoch_matches_the_uninterrupted_run(cxr_shards, random_teacher,
                                                                       tmp_path):
    teacher = random_teacher
    n = json.loads((Path(cxr_shards) / "manifest.json").read_text())["splits"]["train"]["samples"]
    steps_per_epoch = math.ceil(math.ceil(n / 2) / BATCH)
    full = run(deepspeed_cmd(2, *_args(cxr_shards, tmp_path / "full", teacher)))
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    part = run(deepspeed_cmd(2, *_args(cxr_shards, tmp_path / "split", teacher,
                                       "--set", f"train.max_steps={steps_per_epoch}")))
    assert part.returncode == 0, part.stdout[-3000:] + part.stderr[-3000:]
    resumed = run(deepspeed_cmd(2, *_args(cxr_shards, tmp_path / "split", teacher), "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from main-e0001-s{steps_per_epoch:08d}" in resumed.stdout
    assert_same_student(tmp_path / "full" / "student", tmp_path / "split" / "student")
