"""A run killed with SIGKILL mid-epoch and resumed with `--resume auto` ends exactly where an
uninterrupted run ends: same parameters, same sequence of samples per rank (data position, model,
optimizer, scheduler and every rank's RNG state all come back).

Two CPU ranks through the real `deepspeed` launcher; marked slow, run in CI.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from _launch import REPO, assert_same_student, deepspeed_cmd, run, run_signalled_at, tiny_run_args

CFG = REPO / "launcher" / "configs" / "demo_distill.yaml"


def _args(shards, out, teacher):
    # 2 ranks x batch 2 over the fixture's train split: several steps per epoch, so a checkpoint
    # every 2 steps lands inside an epoch.
    return tiny_run_args(CFG, shards, out, teacher, "train.batch_size_per_gpu=2", "train.epochs=2",
                         "train.checkpoint_every_steps=2", "train.keep_checkpoints=0",
                         "train.log_sample_ids=true",
                         "student.drop_rate=0.2")  # dropout: the RNG state must be restored too


def _kill_after(cmd, step: int) -> str:
    """Start `cmd` in its own process group; SIGKILL the whole group once `step` is logged."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    seen, deadline = [], time.time() + 400
    try:
        for line in proc.stdout:
            seen.append(line)
            if f"[step {step:>6}/" in line or time.time() > deadline:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    return "".join(seen)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_auto_matches_the_uninterrupted_run(cxr_shards, random_teacher,
                                                                         tmp_path):
    teacher = random_teacher
    full = run(deepspeed_cmd(2, *_args(cxr_shards, tmp_path / "full", teacher)))
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]

    out = _kill_after(deepspeed_cmd(2, *_args(cxr_shards, tmp_path / "killed", teacher)), step=5)
    assert "[step      5/" in out, out[-3000:]
    ckpts = tmp_path / "killed" / "student" / "checkpoints"
    assert any("b0" in d.name for d in ckpts.iterdir()), "no checkpoint inside an epoch was written"
    resumed = run(deepspeed_cmd(2, *_args(cxr_shards, tmp_path / "killed", teacher), "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from main-e" in resumed.stdout
    assert re.search(r"taking over the stale lock of pid \d+ on .*: process \d+ is no longer running",
                     resumed.stdout), resumed.stdout[-3000:]

    assert_same_student(tmp_path / "full" / "student", tmp_path / "killed" / "student")
    for rank in (0, 1):
        ids_full = (tmp_path / "full" / "student" / "sample_ids" / f"rank{rank}.txt").read_text()
        ids_resumed = (tmp_path / "killed" / "student" / "sample_ids" / f"rank{rank}.txt").read_text()
        assert ids_full == ids_resumed and ids_full.count("\n") > 5


@pytest.mark.slow
def test_sigusr1_checkpoints_exits_75_and_resumes_exactly(cxr_shards, random_teacher, tmp_path):
    """What `#SBATCH --signal=USR1@300` triggers, without SLURM: one process, SIGUSR1 mid-epoch."""
    from launcher.preemption import EXIT_PREEMPTED, PREEMPTED_MARKER
    from _launch import python_cmd

    args = lambda out: tiny_run_args(CFG, cxr_shards, out, random_teacher, "train.batch_size_per_gpu=4",
                                     "train.epochs=2", "train.keep_checkpoints=0",
                                     "student.drop_rate=0.2", "train.log_sample_ids=true")
    full = run(python_cmd(*args(tmp_path / "full")))
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]

    status, out = run_signalled_at(python_cmd(*args(tmp_path / "stopped")), "[step      3/")
    assert status == EXIT_PREEMPTED, out[-3000:]
    run_dir = tmp_path / "stopped" / "student"
    assert (run_dir / PREEMPTED_MARKER).is_file()
    assert "stopped on request at step" in out

    resumed = run(python_cmd(*args(tmp_path / "stopped"), "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert not (run_dir / PREEMPTED_MARKER).exists()
    assert_same_student(tmp_path / "full" / "student", run_dir)
    ids = [(d / "sample_ids" / "rank0.txt").read_text() for d in (tmp_path / "full" / "student", run_dir)]
    assert ids[0] == ids[1]
