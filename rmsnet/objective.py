"""The mixed distillation objective, as the module that DeepSpeed trains.

    L = w_task * FL(student, y) + w_kd * KD(student, teacher) + w_at * AT(levels)
        + w_sp * SP(levels) + w_hint * HINT(levels, adapters)

`DistillTask` wraps the student and the hint adapters (which train with the student and are saved in
its checkpoint) and returns a dict of loss terms, one TensorBoard tag each. Its forward takes the
teacher's outputs as inputs: the teacher runs outside, in DeepSpeed's inference engine, once per
step, and never enters this module or its optimizer. With every term weight at zero but the task's,
it is plain supervised training (the teacher itself, or the no-KD baseline).

No torch.distributed here: the optional global-batch gather for the similarity loss is injected by
the launcher as `gather_fn`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from rmsnet.losses import (attention_transfer_loss, focal_loss, hint_loss, kd_loss,
                           make_hint_adapters, similarity_preserving_loss)

TERMS = ("task", "kd", "at", "sp", "hint")


class DistillTask(nn.Module):
    """Student + adapters + loss weights; forward returns {'loss', 'task', 'kd', ...,'logits'}."""

    def __init__(self, student: nn.Module, loss_cfg, *, multilabel: bool,
                 student_channels: Optional[list[int]] = None,
                 teacher_channels: Optional[list[int]] = None,
                 gather_fn: Optional[Callable[[Tensor], Tensor]] = None):
        super().__init__()
        self.student = student
        self.multilabel = multilabel
        self.cfg = loss_cfg
        self.gather_fn = gather_fn
        self.adapters = None
        if loss_cfg.hint_weight > 0:
            if student_channels is None or teacher_channels is None:
                raise ValueError("the hint loss needs student and teacher feature channels")
            if len(student_channels) != len(teacher_channels):
                raise ValueError(f"hint loss pairs levels in order: the student taps "
                                 f"{len(student_channels)} levels, the teacher {len(teacher_channels)}")
            self.adapters = make_hint_adapters(student_channels, teacher_channels)

    def weights(self) -> dict[str, float]:
        c = self.cfg
        return {"task": c.task_weight, "kd": c.kd_weight, "at": c.at_weight, "sp": c.sp_weight,
                "hint": c.hint_weight}

    def needs_teacher(self) -> bool:
        w = self.weights()
        return any(w[k] > 0 for k in ("kd", "at", "sp", "hint"))

    def needs_features(self) -> bool:
        w = self.weights()
        return any(w[k] > 0 for k in ("at", "sp", "hint"))

    def forward(self, images: Tensor, targets: Tensor, teacher_logits: Optional[Tensor] = None,
                teacher_feats: Optional[list[Tensor]] = None) -> dict[str, Tensor]:
        logits, feats = self.student(images)  # (b, C), [(b, c_i, h_i, w_i)]
        w = self.weights()
        terms: dict[str, Tensor] = {}
        if w["task"] > 0:
            task_targets = targets if self.multilabel else targets.argmax(1)
            terms["task"] = focal_loss(logits, task_targets, alpha=self.cfg.focal_alpha,
                                       gamma=self.cfg.focal_gamma, multilabel=self.multilabel)
        if self.needs_teacher() and teacher_logits is None:
            raise ValueError("the objective has teacher terms but no teacher outputs were given")
        if w["kd"] > 0:
            terms["kd"] = kd_loss(logits, teacher_logits, temperature=self.cfg.temperature,
                                  multilabel=self.multilabel)
        if self.needs_features():
            if teacher_feats is None or len(teacher_feats) != len(feats):
                raise ValueError(f"feature terms pair levels in order: the student taps {len(feats)} "
                                 f"levels, the teacher {0 if teacher_feats is None else len(teacher_feats)}")
        if w["at"] > 0:
            terms["at"] = attention_transfer_loss(feats, teacher_feats)
        if w["sp"] > 0:
            s_f, t_f = feats, teacher_feats
            if self.cfg.sp_global_batch and self.gather_fn is not None:
                s_f = [self.gather_fn(f) for f in feats]
                t_f = [self.gather_fn(f.detach()) for f in teacher_feats]
            terms["sp"] = similarity_preserving_loss(s_f, t_f)
        if w["hint"] > 0:
            terms["hint"] = hint_loss(feats, teacher_feats, self.adapters)
        loss = sum(w[k] * v for k, v in terms.items())
        out = {"loss": loss, "logits": logits}
        out.update(terms)
        return out


def term_gradient_norms(task: "DistillTask", images: Tensor, targets: Tensor,
                        teacher_logits: Optional[Tensor] = None,
                        teacher_feats: Optional[list[Tensor]] = None) -> dict[str, Tensor]:
    """||d(w_k * L_k) / d theta||_2 of each weighted term k of the objective, over the student's
    parameters theta, on this batch.

    Shows which term drives the update: a term whose weight makes its gradient 100x the task's
    dominates training (and, under gradient clipping, shrinks every other term's step) whatever its
    loss value looks like. A probe beside the training step, which it leaves exactly as it was:
    the forward runs on detached copies of the parameters and buffers (`torch.func.functional_call`),
    so no gradient reaches the real parameters or their hooks (a data-parallel engine reduces
    gradients from such hooks), BatchNorm statistics are not updated, and the random state
    (dropout) is restored. One forward and one backward per term.
    """
    params = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in task.named_parameters()}
    buffers = {n: b.clone() for n, b in task.named_buffers()}
    devices = [images.device] if images.is_cuda else []
    with torch.random.fork_rng(devices=devices):
        out = torch.func.functional_call(task, {**params, **buffers},
                                         (images, targets, teacher_logits, teacher_feats))
    student = [p for n, p in params.items() if n.startswith("student.") and p.requires_grad]
    weights = task.weights()
    norms = {}
    for k in TERMS:
        if k in out and weights[k] > 0 and out[k].requires_grad:
            grads = torch.autograd.grad(weights[k] * out[k], student, retain_graph=True, allow_unused=True)
            norms[k] = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))
    return norms
