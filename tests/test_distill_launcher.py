"""The launcher end to end, through the real `deepspeed` launcher on two CPU ranks (gloo).

These start real processes (about 20 s each, most of it DeepSpeed start-up): marked slow, run in CI.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from _launch import REPO, deepspeed_cmd, leaked_shm, python_cmd, run, tiny_run_args
from data_pipeline.loader import build_loader
from launcher.metrics_doc import model_result, read_metrics
from launcher.validation import evaluate_split
from rmsnet.teachers import create_tapped_model

DISTILL_CFG = REPO / "launcher" / "configs" / "demo_distill.yaml"


def _tiny(shards, out_dir, teacher, *extra) -> list[str]:
    return tiny_run_args(DISTILL_CFG, shards, out_dir, teacher, "train.batch_size_per_gpu=4",
                         "train.max_steps=3", "train.warmup_steps=1") + list(extra)


@pytest.mark.slow
def test_two_rank_cpu_distillation_leaves_checkpoint_student_and_readable_tensorboard(
        cxr_shards, random_teacher, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cmd = deepspeed_cmd(2, *_tiny(cxr_shards, tmp_path, random_teacher))
    proc = run(cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not leaked_shm(cmd), "DeepSpeed's shared-memory segments outlived the run"
    run_dir = tmp_path / "student"
    assert "world 2 (gloo, cpu)" in proc.stdout
    assert "per-class AUROC" in proc.stdout and "mean AUROC" in proc.stdout

    # DeepSpeed checkpoint: latest tag, model states, and one ZeRO optimizer partition per rank.
    ckpt = run_dir / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    assert (ckpt / tag / "mp_rank_00_model_states.pt").is_file()
    assert len(list((ckpt / tag).glob("*optim_states.pt"))) == 2
    from launcher.checkpoints import FILES, check_complete
    check_complete(ckpt / tag)  # files.json lists every rank's files, written last
    listed = json.loads((ckpt / tag / FILES).read_text())["files"]
    assert {"rank0_state.pt", "rank1_state.pt", "mp_rank_00_model_states.pt"} <= set(listed)
    assert not (run_dir / "run.lock").exists()  # released at the end

    # The exported student rebuilds into the same architecture.
    exported = torch.load(run_dir / "final" / "model.pt", weights_only=True)
    student = create_tapped_model(exported["meta"]["arch"], exported["meta"]["num_classes"], in_chans=1)
    student.model.load_state_dict(exported["model"])

    # The two ranks evaluated exactly what was exported: same per-class AUROC in one process
    # (BatchNorm statistics are averaged over ranks, so rank 0's export is every rank's model).
    student.eval()
    manifest = json.loads((Path(cxr_shards) / "manifest.json").read_text())
    loader = build_loader(cxr_shards, "test", backend="dali", batch_size=5, image_size=48, train=False)
    single = evaluate_split(student.forward_logits, loader, torch.device("cpu"), manifest, torch.float32)
    in_run = model_result(read_metrics(run_dir / "metrics.json"), "student", "test")
    assert in_run["samples"] == single["samples"] == manifest["splits"]["test"]["samples"]
    for name, value in single["auroc"].items():
        assert in_run["auroc"][name] == pytest.approx(value, abs=1e-6), name

    (run_dir / "config.yaml").read_text()
    assert '"stage": 1' in (run_dir / "deepspeed.main.json").read_text()  # train.zero_stage: auto

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ["train/loss", "train/task", "train/kd", "train/at", "train/sp", "train/lr",
                "train/samples_per_s", "train/grad_norm", "train/time/teacher_forward_s",
                "train/time/student_step_s", "eval/student/test/mean_auroc",
                "eval/teacher/test/mean_auroc"]:
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    assert "eval/student/val/mean_auroc" in tags  # validated at the end of the (cut) epoch
    assert {"eval/attention_maps", "eval/roc_curves"} <= set(acc.Tags()["images"])
    best = torch.load(run_dir / "best" / "model.pt", weights_only=True)
    assert best["meta"]["val_mean_auroc"] is not None


@pytest.mark.slow
def test_single_process_supervised_mode_trains_without_teacher(cxr_shards, tmp_path):
    cfg = REPO / "launcher" / "configs" / "demo_teacher.yaml"
    proc = run(python_cmd("--config", str(cfg),
                          "--set", f"data.shards={cxr_shards}", "--set", f"run.out_dir={tmp_path}",
                          "--set", "data.image_size=48", "--set", "train.batch_size_per_gpu=4",
                          "--set", "train.max_steps=2", "--set", "train.log_every=1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world 1" in proc.stdout and "supervised: resnet18" in proc.stdout
    saved = torch.load(tmp_path / "teacher" / "final" / "model.pt", weights_only=True)
    assert saved["meta"]["arch"] == "resnet18" and not saved["adapters"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    # TensorBoard names what was trained (a teacher trained supervised is no "student") and times
    # no teacher; metrics.json keeps the roles that sweeps and comparisons read.
    acc = EventAccumulator(str(tmp_path / "teacher" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"eval/resnet18/test/mean_auroc", "eval/resnet18/val/mean_auroc", "train/loss"} <= tags, tags
    assert not any(t.startswith(("eval/student/", "eval/teacher/")) for t in tags), tags
    assert "train/time/teacher_forward_s" not in tags and "train/time/student_step_s" in tags
    doc = read_metrics(tmp_path / "teacher" / "metrics.json")
    assert model_result(doc, "student", "test") is not None and model_result(doc, "teacher", "test") is None


@pytest.mark.slow
def test_bf16_distillation_runs_end_to_end_with_a_bf16_teacher(cxr_shards, random_teacher, tmp_path):
    """The mixed-precision path a GPU takes by default (precision auto = bf16 there), forced on
    CPU: student engine in bf16 with bf16 BatchNorm buffers, teacher in init_inference in bf16,
    fp32 images in; the run trains, validates and exports."""
    proc = run(python_cmd(*_tiny(cxr_shards, tmp_path, random_teacher, "--set", "train.precision=bf16",
                                 "--set", "teacher.dtype=bf16")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ZeRO-1, bf16" in proc.stdout  # train.zero_stage: auto
    run_dir = tmp_path / "student"
    ds = json.loads((run_dir / "deepspeed.main.json").read_text())
    assert ds["bf16"]["enabled"] and ds["data_types"]["buffer_dtype"] == "bf16"
    losses = [float(m.group(1)) for m in re.finditer(r"loss=([0-9.]+)", proc.stdout)]
    assert len(losses) == 3 and all(map(math.isfinite, losses))
    exported = torch.load(run_dir / "final" / "model.pt", weights_only=True)
    student = create_tapped_model(exported["meta"]["arch"], exported["meta"]["num_classes"], in_chans=1)
    student.model.load_state_dict(exported["model"])
    assert model_result(read_metrics(run_dir / "metrics.json"), "student", "test")["samples"] > 0
    # The export holds the optimizer's fp32 master weights, not the bf16 copies the forward used.
    weights = [v for k, v in exported["model"].items() if k.endswith(".weight")]
    assert all(w.dtype == torch.float32 for w in weights)
    assert any(not torch.equal(w, w.to(torch.bfloat16).float()) for w in weights)


@pytest.mark.parametrize("override, named", [
    ("train.lrr=0.1", "train.lrr"),
    ("train.epochs=abc", "train.epochs"),
    ("train.zero_stage=5", "train.zero_stage"),
    ("train.global_batch_size=12", "train.global_batch_size"),  # 4 per GPU x 1 process
])
def test_bad_config_fails_before_any_process_group_naming_the_key(override, named, cxr_shards, tmp_path,
                                                                 random_teacher):
    proc = run(python_cmd(*_tiny(cxr_shards, tmp_path, random_teacher, "--set", override)),
               timeout=120)
    assert proc.returncode == 2
    assert named in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "student").exists()


@pytest.mark.parametrize("fault", ["fp16_on_cpu", "teacher_as_pretrained", "text_as_pretrained", "file_as_out_dir"])
def test_what_would_fail_inside_the_ranks_is_refused_before_any_process_starts(fault, cxr_shards, tmp_path,
                                                                               random_teacher):
    """Each of these failed inside the rank processes with a traceback (DeepSpeed's, torch's or
    pathlib's); now one line before any process group."""
    text = tmp_path / "notes.pt"
    text.write_text("weights are on the shared drive\n")
    (tmp_path / "a_file").write_text("")
    override, expected = {
        "fp16_on_cpu": ("train.precision=fp16",
                        "error: train.precision=fp16 needs a GPU (DeepSpeed has no fp16 on CPU, and this "
                        "machine has no CUDA device): use fp32, bf16 or auto"),
        "teacher_as_pretrained": (f"student.pretrained_file={random_teacher}",
                                  f"error: student.pretrained_file {random_teacher} does not load into "
                                  f"rmsnet_xxs: state dict keys: "),
        "text_as_pretrained": (f"student.pretrained_file={text}",
                               f"error: student.pretrained_file: checkpoint {text} is a text file (32 bytes, "
                               f"starting 'weights are on the shared drive\\n'), not a checkpoint"),
        "file_as_out_dir": (f"run.out_dir={tmp_path / 'a_file'}",
                            f"error: run directory {tmp_path / 'a_file' / 'student'}: {tmp_path / 'a_file'} is a "
                            f"file, not a directory (check run.out_dir and run.name)"),
    }[fault]
    proc = run(python_cmd(*_tiny(cxr_shards, tmp_path, random_teacher, "--set", override)), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    line, = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert line.startswith(expected), line
    assert "rank 0/" not in proc.stdout  # no process group was started
    assert not (tmp_path / "student").exists()


def test_missing_shard_directory_fails_with_one_clear_message(tmp_path, random_teacher):
    proc = run(python_cmd(*_tiny(tmp_path / "nowhere", tmp_path, random_teacher)), timeout=120)
    assert proc.returncode == 2
    assert "manifest.json" in proc.stderr and "nowhere" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_teacher_trained_on_the_labels_in_another_order_is_refused_listing_both(cxr_shards, random_teacher,
                                                                                 tmp_path):
    names = json.loads((cxr_shards / "manifest.json").read_text())["label_names"]
    saved = torch.load(random_teacher, weights_only=True)
    teacher = tmp_path / "reordered.pt"  # same class count, another order
    torch.save({"model": saved["model"], "meta": {"arch": "resnet18", "label_names": names[::-1]}}, teacher)
    proc = run(python_cmd(*_tiny(cxr_shards, tmp_path, teacher)), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line, = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert f"teacher.checkpoint {teacher} was trained on the labels {names[::-1]}" in line
    assert f"the shards have {names}" in line
    assert not (tmp_path / "student").exists()


def test_a_text_file_as_teacher_is_named_and_said_to_be_text_in_one_line_from_one_rank(cxr_shards, tmp_path):
    teacher = tmp_path / "teacher.pt"
    teacher.write_text("resnet18 weights are on the shared drive\n")
    proc = run(deepspeed_cmd(2, *_tiny(cxr_shards, tmp_path, teacher)), timeout=180)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr + proc.stdout
    lines = [x for x in (proc.stderr + proc.stdout).splitlines() if "error: " in x]
    assert len(lines) == 1, lines  # both ranks find it; rank 0 says it
    assert f"checkpoint {teacher} is a text file" in lines[0] and "not a checkpoint" in lines[0]


@pytest.mark.slow
def test_training_that_goes_non_finite_stops_every_rank_with_one_line_and_saves_nothing_broken(
        cxr_shards, random_teacher, tmp_path):
    cmd = deepspeed_cmd(2, *tiny_run_args(DISTILL_CFG, cxr_shards, tmp_path, random_teacher,
                                          "train.batch_size_per_gpu=4", "train.max_steps=40",
                                          "train.warmup_steps=1", "train.lr=1e12", "train.max_bad_steps=2"))
    proc = run(cmd, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out
    lines = [x for x in out.splitlines() if "error: training went non-finite" in x]
    assert len(lines) == 1, lines
    # NaN from about step 4: either the streak outlasts max_bad_steps or the epoch's end (validation,
    # checkpoint) comes first and finds the weights broken
    assert ("consecutive optimizer steps" in lines[0] and "train.max_bad_steps is 2" in lines[0]) or \
        "the student's weights hold NaN/inf; stopped before validating at step" in lines[0], lines[0]
    assert "nothing was saved from these weights; last good checkpoint:" in lines[0]
    run_dir = tmp_path / "student"
    assert not (run_dir / "final" / "model.pt").exists()
    saved = list(run_dir.rglob("model.pt")) + list((run_dir / "checkpoints").rglob("*model_states.pt"))
    for path in saved:  # whatever was saved before it broke is finite
        state = torch.load(path, map_location="cpu", weights_only=False)
        tensors = state["model"] if "model" in state else state["module"]
        assert all(torch.isfinite(t).all() for t in tensors.values() if torch.is_tensor(t) and t.is_floating_point()), path
    assert not leaked_shm(cmd)


def _rank_pids(marker: str, local_rank: int) -> list[int]:
    """PIDs of distill.py rank processes started with `--local_rank=N` (our temp run dir in the
    command line keeps other tests' processes out)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        line = b" ".join(cmd)
        if f"--local_rank={local_rank}".encode() in cmd and marker.encode() in line:
            pids.append(int(d.name))
    return pids


@pytest.mark.slow
def test_a_killed_rank_ends_the_whole_job_non_zero_within_60_seconds(cxr_shards, random_teacher, tmp_path):
    import signal
    import subprocess
    import time

    cmd = deepspeed_cmd(2, *_tiny(cxr_shards, tmp_path, random_teacher, "--set", "train.max_steps=100000",
                                  "--set", "train.epochs=1000"))
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        for line in proc.stdout:  # wait until both ranks are training
            if "[step" in line or time.time() > deadline:
                break
        victims = _rank_pids(str(tmp_path), 1)
        assert victims, "rank 1 not found"
        os.kill(victims[0], signal.SIGKILL)
        t0 = time.time()
        rc = proc.wait(timeout=60)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc != 0
    assert elapsed < 60
    time.sleep(1)
    assert not _rank_pids(str(tmp_path), 0), "rank 0 outlived the job"
    assert not leaked_shm(cmd), "a SIGKILLed rank's shared-memory segment outlived the job"


@pytest.mark.slow
def test_a_validation_split_without_any_positive_writes_no_best_model_and_says_why(cxr_shards, random_teacher,
                                                                                  tmp_path):
    import shutil

    from data_pipeline.torch_loader import read_keyed_index

    shards = tmp_path / "shards"
    shutil.copytree(cxr_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    for shard in manifest["splits"]["val"]["shards"]:  # every val label vector all zeros: valid, no positive
        tar = str(shards / shard["name"])
        with open(tar, "r+b") as f:
            for _, _, members in read_keyed_index(tar, str(shards / shard["index"])):
                offset, size = members["lbl"]
                f.seek(offset)
                f.write(bytes(size))
    proc = run(python_cmd(*_tiny(shards, tmp_path, random_teacher, "--set", "data.verify=none")), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert ("warning: no best/model.pt was written: no validation of this run gave a mean AUROC on 'val' "
            "(none ran, or the split lacks a positive or a negative of every class); final/model.pt is the "
            "trained student") in proc.stdout.splitlines()
    assert not (tmp_path / "student" / "best" / "model.pt").exists()
    assert (tmp_path / "student" / "final" / "model.pt").is_file()
