"""The two-stage recipe on the synthetic ultrasound set, on two CPU ranks, and resuming mid-recipe.

Through the real `deepspeed` launcher; marked slow (about a minute), run in CI.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _launch import REPO, assert_same_student, deepspeed_cmd, run, tiny_run_args

CFG = REPO / "launcher" / "configs" / "synthetic_us_two_stage.yaml"
STAGES = ("stages=[{name: hint, epochs: 1, loss: {task_weight: 0, kd_weight: 0, hint_weight: 1.0}},"
          " {name: kd, epochs: 2, lr: 0.002, loss: {task_weight: 1, focal_alpha: null, kd_weight: 1}}]")
BATCH = 4


def _args(shards, out, teacher, *extra):
    return tiny_run_args(CFG, shards, out, teacher, f"train.batch_size_per_gpu={BATCH}",
                         "train.keep_checkpoints=0", STAGES) + list(extra)


def _steps_per_epoch(shards, ranks=2) -> int:
    n = json.loads((Path(shards) / "manifest.json").read_text())["splits"]["train"]["samples"]
    return math.ceil(math.ceil(n / ranks) / BATCH)


@pytest.mark.slow
def test_two_stage_recipe_runs_hint_then_kd_and_resume_inside_kd_matches_uninterrupted(
        us_shards, us_teacher, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    full = run(deepspeed_cmd(2, *_args(us_shards, tmp_path / "full", us_teacher)))
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    run_dir = tmp_path / "full" / "two_stage"
    assert (run_dir / "stages" / "hint" / "model.pt").is_file() and (run_dir / "stages" / "kd" / "model.pt").is_file()
    hint_export = torch.load(run_dir / "stages" / "hint" / "model.pt", weights_only=True)
    assert hint_export["adapters"], "stage-1 adapters are saved with the student"
    tags = {d.name for d in (run_dir / "checkpoints").iterdir() if d.is_dir()}
    spe = _steps_per_epoch(us_shards)
    assert tags == {f"hint-e0001-s{spe:08d}", f"kd-e0001-s{2 * spe:08d}", f"kd-e0002-s{3 * spe:08d}"}
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    hint_steps = [e.step for e in acc.Scalars("train/hint")]
    kd_steps = [e.step for e in acc.Scalars("train/kd")]
    assert hint_steps == list(range(1, spe + 1))           # stage 1: the hint term only
    assert kd_steps == list(range(spe + 1, 3 * spe + 1))   # stage 2: KD (and the task term)
    assert "train/task" in acc.Tags()["scalars"]

    # Interrupted after the first KD epoch, then resumed: the same final student, bit for bit.
    part = run(deepspeed_cmd(2, *_args(us_shards, tmp_path / "split", us_teacher,
                                         "--set", f"train.max_steps={2 * spe}")))
    assert part.returncode == 0, part.stdout[-3000:] + part.stderr[-3000:]
    resumed = run(deepspeed_cmd(2, *_args(us_shards, tmp_path / "split", us_teacher), "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from kd-e0001-s{2 * spe:08d}" in resumed.stdout
    assert_same_student(run_dir, tmp_path / "split" / "two_stage")
