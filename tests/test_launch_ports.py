"""Two deepspeed jobs on one machine, neither given a --master_port, each get a port of their own
(deepspeed's launcher would hand both its fixed default, 29500)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _launch import REPO, tiny_run_args
from launcher import dist


def test_a_launch_that_is_not_a_default_port_one_host_deepspeed_job_is_left_as_it_is(monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29501")  # the user chose one
    monkeypatch.setenv("LOCAL_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dist.agree_local_port() is None and os.environ["MASTER_PORT"] == "29501"
    monkeypatch.setenv("MASTER_PORT", dist.DEEPSPEED_DEFAULT_PORT)
    monkeypatch.setenv("WORLD_SIZE", "4")  # ranks on other hosts: they could not read our file
    assert dist.agree_local_port() is None
    monkeypatch.setenv("WORLD_SIZE", "2")  # this process's parent is not deepspeed's launcher
    assert dist.agree_local_port() is None and os.environ["MASTER_PORT"] == dist.DEEPSPEED_DEFAULT_PORT


def test_the_port_file_names_the_launcher_process_and_its_start(monkeypatch, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    here, parent = dist.port_file(os.getpid()), dist.port_file(os.getppid())
    assert here.parent == tmp_path and here != parent
    assert here == dist.port_file(os.getpid())  # the same process: the same file
    assert dist._parent_of(os.getpid()) == os.getppid()


@pytest.mark.slow
def test_two_deepspeed_jobs_started_at_once_without_a_port_both_run(cxr_shards, random_teacher, tmp_path):
    exe = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    cfg = REPO / "launcher" / "configs" / "demo_distill.yaml"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    jobs, t0 = [], time.time()
    for name in ("a", "b"):
        cmd = [exe, "--num_gpus", "2", str(REPO / "launcher" / "distill.py"),
               *tiny_run_args(cfg, cxr_shards, tmp_path / name, random_teacher, "train.max_steps=2",
                              "train.batch_size_per_gpu=4")]
        jobs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True))
    outs = [j.communicate(timeout=600)[0] for j in jobs]
    for job, out in zip(jobs, outs):
        assert job.returncode == 0, out[-3000:]
    ports = [set(re.findall(r"rendezvous 127\.0\.0\.1:(\d+)\)", out)) for out in outs]
    assert all(len(p) == 1 for p in ports), ports  # both ranks of a job met on one port
    assert ports[0] != ports[1] and dist.DEEPSPEED_DEFAULT_PORT not in ports[0] | ports[1], ports
    for name in ("a", "b"):
        assert (tmp_path / name / "student" / "metrics.json").is_file()
    left = list(Path(os.environ.get("TMPDIR", "/tmp")).glob(f"rms-distill-port-{os.getuid()}-*"))
    assert not [p for p in left if p.stat().st_mtime >= t0 - 1], left  # rank 0 removed its file
