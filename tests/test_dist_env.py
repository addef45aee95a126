"""launcher.dist.detect_env: the launches it understands, and the ones it refuses."""
from __future__ import annotations

import os

import pytest

from launcher import dist

ALL = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
       "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID",
       "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")


@pytest.fixture
def env(monkeypatch):
    # detect_env writes RANK, MASTER_PORT, ... into os.environ itself: put the whole environment
    # back afterwards, or later tests' subprocesses would inherit a half-made launch.
    saved = dict(os.environ)
    for v in ALL:
        monkeypatch.delenv(v, raising=False)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_single_process_gets_a_local_rendezvous(env):
    e = dist.detect_env()
    assert e == {"rank": 0, "world_size": 1, "local_rank": 0, "local_world_size": 1}
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and int(os.environ["MASTER_PORT"]) > 0


@pytest.mark.parametrize("spec, node, expected", [
    ("4(x2)", 1, 4), ("2(x3),1", 3, 1), ("2(x3),1", 2, 2), ("1", 0, 1), ("3,1(x2)", 0, 3)])
def test_srun_ranks_come_from_slurm_variables(env, spec, node, expected):
    total = sum(int(p.split("(x")[0]) * (int(p.split("(x")[1][:-1]) if "(x" in p else 1)
                for p in spec.split(","))
    env.setenv("SLURM_PROCID", "1"); env.setenv("SLURM_NTASKS", str(max(total, 2)))
    env.setenv("SLURM_LOCALID", "0"); env.setenv("SLURM_NODEID", str(node))
    env.setenv("SLURM_STEP_TASKS_PER_NODE", spec)
    env.setenv("MASTER_ADDR", "node1"); env.setenv("MASTER_PORT", "29500")
    e = dist.detect_env()
    assert e["rank"] == 1 and e["world_size"] == max(total, 2) and e["local_rank"] == 0
    assert e["local_world_size"] == expected


def test_srun_without_master_address_is_one_clear_error(env):
    env.setenv("SLURM_PROCID", "0"); env.setenv("SLURM_NTASKS", "2"); env.setenv("SLURM_LOCALID", "0")
    with pytest.raises(RuntimeError, match="MASTER_ADDR is not set"):
        dist.detect_env()


def test_launcher_variables_win_over_slurm_ones(env):
    # `deepspeed` run inside an allocation: its own RANK/WORLD_SIZE/LOCAL_RANK describe the ranks.
    env.setenv("SLURM_PROCID", "0"); env.setenv("SLURM_NTASKS", "1")
    env.setenv("RANK", "3"); env.setenv("WORLD_SIZE", "4"); env.setenv("LOCAL_RANK", "1")
    env.setenv("LOCAL_SIZE", "2")
    assert dist.detect_env() == {"rank": 3, "world_size": 4, "local_rank": 1, "local_world_size": 2}


def test_half_set_environment_is_refused(env):
    env.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="half-set"):
        dist.detect_env()


@pytest.mark.parametrize("visible, local_rank, expected", [(8, 3, 3), (1, 3, 0), (4, 0, 0)])
def test_gpu_index_follows_what_the_scheduler_made_visible(monkeypatch, visible, local_rank, expected):
    monkeypatch.setattr(dist.torch.cuda, "device_count", lambda: visible)
    assert dist.gpu_index(local_rank) == expected


def test_gpu_index_refuses_more_local_ranks_than_gpus(monkeypatch):
    monkeypatch.setattr(dist.torch.cuda, "device_count", lambda: 2)
    with pytest.raises(RuntimeError, match="local rank 3 but only 2 visible GPUs"):
        dist.gpu_index(3)
