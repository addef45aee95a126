"""Starting the project's commands as real processes, for the slow end-to-end tests."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_cmd(ranks: int, *args) -> list[str]:
    """`deepspeed --num_gpus N launcher/distill.py ...` (N CPU ranks on a host without GPUs)."""
    exe = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    return [exe, "--num_gpus", str(ranks), "--master_port", str(free_port()),
            str(REPO / "launcher" / "distill.py"), *args]


def leaked_shm(cmd: list[str]) -> list[Path]:
    """DeepSpeed CPU all-reduce segments in /dev/shm left behind by the `deepspeed_cmd` run `cmd`
    (named after its --master_port; launcher.dist.release_shm_names unlinks them at start-up)."""
    port = cmd[cmd.index("--master_port") + 1]
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def python_cmd(*args) -> list[str]:
    return [sys.executable, str(REPO / "launcher" / "distill.py"), *args]


def run(cmd, timeout=420) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def tiny_run_args(config: Path, shards, out_dir, teacher, *overrides: str) -> list[str]:
    """distill.py arguments for a tiny real run: 48-pixel images, the given `key=value` overrides."""
    args = ["--config", str(config), "--set", f"data.shards={shards}", "--set", f"run.out_dir={out_dir}",
            "--set", f"teacher.checkpoint={teacher}", "--set", "data.image_size=48",
            "--set", "train.log_every=1"]
    for o in overrides:
        args += ["--set", o]
    return args


def assert_same_student(run_a: Path, run_b: Path) -> None:
    """The two runs' exported students (final/model.pt) are bit-identical, tensor by tensor."""
    import torch

    a = torch.load(Path(run_a) / "final" / "model.pt", weights_only=True)["model"]
    b = torch.load(Path(run_b) / "final" / "model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def trained_params(run_dir: Path) -> dict:
    """The parameters of a run's final/model.pt, without BatchNorm running statistics (they do not
    feed back into training, and ranks keep their own between epoch-end averages)."""
    import torch

    state = torch.load(Path(run_dir) / "final" / "model.pt", weights_only=True)["model"]
    return {k: v for k, v in state.items()
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def run_signalled_at(cmd, marker: str, sig=signal.SIGUSR1, timeout: int = 300) -> tuple[int, str]:
    """Run `cmd`, send it `sig` when a line of its output contains `marker`; (exit status, output)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    out = []
    for line in proc.stdout:
        out.append(line)
        if marker in line:
            proc.send_signal(sig)
    return proc.wait(timeout=timeout), "".join(out)
