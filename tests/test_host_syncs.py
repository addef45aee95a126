"""launcher/host_syncs.py: the audit sees each kind of host sync and names the code that made it,
and a real single-process run's steady-state training step (Trainer.run_epoch between logging
steps, under DeepSpeed ZeRO 1 and 2) holds no host sync of the project's own: only DeepSpeed's,
which docs/design.md lists. On CPU the operator detector finds the same code sites a GPU run
syncs at; torch.cuda.set_sync_debug_mode joins it on CUDA (bench/gpu_check.sh)."""
from __future__ import annotations

import json

import pytest
import torch

from _launch import REPO, python_cmd, run, tiny_run_args
from launcher.host_syncs import HostSyncAudit, host_side, in_steady_step

CFG = REPO / "launcher" / "configs" / "demo_distill.yaml"
HERE = "tests/test_host_syncs.py"


def test_the_audit_records_each_kind_of_sync_at_its_line_and_nothing_else():
    x = torch.randn(64)
    with HostSyncAudit(cuda_debug=False) as audit:
        for _ in range(2):  # two "steps"
            y = torch.where(x > 0, x * 2, x.masked_fill(x < -1, 0.0)) @ x  # device-side only
            float(y)
            if (x > 3).any():  # bool() of a tensor
                pass
            torch.nonzero(x)
            x[x > 0].sum()
    rows = audit.summary(steps=2)
    kinds = sorted(r["what"].split(" (")[0] for r in rows)
    assert kinds == ["boolean-mask indexing", "nonzero", "reads a value on the host",
                     "reads a value on the host"], rows
    assert all(r["owner"] == "project" and r["site"].startswith(HERE) and r["per_step"] == 1 for r in rows)
    assert audit.by_owner() == {"project": 8}


def test_a_sync_inside_a_library_names_the_library_line_and_the_project_caller():
    from deepspeed.runtime.utils import is_invalid_grad_norm

    with HostSyncAudit(cuda_debug=False) as audit:
        is_invalid_grad_norm(torch.tensor(1.0))
    (row,) = audit.summary()
    assert row["owner"] == "deepspeed" and row["site"].startswith("deepspeed/runtime/utils.py:")
    assert row["site"].endswith("in is_invalid_grad_norm") and row["caller"].startswith(HERE)


def test_the_steady_state_filter_keeps_the_step_and_drops_logging_checkpoints_and_loaders():
    from launcher.host_syncs import Sync

    def sync(*chain):
        return Sync("x", "s", "deepspeed", "", "", ("launcher/distill.py:main",) + chain)

    assert in_steady_step(sync("launcher/trainer.py:run_epoch", "launcher/engine.py:train_step"))
    assert not in_steady_step(sync("launcher/trainer.py:run_epoch", "launcher/trainer.py:_log"))
    assert not in_steady_step(sync("launcher/trainer.py:run_epoch", "launcher/trainer.py:_after_step",
                                   "launcher/checkpoints.py:save"))
    assert not in_steady_step(sync("launcher/trainer.py:run_epoch", "data_pipeline/dali_loader.py:__next__"))
    assert not in_steady_step(sync("launcher/trainer.py:run_epoch", "launcher/read_faults.py:__iter__"))
    assert not in_steady_step(sync("launcher/trainer.py:validate"))
    assert host_side({"site": "launcher/preemption.py:69 in agreed"})
    assert not host_side({"site": "launcher/engine.py:47 in train_step"})


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 2])
def test_the_training_step_of_a_real_run_has_no_host_sync_of_ours(zero_stage, cxr_shards, random_teacher,
                                                                  tmp_path):
    out = tmp_path / "syncs.json"
    args = tiny_run_args(CFG, cxr_shards, tmp_path / "runs", random_teacher, "train.batch_size_per_gpu=4",
                         "train.max_steps=6", "train.log_every=100", f"train.zero_stage={zero_stage}",
                         "train.compile=off")
    proc = run(python_cmd(*args)[:1] + ["-m", "launcher.host_syncs", "--out", str(out), "--", *args])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["rc"] == 0 and result["train_steps"] == 6
    assert result["project_in_step"] == [], result["in_step"]
    owners = {r["owner"] for r in result["in_step"]}
    assert owners <= {"deepspeed", "project"}, result["in_step"]  # project: the host-side stop flag only
    assert any(r["owner"] == "deepspeed" for r in result["in_step"])  # the audit did see the step
    assert "host syncs per optimizer step in Trainer.run_epoch's steady state (6 steps audited)" in proc.stdout
