"""TensorBoard and console progress, on rank 0 only.

`Monitor` writes scalars, text, figures and hparams; `NullMonitor` is the same interface doing
nothing, handed to every other rank so the training code never asks "am I rank 0?". DeepSpeed's
own TensorBoard monitor only knows lr and loss scale, so this one writes everything (one event
stream per run directory, read back by `tensorboard`'s EventAccumulator in the tests).
"""
from __future__ import annotations

import sys
import time


class NullMonitor:
    def scalars(self, values: dict, step: int, prefix: str = "") -> None: ...
    def text(self, tag: str, text: str, step: int = 0) -> None: ...
    def figure(self, tag: str, fig, step: int = 0) -> None: ...
    def hparams(self, hparams: dict, metrics: dict) -> None: ...
    def print(self, *args) -> None: ...
    def close(self) -> None: ...


class Monitor(NullMonitor):
    def __init__(self, log_dir):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(log_dir))

    def scalars(self, values: dict, step: int, prefix: str = "") -> None:
        for k, v in values.items():
            if v is not None:
                self.writer.add_scalar(f"{prefix}{k}", float(v), step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        self.writer.add_text(tag, text.replace("\n", "  \n"), step)

    def figure(self, tag: str, fig, step: int = 0) -> None:
        self.writer.add_figure(tag, fig, step, close=True)

    def hparams(self, hparams: dict, metrics: dict) -> None:
        flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        self.writer.add_hparams(flat, {k: v for k, v in metrics.items() if v is not None},
                                run_name="hparams")

    def print(self, *args) -> None:
        print(*args, flush=True)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class Progress:
    """One line per logging step: step/total, epoch, loss terms, samples/s, ETA (rank 0)."""

    def __init__(self, total_steps: int, enabled: bool):
        self.total, self.enabled, self.t0 = total_steps, enabled, time.perf_counter()

    def line(self, step: int, epoch: int, values: dict, samples_per_s: float) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(step, 1) * (self.total - step)
        terms = " ".join(f"{k}={v:.4f}" for k, v in values.items())
        print(f"[step {step:>6}/{self.total} ep {epoch}] {terms} | {samples_per_s:7.1f} samples/s | "
              f"ETA {int(eta // 60):d}m{int(eta % 60):02d}s", file=sys.stdout, flush=True)
