"""Shards damaged after the build, met by real runs: two DeepSpeed ranks stop together on one
line (the pre-run check against the manifest; a damaged sample mid-epoch with either loader) and
leave no model behind; evaluate.py refuses the same shards. Marked slow, run in CI."""
from __future__ import annotations

import re
import shutil
import sys

import pytest

from _damage import damage
from _launch import REPO, deepspeed_cmd, python_cmd, run, tiny_run_args
from data_pipeline.manifest import read_manifest

CFG = REPO / "launcher" / "configs" / "demo_distill.yaml"
EVALUATE = REPO / "launcher" / "evaluate.py"


def _one_error_line(proc) -> str:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
def test_damaged_shards_stop_training_and_evaluation_with_one_line_naming_shard_and_sample(
        cxr_shards, random_teacher, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(cxr_shards, shards)
    args = lambda name, *extra: tiny_run_args(  # noqa: E731
        CFG, shards, tmp_path, random_teacher, f"run.name={name}", "train.batch_size_per_gpu=2",
        "train.warmup_steps=1", *extra)
    sound = run(python_cmd(*args("sound", "train.max_steps=2")))
    assert sound.returncode == 0, sound.stdout[-2000:] + sound.stderr[-3000:]

    train_tar, train_key = damage(shards, "train", 1, 3, "lbl", b"\xff")
    # during the epoch (the size check passes): every rank stops at the damaged batch
    for loader in ("torch", "dali"):
        name = f"read_{loader}"
        proc = run(deepspeed_cmd(2, *args(name, "data.verify=size", f"data.loader={loader}")))
        assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
        line = _one_error_line(proc)
        assert re.fullmatch(rf"error: {re.escape(train_tar)}: sample {train_key}: label vector \[255, [0-9, ]+\] "
                            rf"is not multi-hot \(0/1\); the run stopped there \(its last checkpoint is kept: "
                            rf"fix or rebuild the shards, then --resume auto\)", line), line
        assert not (tmp_path / name / "final").exists() and not (tmp_path / name / "best").exists()
        assert not (tmp_path / name / "run.lock").exists()

    val_tar, val_key = damage(shards, "val", 0, 1, "png", b"\x00" * 16)
    hint = f"; rebuild the shards, or list every problem with python -m data_pipeline.build_shards " \
           f"--verify-only --out {shards}"
    # before training: rank 1 checks train-000001 and val-000000 (shard i is rank i % 2's)
    checked = run(deepspeed_cmd(2, *args("checked")))
    assert checked.returncode == 2
    assert _one_error_line(checked) == (f"error: {train_tar}: sha256 differs from the manifest (the shard "
                                        f"was changed after the build) (and 1 more on this rank){hint}")
    assert not (tmp_path / "checked" / "checkpoints").exists()
    assert not (tmp_path / "checked" / "run.lock").exists()

    evaluate = lambda *extra: run([sys.executable, str(EVALUATE), "--checkpoint",  # noqa: E731
                                   str(tmp_path / "sound"), "--no-teacher", "--bootstrap", "20", *extra])
    refused = evaluate()
    assert refused.returncode == 2
    assert _one_error_line(refused) == (f"error: {val_tar}: sha256 differs from the manifest (the shard was "
                                        f"changed after the build){hint}")
    unchecked = evaluate("--verify", "none", "--loader", "torch")  # DALI may crash on it (docs/design.md)
    assert unchecked.returncode == 2
    assert re.fullmatch(rf"error: {re.escape(val_tar)}: sample {val_key}: image does not decode: .+",
                        _one_error_line(unchecked))
    assert not (tmp_path / "sound" / "eval").exists()


@pytest.mark.slow
def test_skip_mode_trains_and_evaluates_on_two_ranks_around_damaged_samples_and_counts_them(
        cxr_shards, random_teacher, tmp_path):
    """data.on_damaged: skip. A label of 255 and an undecodable PNG in train, an undecodable PNG
    in val: two DALI ranks train, evaluate and export without reading any of them (DALI's CPU
    decoder may crash on such an image, so it must never be given one), and the run says what it
    left out: its output, skipped_samples.json, metrics.json and TensorBoard. evaluate.py takes the
    mode from the run's config."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from data_pipeline.loader_common import batches_per_epoch
    from launcher.metrics_doc import model_result, read_metrics

    shards = tmp_path / "shards"
    shutil.copytree(cxr_shards, shards)
    damaged = [("train", *damage(shards, "train", 1, 3, "lbl", b"\xff")),
               ("train", *damage(shards, "train", 0, 2, "png", b"\x00" * 16)),
               ("val", *damage(shards, "val", 0, 1, "png", b"\x00" * 16))]
    proc = run(deepspeed_cmd(2, *tiny_run_args(
        CFG, shards, tmp_path, random_teacher, "run.name=skip", "train.batch_size_per_gpu=2",
        "train.warmup_steps=1", "train.epochs=1", "data.loader=dali", "data.on_damaged=skip")))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in out and "error: " not in out
    run_dir, m = tmp_path / "skip", read_manifest(shards)
    listed = json.loads((run_dir / "skipped_samples.json").read_text())
    assert listed["counts"] == {"train": 2, "val": 1, "test": 0}
    assert sorted((s["split"], s["key"]) for s in listed["samples"]) == sorted((s, k) for s, _, k in damaged)
    assert len(listed["shards_changed"]) == 3
    warnings = [ln for ln in proc.stdout.splitlines() if ln.startswith("warning: skipping ")]
    assert warnings == [
        f"warning: skipping 2 damaged samples of split 'train' (listed in {run_dir / 'skipped_samples.json'}), "
        f"the first: {listed['samples'][0]['problem']}",
        f"warning: skipping 1 damaged sample of split 'val' (listed in {run_dir / 'skipped_samples.json'}), "
        f"the first: {listed['samples'][2]['problem']}"]
    steps = batches_per_epoch(m["splits"]["train"]["samples"] - 2, 2, 2)
    assert f"x {steps} steps" in proc.stdout
    doc = read_metrics(run_dir / "metrics.json")
    assert doc["skipped_samples"]["counts"] == listed["counts"]
    assert model_result(doc, "student", "val")["samples"] == m["splits"]["val"]["samples"] - 1
    assert model_result(doc, "student", "test")["samples"] == m["splits"]["test"]["samples"]
    assert (run_dir / "final" / "model.pt").is_file()
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("data/skipped/train")] == [2]
    assert [e.value for e in acc.Scalars("data/skipped/val")] == [1]

    evaluated = run([sys.executable, str(EVALUATE), "--checkpoint", str(run_dir), "--no-teacher",
                     "--bootstrap", "20", "--loader", "dali"])
    assert evaluated.returncode == 0, evaluated.stdout[-2000:] + evaluated.stderr[-3000:]
    assert (f"warning: skipping 1 damaged sample of split 'val', the first: {listed['samples'][2]['problem']}"
            in evaluated.stdout.splitlines())
    edoc = read_metrics(run_dir / "eval" / "test" / "metrics.json")
    assert edoc["skipped_samples"]["counts"] == {"val": 1, "test": 0}
    assert model_result(edoc, "student", "test")["samples"] == m["splits"]["test"]["samples"]
