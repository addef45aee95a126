"""Training that went non-finite stops, on every rank together, instead of passing for success.

A NaN or inf loss term, or an optimizer step DeepSpeed skipped (fp16 overflow), on more than
`train.max_bad_steps` consecutive optimizer steps ends the run: the trainer raises
NonFiniteTraining on every rank at the same point, before anything is checkpointed, validated or
exported from the broken weights, and the launcher prints one line and exits with EXIT_NONFINITE.

The per-step bookkeeping stays on the device (a few tiny kernels, no host sync); the counts are
read only at `check`, a collective the trainer calls where it syncs anyway: logging steps, and
before every checkpoint, validation and export. A streak that starts and ends between two checks
is still seen (the longest streak since the last check is kept), and a streak still running at a
check counts on into the next interval.
"""
from __future__ import annotations

from typing import Callable

import torch

from rmsnet.objective import TERMS

EXIT_NONFINITE = 3
NAMES = ("loss",) + TERMS
SKIPPED = "an optimizer step skipped for overflow"


class NonFiniteTraining(RuntimeError):
    """Raised on every rank; the message is the one line the launcher prints."""


class NonFiniteGuard:
    def __init__(self, max_bad_steps: int, device: torch.device):
        self.max_bad = max_bad_steps
        zero = torch.zeros((), dtype=torch.int64, device=device)
        self.streak, self.longest, self.last_bad = zero.clone(), zero.clone(), zero.clone() - 1
        self.seen = torch.zeros(len(NAMES) + 1, dtype=torch.bool, device=device)  # + skipped step
        self.group = None
        dist = torch.distributed
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="gloo")  # every rank must call new_group

    def observe(self, terms: dict, step: int, applied: bool) -> None:
        """After optimizer step `step`: its loss terms (detached device tensors) and whether
        DeepSpeed applied the update."""
        flags = torch.zeros_like(self.seen)
        for i, name in enumerate(NAMES):
            if name in terms:
                flags[i] = ~torch.isfinite(terms[name]).all()
        flags[-1] = not applied
        bad = flags.any().long()
        self.streak = (self.streak + 1) * bad
        self.longest = torch.maximum(self.longest, self.streak)
        self.last_bad = torch.where(bad.bool(), torch.full_like(self.last_bad, step), self.last_bad)
        self.seen |= flags

    def check(self, before: str, last_good: Callable[[], str | None],
              module: torch.nn.Module | None = None) -> None:
        """Collective (every rank, same point): raise NonFiniteTraining when any rank's longest
        streak since the last check exceeds max_bad_steps, or, with `module` (before anything is
        saved from it), when any of its parameters or buffers is NaN/inf. `before`: what was about
        to happen; `last_good()`: the newest complete checkpoint, asked only when stopping."""
        weights_bad = torch.zeros((), dtype=torch.int64, device=self.streak.device)
        if module is not None:  # ZeRO-3 leaves empty placeholders here: the streak covers it
            for t in list(module.parameters()) + list(module.buffers()):
                if t.numel() and t.is_floating_point():
                    weights_bad |= (~torch.isfinite(t).all()).long()
        state = torch.cat([torch.stack([self.longest, self.last_bad, weights_bad]), self.seen.long()]).cpu()
        if self.group is not None:
            torch.distributed.all_reduce(state, op=torch.distributed.ReduceOp.MAX, group=self.group)
        longest, last_bad, weights_bad = (int(v) for v in state[:3])
        if longest > self.max_bad or weights_bad:
            what = [f"'{n}' was NaN/inf" for n, s in zip(NAMES, state[3:-1].tolist()) if s]
            what += [SKIPPED] if state[-1] else []
            streak = (f"{' and '.join(what)} on {longest} consecutive optimizer steps (up to step {last_bad}; "
                      f"train.max_bad_steps is {self.max_bad})") if longest > self.max_bad else ""
            weights = "the student's weights hold NaN/inf" if weights_bad else ""
            raise NonFiniteTraining(
                f"training went non-finite: {'; '.join(x for x in (streak, weights) if x)}; stopped before "
                f"{before}, and nothing was saved from these weights; last good checkpoint: "
                f"{last_good() or 'none (the run had saved none)'}. Lower train.lr or check the inputs")
        self.longest = self.streak.clone()  # a streak still running counts on
        self.seen.zero_()
