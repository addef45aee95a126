"""The training step and distributed prediction on a DeepSpeed engine (the loop: launcher/trainer.py)."""
from __future__ import annotations

import time

import numpy as np
import torch

from launcher.dist import all_gather_cat
from rmsnet.objective import term_gradient_norms


def teacher_forward(teacher, images: torch.Tensor, dtype: torch.dtype, with_features: bool):
    """Frozen teacher, under no_grad (DeepSpeed's inference engine calls neither eval() nor no_grad()).

    Not inference_mode: its outputs would be inference tensors, and the compiled objective's
    joint graph (inductor) saves its inputs for the backward, which inference tensors refuse
    ("Inference tensors cannot be saved for backward"); cloning them would cost what it saves."""
    if teacher is None:
        return None, None
    with torch.no_grad():
        logits, feats = teacher(images.to(dtype))
    if not with_features:
        feats = None
    return logits, feats


def train_step(engine, teacher, batch, teacher_dtype, timings: dict | None = None,
               grad_norms: dict | None = None) -> dict:
    """One micro-step: teacher forward, student forward + loss, backward, (accumulated) step.

    Returns the loss terms as detached tensors; the caller calls .item() on logging steps only.
    When `timings` is a dict, teacher and student times are measured (with a device sync); when
    `grad_norms` is a dict, it receives each weighted term's gradient norm over the student's
    parameters on this rank's micro-batch (rmsnet.objective.term_gradient_norms).
    """
    images = batch["image"].to(engine.device, non_blocking=True)
    targets = batch["label"].to(engine.device, non_blocking=True)
    task = engine.module
    sync = torch.cuda.synchronize if (timings is not None and images.is_cuda) else (lambda: None)
    t0 = time.perf_counter()
    t_logits, t_feats = teacher_forward(teacher, images, teacher_dtype, task.needs_features()) \
        if task.needs_teacher() else (None, None)
    sync()
    t1 = time.perf_counter()
    if grad_norms is not None:  # a probe on copies of the parameters: the step below is unchanged
        grad_norms.update(term_gradient_norms(task, images, targets, t_logits, t_feats))
        t1 = time.perf_counter()  # (not counted as the student's time)
    out = engine(images, targets, t_logits, t_feats)
    engine.backward(out["loss"])
    engine.step()
    sync()
    if timings is not None:
        timings["teacher_s"] = t1 - t0
        timings["student_s"] = time.perf_counter() - t1
    return {k: v.detach() for k, v in out.items() if k != "logits"}


@torch.no_grad()
def predict(forward_logits, loader, device, multilabel: bool):
    """Score a split on every rank, gather, drop padded duplicates by sample id.

    Returns (probs (n, C), targets (n, C), sids (n,)) sorted by sid, identical on every rank and
    equal to a single-process pass over the same shards: every sample scored exactly once.
    """
    probs, targets, sids = [], [], []
    for batch in loader:
        logits = forward_logits(batch["image"].to(device)).float()
        probs.append(torch.sigmoid(logits) if multilabel else torch.softmax(logits, 1))
        targets.append(batch["label"].to(device).float())
        sids.append(batch["sid"].to(device).long())
    p, t, s = (all_gather_cat(torch.cat(x)) for x in (probs, targets, sids))
    s_np = s.cpu().numpy()
    _, first = np.unique(s_np, return_index=True)  # sorted unique sids, first occurrence
    return p.cpu().numpy()[first], t.cpu().numpy()[first], s_np[first]


def log_grad_shares(monitor, grad_norms: dict, step: int) -> None:
    """Each loss term's gradient norm (`train/grad_norm/<term>`) and its share of their sum
    (`train/grad_share/<term>`), from rank 0's micro-batch (`train.grad_shares_every`)."""
    norms = {k: v.item() for k, v in grad_norms.items()}
    total = sum(norms.values())
    monitor.scalars({f"grad_norm/{k}": v for k, v in norms.items()}, step, "train/")
    monitor.scalars({f"grad_share/{k}": v / total for k, v in norms.items() if total > 0}, step, "train/")
