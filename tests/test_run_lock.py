"""The run-directory lock (launcher/run_lock.py) and checkpoint completeness (files.json in
launcher/checkpoints.py): a live holder refuses a second writer, stale locks are taken over, a new
run over an earlier one is refused unless --overwrite, a damaged checkpoint is named and passed over."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from launcher import run_lock
from launcher.checkpoints import (FILES, CheckpointDamaged, check_complete, newest_complete,
                                  resume_position, write_file_manifest)
from launcher.run_lock import LOCK, RunDirLocked, RunLock, claim_run_dir


def test_a_second_writer_is_refused_with_the_holders_host_pid_and_start(tmp_path):
    with RunLock(tmp_path, "distill.py distill"):
        with pytest.raises(RunDirLocked, match=rf"in use by pid {os.getpid()} on \S+, started 20\d\d-.*"
                                               rf"\(distill.py distill\): wait for it to end"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK).exists()  # released
    RunLock(tmp_path).acquire().release()


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import os, sys; sys.path.insert(0, os.getcwd()); "
                           "from launcher.run_lock import RunLock; "
                           f"RunLock({str(tmp_path)!r}).acquire(); print(os.getpid()); os._exit(0)"],
                          cwd=os.getcwd(), capture_output=True, text=True)
    assert proc.returncode == 0 and (tmp_path / LOCK).is_file()  # exited without releasing
    lock = RunLock(tmp_path).acquire()
    assert lock.took_over["pid"] == int(proc.stdout.split()[-1])
    assert lock.took_over["why"].startswith("process ") and "no longer running" in lock.took_over["why"]
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_reused_pid_does_not_keep_a_stale_lock_alive(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"host": run_lock.socket.gethostname(), "pid": os.getpid(),
                                             "proc_start": "1", "started": "then"}))
    lock = RunLock(tmp_path).acquire()  # our own pid, but a process that started at tick 1
    assert "no longer running" in lock.took_over["why"]
    lock.release()


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    (tmp_path / LOCK).write_text(json.dumps({"host": "node-that-died", "pid": 1, "started": "then",
                                             "slurm_job_id": "4242"}))
    lock = RunLock(tmp_path).acquire()
    assert "requeued" in lock.took_over["why"]
    lock.release()


def test_another_hosts_lock_is_stale_only_once_its_heartbeat_stops(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"host": "other-node", "pid": 1, "started": "then"}))
    with pytest.raises(RunDirLocked, match="pid 1 on other-node"):
        RunLock(tmp_path).acquire()
    old = os.path.getmtime(tmp_path / LOCK) - run_lock.STALE_AFTER_S - 10
    os.utime(tmp_path / LOCK, (old, old))
    lock = RunLock(tmp_path).acquire()
    assert lock.took_over["why"].startswith("not refreshed for")
    lock.release()


def test_a_new_run_over_an_earlier_one_is_refused_unless_overwrite(tmp_path):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.pt").write_bytes(b"weights")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(RunDirLocked, match=r"holds an earlier run: final/model.pt \(last written .*\)\. "
                                           r"Continue it with --resume auto, .* --overwrite"):
        claim_run_dir(tmp_path, "none", False, "test")
    assert not (tmp_path / LOCK).exists() and (tmp_path / "final" / "model.pt").is_file()
    claim_run_dir(tmp_path, "auto", False, "test").release()  # continuing it is fine
    lock = claim_run_dir(tmp_path, "none", True, "test")
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK]
    lock.release()


def test_a_refused_run_over_a_killed_one_leaves_its_stale_lock_and_a_live_holder_is_named_first(tmp_path):
    (tmp_path / "checkpoints" / "main-e0000-s00000004").mkdir(parents=True)
    stale = json.dumps({"host": run_lock.socket.gethostname(), "pid": os.getpid(), "proc_start": "1",
                        "started": "then"})
    (tmp_path / LOCK).write_text(stale)
    with pytest.raises(RunDirLocked, match="holds an earlier run: checkpoints"):
        claim_run_dir(tmp_path, "none", False, "test")
    assert (tmp_path / LOCK).read_text() == stale  # not taken over by a run that did not start
    with RunLock(tmp_path / "live", "distill.py distill"):
        (tmp_path / "live" / "metrics.json").write_text("{}")
        with pytest.raises(RunDirLocked, match=rf"in use by pid {os.getpid()}"):
            claim_run_dir(tmp_path / "live", "none", False, "test")
    lock = claim_run_dir(tmp_path, "auto", False, "test")  # --resume auto takes the stale lock over
    assert "no longer running" in lock.took_over["why"]
    lock.release()


def test_an_empty_run_directory_or_an_empty_checkpoints_folder_is_no_earlier_run(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "config.yaml").write_text("run: {}\n")
    claim_run_dir(tmp_path, "none", False, "test").release()


# ---------------------------------------------------------------------------------- checkpoints
def _tag(ckpt, step, files=("mp_rank_00_model_states.pt", "rank0_state.pt"), complete=True):
    d = ckpt / f"main-e0000-s{step:08d}"
    d.mkdir(parents=True)
    for f in files:
        (d / f).write_bytes(os.urandom(64))
    if complete:
        write_file_manifest(d)
    return d


def test_a_complete_tag_passes_and_each_kind_of_damage_is_named(tmp_path):
    d = _tag(tmp_path, 4)
    check_complete(d)
    states = d / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:10])
    with pytest.raises(CheckpointDamaged, match=rf"{states}: 10 bytes, files.json records 64 \(truncated"):
        check_complete(d)
    states.write_bytes(b"x" * 64)
    with pytest.raises(CheckpointDamaged, match=rf"{states}: sha256 differs"):
        check_complete(d)
    states.unlink()
    with pytest.raises(CheckpointDamaged, match=rf"{states}: missing"):
        check_complete(d)
    (d / FILES).unlink()
    with pytest.raises(CheckpointDamaged, match="incomplete checkpoint, no files.json"):
        check_complete(d)


def test_resume_auto_falls_back_to_the_newest_complete_tag_saying_why(tmp_path):
    _tag(tmp_path, 2)
    good = _tag(tmp_path, 4)
    bad = _tag(tmp_path, 6)
    (bad / "rank0_state.pt").write_bytes(b"")
    _tag(tmp_path, 8, complete=False)  # killed during the save
    passed = []
    assert newest_complete(tmp_path, passed) == good.name
    assert [p.split(":")[0] for p in passed] == [str(tmp_path / "main-e0000-s00000008"),
                                                 str(bad / "rank0_state.pt")]
    said = []
    (good / "mp_rank_00_model_states.pt").write_bytes(b"")  # the position is read from it: use a real one
    import torch
    torch.save({"stage": 0, "epoch": 0, "step": 2, "batch": 1}, tmp_path / "main-e0000-s00000002" /
               "mp_rank_00_model_states.pt")
    write_file_manifest(tmp_path / "main-e0000-s00000002")
    tag, pos = resume_position("auto", tmp_path, said.append)
    assert tag == "main-e0000-s00000002" and pos.step == 2 and pos.batch == 1
    assert len(said) == 3 and all(s.startswith("warning: --resume auto passes over ") for s in said)
    assert said[-1].endswith("; resuming from main-e0000-s00000002")


def test_an_explicit_damaged_tag_is_an_error_naming_the_file(tmp_path):
    d = _tag(tmp_path, 4)
    (d / "rank0_state.pt").write_bytes(b"")
    with pytest.raises(CheckpointDamaged, match=str(d / "rank0_state.pt")):
        resume_position(d.name, tmp_path)


def test_resume_auto_with_only_damaged_tags_is_an_error_and_with_only_unfinished_saves_a_fresh_start(tmp_path):
    d = _tag(tmp_path, 4)
    (d / "rank0_state.pt").write_bytes(b"")  # saved whole, then damaged: the user must know
    _tag(tmp_path, 6, complete=False)
    with pytest.raises(CheckpointDamaged, match=r"no complete checkpoint .* \(2 damaged or incomplete"):
        resume_position("auto", tmp_path, lambda _: None)
    # killed during its first saves: nothing a restart does not redo, so it starts from the beginning
    unfinished = tmp_path / "unfinished"
    _tag(unfinished, 2, complete=False)
    _tag(unfinished, 4, complete=False)
    said = []
    assert resume_position("auto", unfinished, said.append) == (None, resume_position("none", tmp_path)[1])
    assert said[-1] == (f"warning: --resume auto: no complete checkpoint in {unfinished} (2 unfinished "
                        f"save(s) passed over); starting from the beginning")
    assert resume_position("auto", tmp_path / "nothing-here") == (None, resume_position("none", tmp_path)[1])
