"""Data-parallel ZeRO training equals one process on the same global batches.

Two CPU ranks (ZeRO-1, ZeRO-2 and ZeRO-3, through the real `deepspeed` launcher; ZeRO-1 also with
the student compiled, `train.compile=on` with the `aot_eager` backend: TorchDynamo's graph and
AOTAutograd's joint forward-backward, eager kernels) against one eager process that
replays the two ranks' data order (`data.emulate_world_size=2`) with gradient accumulation over the
two micro-batches: the same optimisation, so the same parameters up to float summation order.
BatchNorm running statistics are left out of the comparison: they do not feed back into training
and are, by design, averaged over ranks in one case and accumulated in sequence in the other.
"""
from __future__ import annotations

import pytest
import torch

from _launch import REPO, deepspeed_cmd, python_cmd, run, tiny_run_args, trained_params

CFG = REPO / "launcher" / "configs" / "demo_distill.yaml"
# fp32 SGD: the update is linear in the gradient, so only summation order differs (observed max
# |difference| 6e-8 after 4 steps). AdamW divides by sqrt(v): for the near-zero gradients of some
# shrinkage thresholds it turns roundoff into ~1e-5 differences, which would hide a real bug.
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def _args(shards, out, teacher, *extra):
    return tiny_run_args(CFG, shards, out, teacher, "train.batch_size_per_gpu=4", "train.max_steps=4",
                         "train.optimizer=sgd") + list(extra)


@pytest.fixture(scope="module")
def single_process(cxr_shards, random_teacher, tmp_path_factory):
    teacher = random_teacher
    out = tmp_path_factory.mktemp("eq_single")
    proc = run(python_cmd(*_args(cxr_shards, out, teacher, "--set", "data.emulate_world_size=2",
                                 "--set", "train.gradient_accumulation_steps=2")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return trained_params(out / "student")


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage, compiled", [(1, False), (2, False), (3, False), (1, True)],
                         ids=["zero1", "zero2", "zero3", "zero1-compiled"])
def test_two_rank_zero_training_equals_one_process_on_the_same_global_batches(
        zero_stage, compiled, single_process, cxr_shards, random_teacher, tmp_path):
    teacher = random_teacher
    compile_args = ["--set", "train.compile=on", "--set", "train.compile_backend=aot_eager"] if compiled else []
    proc = run(deepspeed_cmd(2, *_args(cxr_shards, tmp_path, teacher,
                                       "--set", f"train.zero_stage={zero_stage}", *compile_args)), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if compiled:
        assert "compiled (aot_eager): the first step took" in proc.stdout and "0 graph breaks" in proc.stdout
    distributed = trained_params(tmp_path / "student")
    assert distributed.keys() == single_process.keys()
    worst = max(float((distributed[k] - single_process[k]).abs().max()) for k in distributed)
    print(f"ZeRO-{zero_stage}{' compiled' if compiled else ''}: max |param difference| = {worst:.3g}")
    for k in distributed:
        torch.testing.assert_close(distributed[k], single_process[k], **TOLERANCE, msg=k)
