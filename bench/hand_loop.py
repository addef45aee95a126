"""The hand-written PyTorch loop bench/distill_step.py times the project's step against: the same
computation as DistillTask + DeepSpeed (focal + KD + AT + SP, clipping, AdamW under DeepSpeed's
WarmupCosineLR), without either, written as a careful user would (bf16 autocast when asked, the
fused AdamW kernel on CUDA; distill_step.py compiles it and makes it channels-last when asked)."""
from __future__ import annotations

import contextlib
import math
import time

import torch

from rmsnet.losses import attention_transfer_loss, focal_loss, kd_loss, similarity_preserving_loss


def warmup_cosine_lr(k: int, base_lr: float, p: dict) -> float:
    """The learning rate of the k-th optimizer step (0-based) under DeepSpeed's WarmupCosineLR with
    `p` (its JSON params, linear warmup): the scheduler starts at iteration -1 (lr 0) and is stepped
    after each optimizer step, so step k uses the ratio of iteration k - 1."""
    i = k - 1
    if i < 0:
        return 0.0
    warm = max(2, p["warmup_num_steps"])
    if i < warm:
        return base_lr * (p["warmup_min_ratio"] + i / warm * (1 - p["warmup_min_ratio"]))
    progress = min(1.0, (i - warm + 1) / max(1, p["total_num_steps"] - warm))
    cos = (1 + math.cos(math.pi * progress)) / 2
    return base_lr * max(0.0, p["cos_min_ratio"] + (1 - p["cos_min_ratio"]) * cos)


class HandLoop:
    """Plain PyTorch: the same computation as DistillTask + DeepSpeed, without either."""

    def __init__(self, teacher, student, loss_cfg, multilabel: bool, ds_config: dict, bf16: bool = False):
        self.teacher, self.student, self.c, self.multilabel = teacher, student, loss_cfg, multilabel
        opt = ds_config["optimizer"]["params"]
        self.base_lr, self.clip = opt["lr"], ds_config["gradient_clipping"]
        self.schedule = ds_config["scheduler"]["params"]
        cuda = next(student.parameters()).is_cuda
        self.opt = torch.optim.AdamW(student.parameters(), lr=opt["lr"], betas=tuple(opt["betas"]),
                                     eps=opt["eps"], weight_decay=opt["weight_decay"],
                                     fused=cuda or None)  # the fused CUDA kernel where there is one
        self.autocast = (torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16) if bf16
                         else contextlib.nullcontext())
        self.k = 0  # optimizer steps taken

    def lr(self) -> float:
        return warmup_cosine_lr(self.k, self.base_lr, self.schedule)

    def step(self, batch: dict, timings: dict | None = None) -> dict:
        x, y = batch["image"], batch["label"]  # (b, 1, s, s), (b, C)
        c, sync = self.c, (torch.cuda.synchronize if (timings is not None and x.is_cuda) else (lambda: None))
        t0 = time.perf_counter()
        with torch.no_grad(), self.autocast:
            t_logits, t_feats = self.teacher(x)  # (b, C), [(b, c_i, h_i, w_i)]
        sync()
        t1 = time.perf_counter()
        with self.autocast:
            logits, feats = self.student(x)
        logits, feats = logits.float(), [f.float() for f in feats]  # the losses in fp32
        t_logits, t_feats = t_logits.float(), [f.float() for f in t_feats]
        terms = {"task": focal_loss(logits, y if self.multilabel else y.argmax(1), alpha=c.focal_alpha,
                                    gamma=c.focal_gamma, multilabel=self.multilabel),
                 "kd": kd_loss(logits, t_logits, temperature=c.temperature, multilabel=self.multilabel),
                 "at": attention_transfer_loss(feats, t_feats),
                 "sp": similarity_preserving_loss(feats, t_feats)}
        weights = {"task": c.task_weight, "kd": c.kd_weight, "at": c.at_weight, "sp": c.sp_weight}
        loss = sum(weights[k] * v for k, v in terms.items())
        sync()
        t2 = time.perf_counter()
        loss.backward()
        sync()
        t3 = time.perf_counter()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.clip)
        for group in self.opt.param_groups:
            group["lr"] = self.lr()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.k += 1
        sync()
        if timings is not None:
            timings.update(teacher_s=t1 - t0, forward_s=t2 - t1, backward_s=t3 - t2,
                           optimizer_s=time.perf_counter() - t3)
            timings["student_s"] = timings["forward_s"] + timings["backward_s"] + timings["optimizer_s"]
        return {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}
