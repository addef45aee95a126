"""The mixed objective: which terms are active, where gradients go, stages, global-batch SP."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from launcher.config import load_config
from rmsnet.losses import similarity_preserving_loss
from rmsnet.objective import DistillTask
from rmsnet.teachers import create_tapped_model, create_teacher

SIZE = 64


class Weights:
    def __init__(self, **kw):
        self.task_weight, self.kd_weight, self.at_weight = 1.0, 0.0, 0.0
        self.sp_weight, self.hint_weight, self.temperature = 0.0, 0.0, 4.0
        self.focal_alpha, self.focal_gamma, self.sp_global_batch = 0.25, 2.0, False
        self.__dict__.update(kw)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("t") / "teacher.pt"
    torch.save({"model": create_tapped_model("resnet18", 6, in_chans=3).model.state_dict()}, path)
    return create_teacher("resnet18", 6, checkpoint=str(path))


def _task(loss, teacher, multilabel=False):
    torch.manual_seed(1)
    student = create_tapped_model("rmsnet_xxs", 6, in_chans=1)
    return DistillTask(student, loss, multilabel=multilabel,
                       student_channels=student.feature_channels(SIZE),
                       teacher_channels=teacher.feature_channels(SIZE))


def _batch(multilabel=False, b=4):
    torch.manual_seed(2)
    x = torch.rand(b, 1, SIZE, SIZE)
    y = (torch.rand(b, 6) < 0.3).float() if multilabel else torch.eye(6)[torch.randint(0, 6, (b,))]
    return x, y


def test_every_weighted_term_is_returned_and_the_loss_is_their_weighted_sum(teacher):
    w = Weights(task_weight=1.0, kd_weight=2.0, at_weight=1000.0, sp_weight=3000.0, hint_weight=0.5)
    task = _task(w, teacher, multilabel=True)
    x, y = _batch(multilabel=True)
    t_logits, t_feats = teacher(x)
    out = task(x, y, t_logits, t_feats)
    assert set(out) == {"loss", "logits", "task", "kd", "at", "sp", "hint"}
    expected = out["task"] + 2 * out["kd"] + 1000 * out["at"] + 3000 * out["sp"] + 0.5 * out["hint"]
    torch.testing.assert_close(out["loss"], expected)


def test_gradient_reaches_student_and_adapters_and_never_the_teacher(teacher):
    w = Weights(kd_weight=1.0, at_weight=10.0, sp_weight=10.0, hint_weight=1.0)
    task = _task(w, teacher)
    x, y = _batch()
    before = [p.clone() for p in teacher.parameters()]
    t_logits, t_feats = teacher(x)
    task(x, y, t_logits, t_feats)["loss"].backward()
    student_grads = [p.grad for p in task.student.parameters() if p.requires_grad]
    assert all(g is not None for g in student_grads)
    assert sum(float(g.abs().sum()) for g in student_grads) > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in task.adapters.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad])
    optimizer.step()
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))


def test_supervised_objective_needs_no_teacher_and_returns_only_the_task_term(teacher):
    task = _task(Weights(), teacher)
    x, y = _batch()
    out = task(x, y)
    assert set(out) == {"loss", "logits", "task"} and not task.needs_teacher()


def test_teacher_terms_without_teacher_outputs_are_an_error(teacher):
    task = _task(Weights(kd_weight=1.0), teacher)
    x, y = _batch()
    with pytest.raises(ValueError, match="teacher"):
        task(x, y)


def test_a_stage_switch_changes_the_active_terms(teacher, tmp_path):
    cfg = load_config("launcher/configs/synthetic_us_two_stage.yaml",
                      [f"teacher.checkpoint={tmp_path}/unused.pt"])
    hint, kd = cfg.resolved_stages()
    x, y = _batch()
    t_logits, t_feats = teacher(x)
    out_hint = _task(hint.loss, teacher)(x, y, t_logits, t_feats)
    out_kd = _task(kd.loss, teacher)(x, y, t_logits, t_feats)
    assert {k for k in out_hint if k not in ("loss", "logits")} == {"hint"}
    assert {k for k in out_kd if k not in ("loss", "logits")} == {"task", "kd"}
    assert _task(hint.loss, teacher).adapters is not None and _task(kd.loss, teacher).adapters is None


def test_supervised_mode_drops_every_teacher_term_from_every_stage(tmp_path):
    cfg = load_config("launcher/configs/synthetic_us_two_stage.yaml",
                      ["run.mode=supervised"])
    for stage in cfg.resolved_stages():
        assert stage.loss.kd_weight == stage.loss.at_weight == stage.loss.hint_weight == 0.0


# ------------------------------------------------------------------ similarity over the global batch
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sp_worker(rank, world, port, feats_s, feats_t, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from launcher.dist import all_gather_with_grad
    b = feats_s.shape[0] // world
    local = feats_s[rank * b:(rank + 1) * b].clone().requires_grad_(True)
    loss = similarity_preserving_loss([all_gather_with_grad(local)],
                                      [all_gather_with_grad(feats_t[rank * b:(rank + 1) * b])])
    loss.backward()
    results[rank] = (loss.detach(), local.grad)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_global_batch_similarity_equals_single_process_and_grads_flow_to_the_local_slice():
    torch.manual_seed(3)
    fs, ft = torch.randn(8, 5, 4, 4, dtype=torch.float64), torch.randn(8, 7, 2, 2, dtype=torch.float64)
    full = fs.clone().requires_grad_(True)
    ref = similarity_preserving_loss([full], [ft])
    ref.backward()
    results = mp.Manager().dict()
    mp.spawn(_sp_worker, args=(2, _free_port(), fs, ft, results), nprocs=2, join=True)
    for rank in range(2):
        loss, grad = results[rank]
        torch.testing.assert_close(loss, ref.detach())
        # Each rank holds world x the full-batch gradient of its own rows (every rank computed the
        # same loss): data parallelism's average over ranks then equals single-process training.
        torch.testing.assert_close(grad, 2 * full.grad[rank * 4:(rank + 1) * 4])
