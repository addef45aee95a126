"""Each loss term's share of the gradient (train.grad_shares_every): the right numbers, logged to
TensorBoard, and no effect on training."""
from __future__ import annotations

import pytest
import torch

from _launch import REPO, assert_same_student, deepspeed_cmd, run, tiny_run_args
from rmsnet.objective import term_gradient_norms

CFG = REPO / "launcher" / "configs" / "demo_distill.yaml"


def test_term_gradient_norms_are_each_weighted_terms_own_gradient_and_touch_nothing():
    from launcher.config import LossConfig
    from rmsnet.objective import DistillTask
    from rmsnet.teachers import create_tapped_model

    torch.manual_seed(0)
    student = create_tapped_model("rmsnet_xxs", 3, in_chans=1, drop_rate=0.3)
    teacher = create_tapped_model("resnet18", 3, in_chans=3).eval()
    loss = LossConfig(task_weight=1.0, kd_weight=2.0, at_weight=30.0, sp_weight=0.0, focal_alpha=0.5)
    task = DistillTask(student, loss, multilabel=True).train()
    x, y = torch.randn(4, 1, 48, 48), (torch.rand(4, 3) < 0.5).float()
    with torch.no_grad():
        t_logits, t_feats = teacher(x)
    bn_before = {n: b.clone() for n, b in task.named_buffers()}
    rng_before = torch.random.get_rng_state()
    norms = term_gradient_norms(task, x, y, t_logits, t_feats)
    assert set(norms) == {"task", "kd", "at"}  # weight 0: not a term of the objective
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # dropout draws restored
    assert all(torch.equal(b, bn_before[n]) for n, b in task.named_buffers())  # BatchNorm untouched
    assert all(p.grad is None for p in task.parameters())  # nothing accumulated
    out = task(x, y, t_logits, t_feats)  # the same forward on the real parameters
    params = [p for p in task.student.parameters() if p.requires_grad]
    for k, n in norms.items():
        grads = torch.autograd.grad(task.weights()[k] * out[k], params, retain_graph=True, allow_unused=True)
        expected = torch.sqrt(sum((g ** 2).sum() for g in grads if g is not None))
        assert n.item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.slow
def test_grad_shares_are_logged_and_do_not_change_two_rank_training(tmp_path, cxr_shards, random_teacher):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = ("train.epochs=1", "train.batch_size_per_gpu=4", "loss.at_weight=30", "loss.sp_weight=100",
              "loss.sp_global_batch=true")  # SP's all-gather runs inside the probe too
    for name, every in (("with", 1), ("without", 0)):
        res = run(deepspeed_cmd(2, *tiny_run_args(CFG, cxr_shards, tmp_path, random_teacher, *common,
                                            f"run.name={name}", f"train.grad_shares_every={every}")))
        assert res.returncode == 0, res.stdout + res.stderr
    assert_same_student(tmp_path / "with", tmp_path / "without")
    ea = EventAccumulator(str(tmp_path / "with" / "tb"))
    ea.Reload()
    tags = ea.Tags()["scalars"]
    terms = ("task", "kd", "at", "sp")
    assert {f"train/grad_share/{t}" for t in terms} <= set(tags)
    shares = [[e.value for e in ea.Scalars(f"train/grad_share/{t}")] for t in terms]
    assert len(shares[0]) >= 5
    for step in zip(*shares):
        assert sum(step) == pytest.approx(1.0, abs=1e-5) and min(step) >= 0
    assert all(ea.Scalars(f"train/grad_norm/{t}")[0].value > 0 for t in terms)
