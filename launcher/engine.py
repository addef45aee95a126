"""The training step, distributed prediction, and checkpoints on a DeepSpeed engine."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from launcher.dist import all_gather_cat, barrier


def teacher_forward(teacher, images: torch.Tensor, dtype: torch.dtype, with_features: bool):
    """Frozen teacher, under no_grad (DeepSpeed's inference engine calls neither eval() nor no_grad())."""
    if teacher is None:
        return None, None
    with torch.no_grad():
        logits, feats = teacher(images.to(dtype))
    if not with_features:
        feats = None
    return logits, feats


def train_step(engine, teacher, batch, teacher_dtype, timings: dict | None = None) -> dict:
    """One micro-step: teacher forward, student forward + loss, backward, (accumulated) step.

    Returns the loss terms as detached tensors; the caller calls .item() on logging steps only.
    When `timings` is a dict, teacher and student times are measured (with a device sync).
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


def consolidated_state_dict(engine) -> dict:
    """The student's full state dict on every rank (ZeRO-3 partitions parameters: gather them)."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()


def export_student(engine, path: Path, meta: dict, is_main: bool) -> None:
    """Write a self-describing `model.pt` (student weights + what is needed to rebuild it),
    atomically; all ranks must call (ZeRO-3 gathers), rank 0 writes."""
    full = consolidated_state_dict(engine)
    if is_main:
        student = {k[len("student.model."):]: v.detach().cpu() for k, v in full.items()
                   if k.startswith("student.model.")}
        adapters = {k: v.detach().cpu() for k, v in full.items() if k.startswith("adapters.")}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        torch.save({"model": student, "adapters": adapters, "meta": meta}, tmp)
        os.replace(tmp, path)
    barrier()


def save_checkpoint(engine, ckpt_dir: Path, tag: str, client_state: dict) -> None:
    """DeepSpeed checkpoint (model, optimizer, scheduler, ZeRO partitions) + our state."""
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
