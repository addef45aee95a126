"""Run-directory ownership and checkpoint integrity, end to end with real processes: a second run
into a run directory in use is refused (two ranks, the holder named), a new run over an earlier one
needs --overwrite, a damaged newest checkpoint is passed over by --resume auto, and a damaged
explicit tag is one error line naming the file. Marked slow, run in CI."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from _launch import REPO, deepspeed_cmd, python_cmd, run, tiny_run_args
from launcher.checkpoints import FILES, check_complete, tags_newest_first

CFG = REPO / "launcher" / "configs" / "demo_distill.yaml"


def _args(shards, out, teacher, *extra):
    return tiny_run_args(CFG, shards, out, teacher, "train.batch_size_per_gpu=2", "train.warmup_steps=1",
                         "train.checkpoint_every_steps=2", "train.keep_checkpoints=0", *extra)


def _one_error_line(proc) -> str:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_a_run_directory_in_use_refuses_a_second_run_and_a_finished_one_needs_overwrite(
        cxr_shards, random_teacher, tmp_path):
    first = deepspeed_cmd(2, *_args(cxr_shards, tmp_path, random_teacher, "train.epochs=50"))
    holder = subprocess.Popen(first, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        seen, deadline = [], time.time() + 300
        for line in holder.stdout:  # wait until it trains (and so holds the lock)
            seen.append(line)
            if "[step      2/" in line or time.time() > deadline:
                break
        assert any("[step      2/" in ln for ln in seen), "".join(seen)[-3000:]
        lock = json.loads((tmp_path / "student" / "run.lock").read_text())
        second = run(deepspeed_cmd(2, *_args(cxr_shards, tmp_path, random_teacher, "train.max_steps=2")))
        assert second.returncode == 2
        line = _one_error_line(second)
        assert re.fullmatch(rf"error: run directory {re.escape(str(tmp_path / 'student'))} is in use by pid {lock['pid']} "
                            rf"on {re.escape(lock['host'])}, started {re.escape(lock['started'])} "
                            rf"\(distill.py distill\): "
                            rf"wait for it to end \(lock file .*run.lock\)", line), line
        assert json.loads((tmp_path / "student" / "run.lock").read_text()) == lock  # still the holder's
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=60)

    # killed: its checkpoints stay, and a new run (no --resume) over them is refused ...
    tags = tags_newest_first(tmp_path / "student" / "checkpoints")
    assert tags
    fresh = run(python_cmd(*_args(cxr_shards, tmp_path, random_teacher, "train.max_steps=2")))
    assert fresh.returncode == 2
    assert re.fullmatch(rf"error: run directory {re.escape(str(tmp_path / 'student'))} holds an earlier run: "
                        rf"(\S+, )*checkpoints(, \S+)* \(last written .*\)\. Continue it with --resume auto, choose another run.name, "
                        rf"or replace it with --overwrite", _one_error_line(fresh))
    assert json.loads((tmp_path / "student" / "run.lock").read_text()) == lock  # the killed holder's stale lock: left
    assert tags_newest_first(tmp_path / "student" / "checkpoints") == tags  # nothing lost
    # ... unless asked: --overwrite starts afresh
    over = run(python_cmd(*_args(cxr_shards, tmp_path, random_teacher, "train.max_steps=2"), "--overwrite"))
    assert over.returncode == 0, over.stdout[-3000:] + over.stderr[-3000:]
    new_tags = tags_newest_first(tmp_path / "student" / "checkpoints")
    assert len(new_tags) == 1 and new_tags[0] not in tags  # the earlier run's checkpoints are gone
    assert (tmp_path / "student" / "final" / "model.pt").is_file()
    assert not (tmp_path / "student" / "run.lock").exists()


@pytest.mark.slow
def test_resume_auto_passes_over_a_damaged_newest_checkpoint_and_an_explicit_damaged_tag_is_an_error(
        cxr_shards, random_teacher, tmp_path):
    args = _args(cxr_shards, tmp_path, random_teacher, "train.max_steps=6")
    done = run(python_cmd(*args))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ckpt = tmp_path / "student" / "checkpoints"
    newest, older, oldest = tags_newest_first(ckpt)[:3]
    states = ckpt / newest / "mp_rank_00_model_states.pt"
    size = states.stat().st_size
    with open(states, "r+b") as f:
        f.truncate(size // 2)

    resumed = run(python_cmd(*args, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert (f"warning: --resume auto passes over {states}: {size // 2} bytes, {FILES} records {size} "
            f"(truncated or overwritten); resuming from {older}") in resumed.stdout
    assert f"resuming from {older}" in resumed.stdout
    check_complete(ckpt / newest)  # saved again, whole

    rank_state = ckpt / oldest / "rank0_state.pt"
    rank_state.write_bytes(rank_state.read_bytes()[::-1])
    explicit = run(python_cmd(*args, "--resume", oldest))
    assert explicit.returncode == 2
    assert _one_error_line(explicit) == (f"error: {rank_state}: sha256 differs from the one {FILES} "
                                         f"records (the file was changed after the save)")
