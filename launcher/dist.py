"""Every question about the process environment, answered in one place.

Supported launches (detected in this order):
* `deepspeed launcher/distill.py ...` or `torchrun`: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
  MASTER_PORT are set by the launcher (DeepSpeed also appends `--local_rank=N`). A one-host
  deepspeed job given no --master_port gets a free port instead of deepspeed's fixed default
  (`agree_local_port`), so two jobs on one machine do not collide.
* `srun` under SLURM, one task per GPU: SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS give the ranks
  (DeepSpeed itself reads no SLURM_* variable); MASTER_ADDR / MASTER_PORT must be exported by the
  sbatch script (see `cluster/`).
* a plain `python launcher/distill.py ...`: one process, world size 1, a local rendezvous.

A half-set environment (say RANK without WORLD_SIZE) is an error, not a guess. Threads: unless the
user set OMP_NUM_THREADS, each rank gets cores // local ranks intra-op threads (two CPU ranks on a
two-core machine would otherwise oversubscribe each other badly).
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEEPSPEED_DEFAULT_PORT = "29500"  # deepspeed --master_port's default (deepspeed.constants)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _parent_of(pid: int) -> int:
    try:  # field 4 of /proc/<pid>/stat, after the parenthesised command name
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def port_file(launcher_pid: int) -> Path:
    """Where the ranks of one local deepspeed job agree on their port (named after the job's
    deepspeed.launcher.launch process, their common parent, and its start time)."""
    try:
        started = Path(f"/proc/{launcher_pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        started = "0"
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"rms-distill-port-{os.getuid()}-{launcher_pid}-{started}"


def agree_local_port(timeout_s: float = 120.0) -> Path | None:
    """Give a one-host deepspeed job whose user named no --master_port a free port of its own.

    deepspeed's launcher hands every job the same default port (29500): a second job on the same
    machine would fail to bind it, or its ranks would join the first job's rendezvous. When every
    rank is on this host (LOCAL_SIZE == WORLD_SIZE), the port is the default, and the `deepspeed`
    command line has no --master_port, local rank 0 picks a free port and writes it to a file named
    after the ranks' common parent; the others wait for it. Returns the file (rank 0 removes it once
    every rank has joined), or None when the launch is left as it is."""
    if (os.environ.get("MASTER_PORT") != DEEPSPEED_DEFAULT_PORT
            or os.environ.get("LOCAL_SIZE") != os.environ.get("WORLD_SIZE")):
        return None
    launcher = os.getppid()
    if "deepspeed.launcher.launch" not in _cmdline(launcher):
        return None
    runner = _cmdline(_parent_of(launcher))
    if not runner or any(a == "--master_port" or a.startswith("--master_port=") for a in runner):
        return None  # the user chose the port (or the runner cannot be read): keep it
    path = port_file(launcher)
    if os.environ.get("LOCAL_RANK") == "0":
        part = path.with_name(path.name + f".part{os.getpid()}")
        part.write_text(str(_free_port()))
        os.replace(part, path)  # atomic: a waiting rank never reads half a number
    else:
        deadline = time.monotonic() + timeout_s
        while not path.is_file():
            if time.monotonic() > deadline:
                raise RuntimeError(f"local rank 0 did not publish the job's port in {path} within "
                                   f"{timeout_s:.0f} s (give deepspeed an explicit --master_port)")
            time.sleep(0.05)
    os.environ["MASTER_PORT"] = path.read_text().strip()
    return path


def launched_distributed() -> bool:
    """Started by a distributed launcher: deepspeed / torchrun (rank variables) or srun with
    several tasks."""
    return (int(os.environ.get("WORLD_SIZE", "1")) > 1 or any(v in os.environ for v in RANK_VARS)
            or ("SLURM_STEP_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1))


def detect_env() -> dict[str, int]:
    """rank / world_size / local_rank / local_world_size from the environment; sets the
    torch.distributed variables when they are derived (SLURM, single process)."""
    present = [v for v in RANK_VARS if v in os.environ]
    if present and len(present) != len(RANK_VARS):
        missing = [v for v in RANK_VARS if v not in os.environ]
        raise RuntimeError(f"half-set distributed environment: {present} set but {missing} missing")
    if not present and "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        for v in ("MASTER_ADDR", "MASTER_PORT"):
            if v not in os.environ:
                raise RuntimeError(f"running under srun with SLURM_NTASKS > 1 but {v} is not set; "
                                   f"export it in the sbatch script (see cluster/distill.sbatch)")
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ["SLURM_LOCALID"]
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(slurm_tasks_on_this_node()))
    elif not present:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    world = int(os.environ["WORLD_SIZE"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or _guess_local_world(world)
    env = {"rank": int(os.environ["RANK"]), "world_size": world,
           "local_rank": int(os.environ["LOCAL_RANK"]), "local_world_size": local_world}
    if not 0 <= env["rank"] < world or not 0 <= env["local_rank"] < local_world:
        raise RuntimeError(f"inconsistent ranks in the environment: {env}")
    return env


def slurm_tasks_on_this_node() -> int:
    """Tasks of this job step on this node, from SLURM's compressed list ("2(x3),1" = 2, 2, 2, 1
    tasks on the step's nodes in order), indexed by SLURM_NODEID."""
    spec = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return 1
    counts: list[int] = []
    for part in spec.split(","):
        n, _, rep = part.partition("(x")
        counts += [int(n)] * (int(rep.rstrip(")")) if rep else 1)
    node = int(os.environ.get("SLURM_NODEID", "0"))
    if not 0 <= node < len(counts):
        raise RuntimeError(f"SLURM_NODEID={node} is outside the tasks-per-node list {spec!r}")
    return counts[node]


