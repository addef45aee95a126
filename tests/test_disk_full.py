"""A full disk, for real: a small tmpfs mounted for the test and filled up. A shard build and a
two-rank run that meet it end with one line naming the path and the bytes, leave no `.part`
file and no incomplete checkpoint that looks complete, and finish once space is freed (the build
resumes after its last shard, the run with --resume auto). Needs the right to mount a tmpfs
(root); skipped where the machine does not give it. Marked slow, run in CI."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _launch import REPO, deepspeed_cmd, run, tiny_run_args

CFG = REPO / "launcher" / "configs" / "demo_distill.yaml"


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of the given size at tmp_path/disk; `fill(leave)` writes a filler file so that
    about `leave` bytes stay free, and returns it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = []

    def make(size_mb: int) -> Path:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mount)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(mount)
        return mount

    yield make
    for m in mounted:
        subprocess.run(["umount", "-l", str(m)], check=False)


def fill(mount: Path, leave: int) -> Path:
    filler = mount / "filler"
    free = shutil.disk_usage(mount).free
    with open(filler, "wb") as f:
        f.write(b"\x00" * max(0, free - leave))
    return filler


def _lines(proc, prefix="error: "):
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith(prefix)]


@pytest.mark.slow
def test_a_shard_build_that_fills_the_disk_names_path_and_bytes_and_resumes_once_there_is_space(
        small_disk, cxr_root):
    disk = small_disk(2)
    out = disk / "shards"
    filler = fill(disk, 48 << 10)
    cmd = [sys.executable, "-m", "data_pipeline.build_shards", "--dataset", "chestxray14", "--root",
           str(cxr_root), "--out", str(out), "--size", "48", "--shard-size", "8", "--workers", "1", "--quiet"]
    full = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert full.returncode == 1, full.stdout + full.stderr
    assert "Traceback" not in full.stderr
    [line] = _lines(full)
    m = re.fullmatch(rf"error: {re.escape(str(out))}/(\w+-\d{{6}}\.tar): no space left on the device "
                     rf"\(([\d,]+) bytes free there; about ([\d,]+) more bytes needed to finish the build\); "
                     rf"the unfinished shard was removed: free space and run the same command again \(the "
                     rf"build resumes after its last complete shard\)", line)
    assert m, line
    assert int(m.group(3).replace(",", "")) > int(m.group(2).replace(",", ""))
    assert not list(out.glob("*.part")) and not (out / m.group(1)).exists()
    assert not (out / "manifest.json").exists()

    filler.unlink()
    resumed = subprocess.run(cmd + ["--verify"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert (out / "manifest.json").is_file() and not list(out.glob("*.part"))


@pytest.mark.slow
def test_a_two_rank_run_whose_checkpoint_fills_the_disk_stops_on_one_line_and_resumes_once_there_is_space(
        small_disk, cxr_shards, random_teacher):
    disk = small_disk(96)
    filler = fill(disk, 6 << 20)  # config, TensorBoard and the run lock fit; a checkpoint (~16 MB) does not
    args = tiny_run_args(CFG, cxr_shards, disk, random_teacher, "run.name=full", "train.batch_size_per_gpu=2",
                         "train.warmup_steps=1", "train.max_steps=3", "train.checkpoint_every_steps=1")
    full = run(deepspeed_cmd(2, *args))
    out = full.stdout + full.stderr
    assert full.returncode != 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = _lines(full)
    assert errors, out[-3000:]  # each rank that met the full disk says so (usually one)
    ckpt = disk / "full" / "checkpoints"
    for line in errors:
        assert re.fullmatch(rf"error: (rank [01] of 2 on \S+: )?{re.escape(str(ckpt))}/main-e0000b00001-s00000001: "
                            rf"no space left on the device \([\d,]+ bytes free there; about [\d,]+ more bytes "
                            rf"needed for one checkpoint, an estimate\); the incomplete checkpoint has no files.json, "
                            rf"so --resume auto passes over it \(deleting it frees its space\); free space, then "
                            rf"--resume auto continues from the start \(no checkpoint is complete\)", line), line
    run_dir = disk / "full"
    tag = ckpt / "main-e0000b00001-s00000001"
    # nothing outside the incomplete checkpoint is half-written (a rank the launcher killed while it
    # wrote may leave its part inside it), and nothing in it says it is complete
    assert not [p for p in run_dir.rglob("*.part") if tag not in p.parents]
    assert not (tag / "files.json").exists() and not (run_dir / "final").exists()

    filler.unlink()
    resumed = run(deepspeed_cmd(2, *args, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert (run_dir / "final" / "model.pt").is_file() and (run_dir / "metrics.json").is_file()
