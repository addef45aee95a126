"""Checkpoint-and-exit on request: the run's answer to preemption and time limits.

A scheduler asks a job to stop with a signal:
* SIGUSR1: `#SBATCH --signal=USR1@300` (cluster/distill.sbatch) sends it to every task 300 s before
  the time limit; `scancel --signal=USR1 JOB` sends it by hand.
* SIGTERM, only when the ranks were started by `srun`: SLURM's `scontrol requeue`, `scancel` and
  preemption send SIGTERM, then SIGKILL `KillWait` seconds later. Under `deepspeed`/`torchrun`,
  SIGTERM keeps its default meaning (those launchers use it to tear the job down after a rank
  failed), so a dead rank still ends the job at once.

The handler only records the signal. After every optimizer step the ranks agree (a MAX all-reduce
on a CPU/gloo group, so a GPU job does not synchronise its stream for it) whether any of them got
one; if so, every rank checkpoints at the same step, rank 0 writes <run dir>/PREEMPTED and the
processes exit with EXIT_PREEMPTED. The batch script requeues the job on that marker and the restart continues with `--resume auto`.
A second signal of the same kind while the checkpoint is being written ends the process at once.
"""
from __future__ import annotations

import os
import signal
import sys

import torch

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later", i.e. requeue me
PREEMPTED_MARKER = "PREEMPTED"
"""Written into the run directory by rank 0 after the checkpoint: srun reports the highest exit
code of its tasks, and a rank that leaves first may get the others killed (--kill-on-bad-exit)."""


class Preempted(Exception):
    """Raised (on every rank) once the ranks agree to checkpoint and stop."""


def started_by_srun() -> bool:
    """A task of an srun step, not a child of `deepspeed` (sets LOCAL_SIZE) or torchrun."""
    env = os.environ
    return "SLURM_STEP_ID" in env and "LOCAL_SIZE" not in env and "TORCHELASTIC_RUN_ID" not in env


class StopRequest:
    def __init__(self, signals: tuple[int, ...] | None = None):
        if signals is None:
            signals = (signal.SIGUSR1, signal.SIGTERM) if started_by_srun() else (signal.SIGUSR1,)
        self.received: int | None = None
        self.signals = signals
        for s in signals:
            signal.signal(s, self._handle)
        self.group = None
        dist = torch.distributed
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="gloo")  # every rank must call new_group

    def _handle(self, signum, frame) -> None:
        if self.received == signum:  # asked twice: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        print(f"rank {os.environ.get('RANK', '0')}: got {signal.Signals(signum).name}, "
              f"checkpointing after this step", file=sys.stderr, flush=True)

    def agreed(self) -> bool:
        """True on every rank when any rank has received a stop signal (a collective: call it at
        the same point on all ranks)."""
        flag = torch.tensor([1 if self.received else 0], dtype=torch.int32)
        if self.group is not None:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return bool(flag.item())