def _guess_local_world(world: int) -> int:
    # torchrun exports LOCAL_WORLD_SIZE; DeepSpeed's launcher exports LOCAL_SIZE instead.
    if "LOCAL_SIZE" in os.environ:
        return int(os.environ["LOCAL_SIZE"])
    return world


def set_threads(local_world_size: int) -> int:
    if "OMP_NUM_THREADS" in os.environ:
        n = int(os.environ["OMP_NUM_THREADS"])
    else:
        n = max(1, (os.cpu_count() or 1) // local_world_size)
    torch.set_num_threads(n)
    return n


def gpu_index(local_rank: int) -> int:
    """This rank's GPU among the visible ones: its local rank when it sees every GPU of the node,
    0 when the scheduler gave each task only its own (srun --gpu-bind=single:1, CUDA_VISIBLE_DEVICES
    set per task)."""
    visible = torch.cuda.device_count()
    if visible == 1:
        return 0
    if local_rank < visible:
        return local_rank
    raise RuntimeError(f"local rank {local_rank} but only {visible} visible GPUs "
                       f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): "
                       f"start one task per GPU")


def init_distributed() -> DistEnv:
    """Detect the launch, pin threads/devices, start the process group (gloo on CPU, nccl on GPU)."""
    import deepspeed

    e = detect_env()
    port_agreed = agree_local_port()
    set_threads(e["local_world_size"])
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", gpu_index(e["local_rank"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    release_shm_names(e["rank"])  # (a barrier: every rank has read the agreed port by now)
    if port_agreed is not None and e["local_rank"] == 0:
        port_agreed.unlink(missing_ok=True)
    return DistEnv(e["rank"], e["world_size"], e["local_rank"], e["local_world_size"], device, backend)


def shm_segment(rank: int) -> Path:
    """The shared-memory segment DeepSpeed's CPU all-reduce op (ShareMemCommBuilder) creates for
    `rank` when every rank is on one host (LOCAL_SIZE == world size): ~69 MB in /dev/shm, named
    from the uid, MASTER_ADDR and MASTER_PORT."""
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_names(rank: int) -> None:
    """Unlink this rank's DeepSpeed shared-memory segment once every rank has mapped it.

    DeepSpeed creates the segment at init and never unlinks it, so each multi-rank CPU run would
    leave ~69 MB per rank in /dev/shm (RAM) for good, and a job that restarts on the same port
    could map a dead run's buffer. Every rank maps every other rank's segment inside
    `deepspeed.init_distributed` (it waits until they exist), so after a barrier the names are no
    longer needed: the mappings stay valid and the kernel frees the memory when the last rank
    exits, however it exits (SIGKILL included)."""
    if not torch.distributed.is_initialized():
        return
    torch.distributed.barrier()  # on every rank, segment or not: a conditional barrier could hang
    shm_segment(rank).unlink(missing_ok=True)


def all_gather_objects(obj) -> list:
    """Collective: every rank's picklable `obj`, in rank order, on every rank."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [obj]
    found = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(found, obj)
    return found


def first_error(message: str | None) -> str | None:
    """Collective: the lowest rank's error message (None where a rank has none), the same on
    every rank, so that all of them stop together on an error some rank found."""
    return next((m for m in all_gather_objects(message) if m), None)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a tensor from every rank along dim 0 (sizes may differ between ranks)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return t
    world = torch.distributed.get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    torch.distributed.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    out = [torch.zeros_like(padded) for _ in range(world)]
    torch.distributed.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])


def shutdown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradient over ranks and keeps the local slice.

    Every rank computes the same loss on the gathered global batch; summing the ranks' gradients
    for the local rows and letting data parallelism average them over ranks gives exactly the
    gradient of single-process training on the global batch (the SimCLR `GatherLayer` argument).
    """

    @staticmethod
    def forward(ctx, t):
        world = torch.distributed.get_world_size()
        parts = [torch.empty_like(t) for _ in range(world)]
        torch.distributed.all_gather(parts, t.contiguous())
        ctx.rank, ctx.n = torch.distributed.get_rank(), t.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every rank along dim 0, differentiably (see above).
    Used by the similarity-preserving loss over the global batch."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return t
    if not t.requires_grad:
        parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(parts, t.contiguous())
        return torch.cat(parts)
    return _GatherWithGrad.apply(t)


def average_batchnorm_stats(module: torch.nn.Module) -> None:
    """Average BatchNorm running statistics over ranks.

    Each rank updates its running mean/var from its own micro-batches, and DeepSpeed (unlike DDP's
    broadcast_buffers) never synchronises buffers: without this, ranks would evaluate with different
    statistics and the checkpoint (written by rank 0) would hold rank 0's alone.
    """
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return
    world = torch.distributed.get_world_size()
    for name, buf in module.named_buffers():
        if buf.is_floating_point() and name.rsplit(".", 1)[-1] in ("running_mean", "running_var"):
            torch.distributed.all_reduce(buf)
            buf.div_(world)
