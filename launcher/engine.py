"""The training step, one epoch of steps, and distributed prediction on a DeepSpeed engine."""
from __future__ import annotations

import time

import numpy as np
import torch

from launcher.dist import all_gather_cat, average_batchnorm_stats
from launcher.preemption import Preempted
from rmsnet.objective import TERMS, term_gradient_norms


def teacher_forward(teacher, images: torch.Tensor, dtype: torch.dtype, with_features: bool):
    """Frozen teacher, under no_grad (DeepSpeed's inference engine calls neither eval() nor no_grad())."""
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


def run_epoch(engine, teacher, loader, *, teacher_dtype, student_dtype, accum: int, step: int,
              last_step: int, log_every: int, global_batch: int, monitor, progress, epoch: int,
              skip_batches: int = 0, save_every: int = 0, save=None, sample_log=None,
              stop=None, grad_shares_every: int = 0) -> int:
    """Train one epoch (or until `last_step`); log every `log_every` optimizer steps; return step.

    The loader is always drained to its end (DALI requires it before the next pipeline starts);
    batches after `last_step`, and the first `skip_batches` (mid-epoch resume), are read but not used.
    Every `save_every` optimizer steps inside the epoch, `save(batches_done, step)` checkpoints;
    `sample_log(step, sids)`, when given, records which samples each step consumed. `stop`
    (launcher.preemption.StopRequest) is asked after every optimizer step inside the epoch; when
    the ranks agree to stop, they checkpoint there and raise Preempted. Every `grad_shares_every`
    optimizer steps (0 = never) each loss term's gradient norm and its share of their sum are logged
    (`train/grad_norm/<term>`, `train/grad_share/<term>`), from rank 0's micro-batch.
    """
    engine.train()
    t_log, last_log = time.perf_counter(), step
    for i, batch in enumerate(loader):
        if i < skip_batches or step >= last_step:
            continue
        log_now = (step + 1) % log_every == 0 or step + 1 == last_step
        timings = {} if log_now else None
        shares_now = bool(grad_shares_every) and (step + 1) % grad_shares_every == 0 and (i + 1) % accum == 0
        grad_norms = {} if shares_now else None
        batch["image"] = batch["image"].to(student_dtype)
        terms = train_step(engine, teacher, batch, teacher_dtype, timings, grad_norms)
        if grad_norms:
            norms = {k: v.item() for k, v in grad_norms.items()}
            total = sum(norms.values())
            monitor.scalars({f"grad_norm/{k}": v for k, v in norms.items()}, step + 1, "train/")
            monitor.scalars({f"grad_share/{k}": v / total for k, v in norms.items() if total > 0},
                            step + 1, "train/")
        if sample_log is not None:
            sample_log(step + 1, batch["sid"])
        if (i + 1) % accum:
            continue
        step += 1
        inside = i + 1 < len(loader) and step < last_step
        saved = bool(save_every) and step % save_every == 0 and inside
        if saved:
            save(i + 1, step)
        if stop is not None and inside and stop.agreed():
            if not saved:
                save(i + 1, step)
            raise Preempted(f"stopped on request at step {step}")
        if log_now:  # the only place that syncs with .item()
            dt = time.perf_counter() - t_log
            values = {k: terms[k].item() for k in ("loss",) + TERMS if k in terms}
            sps = global_batch * (step - last_log) / dt
            monitor.scalars(values, step, "train/")
            monitor.scalars({"lr": engine.get_lr()[0], "samples_per_s": sps,
                             "grad_norm": engine.get_global_grad_norm(),
                             **({"time/teacher_forward_s": timings["teacher_s"]} if teacher is not None
                                else {}),  # a supervised run has no teacher to time
                             "time/student_step_s": timings["student_s"]}, step, "train/")
            progress.line(step, epoch, values, sps)
            t_log, last_log = time.perf_counter(), step
    average_batchnorm_stats(engine.module)  # every rank evaluates and saves the same model
    return step
