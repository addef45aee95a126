"""Every command ends on an error with one line (data_pipeline/cli.py), and writes that meet a full
disk name the path and leave no part behind (data_pipeline/disk.py). The full disk here is the
kernel's own: /dev/full answers every write with ENOSPC."""
from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from data_pipeline.cli import DEBUG_HINT, error_line, fail, run_cli
from data_pipeline.disk import DiskFull, is_disk_full, out_of_space, write_atomic
from data_pipeline.shard_format import ShardWriter
from launcher.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()


def _raises(error):
    def main(argv=None):
        raise error
    return main


@pytest.fixture
def one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "RMS_DEBUG"):
        monkeypatch.delenv(name, raising=False)


def test_an_unforeseen_error_is_one_line_and_status_1_and_debug_adds_the_traceback(one_process, capsys,
                                                                                    monkeypatch):
    assert run_cli(_raises(KeyError("teacher_dtype")), ["--config", "x"]) == 1
    err = capsys.readouterr().err
    assert err == f"error: KeyError: 'teacher_dtype' ({DEBUG_HINT})\n"
    assert run_cli(_raises(KeyError("teacher_dtype")), ["--debug"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "raise error" in err
    assert err.endswith(f"error: KeyError: 'teacher_dtype' ({DEBUG_HINT})\n")
    monkeypatch.setenv("RMS_DEBUG", "1")
    assert run_cli(_raises(KeyError("x")), []) == 1
    assert capsys.readouterr().err.startswith("Traceback")
    monkeypatch.setenv("RMS_DEBUG", "0")
    assert run_cli(_raises(KeyError("x")), []) == 1
    assert "Traceback" not in capsys.readouterr().err
    assert run_cli(lambda argv=None: 3, []) == 3  # a status of main's own passes through
    with pytest.raises(SystemExit):
        run_cli(_raises(SystemExit("error: said already")), [])


def test_the_project_s_errors_keep_their_words_and_a_rank_says_which_it_is(one_process, monkeypatch):
    assert error_line(ConfigError("train.lr must be > 0")) == "error: train.lr must be > 0"
    first = RuntimeError("unexpected pos 25088 vs 24980\n  a C++ frame\n  another")
    assert error_line(first) == f"error: RuntimeError: unexpected pos 25088 vs 24980 ({DEBUG_HINT})"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert error_line(ConfigError("bad")) == f"error: rank 1 of 2 on {HOST}: bad"
    # a collective that lost its peer is not the cause: no `error:` prefix
    gone = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                        "[127.0.0.1]:29500")
    assert error_line(gone) == (f"rank 1 of 2 on {HOST}: stopped, another rank ended first (RuntimeError: "
                                f"{gone})")


def test_enospc_is_named_as_a_full_disk_with_the_path(one_process, tmp_path):
    e = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.tar"))
    assert is_disk_full(e) and out_of_space(e, tmp_path)
    line = error_line(e)
    assert line.startswith(f"error: {tmp_path / 'x.tar'}: no space left on the device (") and "bytes free there" in line
    assert not out_of_space(RuntimeError("unexpected pos 1 vs 2"), tmp_path)  # room left: not a full disk
    assert not out_of_space(ValueError("x"), tmp_path)


def test_an_atomic_write_that_meets_a_full_disk_leaves_no_part_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "manifest.json"
    target.write_text('{"old": true}')
    part = tmp_path / "manifest.json.part"
    part.symlink_to("/dev/full")  # the write goes through the part: ENOSPC from the kernel
    with pytest.raises(DiskFull) as e:
        write_atomic(target, json.dumps({"new": True}), fsync=True)
    assert str(e.value).startswith(f"{target}: no space left on the device (")
    assert "about 13 more bytes needed" in str(e.value)
    assert not part.exists() and not part.is_symlink()
    assert json.loads(target.read_text()) == {"old": True}


def test_a_shard_writer_on_a_full_disk_aborts_without_raising_again_and_removes_its_part(tmp_path):
    tar = tmp_path / "train-000000.tar"
    (tmp_path / "train-000000.tar.part").symlink_to("/dev/full")
    writer = ShardWriter(tar)
    with pytest.raises(OSError) as e:
        for i in range(64):  # past tarfile's buffer: the kernel refuses the write
            writer.write([(f"k{i:04d}.png", b"\x00" * 65536)])
        writer.close()
    assert is_disk_full(e.value)
    writer.abort()  # the final flush fails again: swallowed, the part removed
    assert list(tmp_path.iterdir()) == []


def test_build_shards_foreseen_errors_print_one_line_and_debug_adds_the_traceback(tmp_path):
    cmd = [sys.executable, "-m", "data_pipeline.build_shards", "--dataset", "chestxray14", "--root",
           str(tmp_path / "absent"), "--out", str(tmp_path / "out"), "--quiet"]
    plain = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    lines = [ln for ln in plain.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(tmp_path / "absent") in lines[0]
    debug = subprocess.run(cmd + ["--debug"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and debug.stderr.startswith("Traceback")
    assert debug.stderr.rstrip().splitlines()[-1] == lines[0]


def test_fail_is_the_foreseen_error_exit(one_process, capsys):
    try:
        raise FileNotFoundError("x: not found")
    except FileNotFoundError as e:
        with pytest.raises(SystemExit) as done:
            fail(e)
    assert done.value.code == "error: x: not found"
    assert capsys.readouterr().err == ""
