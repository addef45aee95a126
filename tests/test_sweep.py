"""Experiment sweeps (launcher/sweep.py, launcher/sweep_report.py): the plan's combinations, honest
selection on validation, skipping finished runs, resuming an interrupted one, the table.

The bookkeeping tests write the files a finished run leaves (metrics.json, predictions) by hand so
that the choice can be steered; the end-to-end test runs real tiny runs through the launcher.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from _launch import REPO
from data_pipeline.loader_common import split_patients
from data_pipeline.manifest import read_manifest
from launcher.metrics_doc import model_result, read_metrics
from launcher import sweep, sweep_report
from launcher.checkpoints import FILES
from launcher.config import ConfigError

CFG = REPO / "launcher" / "configs" / "demo_distill.yaml"


def _args(tmp_path, cxr_shards, random_teacher, *extra):
    return sweep.parse_args(["--config", str(CFG), "--out", str(tmp_path / "sw"),
                             "--set", f"data.shards={cxr_shards}", "--set", f"teacher.checkpoint={random_teacher}",
                             *extra])


def test_plan_crosses_arms_grid_and_seeds(tmp_path, cxr_shards, random_teacher):
    args = _args(tmp_path, cxr_shards, random_teacher, "--arm", "alone=run.mode=supervised",
                 "--arm", "kd=loss.at_weight=0 loss.sp_weight=0", "--grid", "train.lr=1e-3,2e-3",
                 "--grid", "loss.temperature=2,4", "--select", "train.lr", "--seeds", "0,1,2")
    plan = sweep.build_plan(args)
    # arms = --arm x the grid axes not selected; hyper-parameters = the selected axes
    assert sorted(plan["arms"]) == ["alone,loss.temperature=2", "alone,loss.temperature=4",
                                    "kd,loss.temperature=2", "kd,loss.temperature=4"]
    assert len(plan["runs"]) == 4 * 2 * 3
    assert len({r["run_dir"] for r in plan["runs"]}) == len(plan["runs"])
    run = next(r for r in plan["runs"] if r["arm"] == "kd,loss.temperature=4"
               and r["hparams"] == {"train.lr": "2e-3"} and r["seed"] == 2)
    assert {"loss.at_weight=0", "loss.sp_weight=0", "loss.temperature=4", "train.lr=2e-3",
            "run.seed=2"} <= set(run["sets"])
    assert run["sets"][0] == f"data.shards={cxr_shards}"  # the sweep's --set come first
    assert (run["val_split"], run["test_split"]) == ("val", "test")


def test_grid_axes_alone_define_the_arms(tmp_path, cxr_shards, random_teacher):
    plan = sweep.build_plan(_args(tmp_path, cxr_shards, random_teacher, "--grid", "train.lr=1e-3,5e-3",
                                  "--grid", "run.mode=supervised,distill", "--select", "train.lr",
                                  "--compare", "run.mode=distill", "run.mode=supervised"))
    assert sorted(plan["arms"]) == ["run.mode=distill", "run.mode=supervised"]
    assert len(plan["runs"]) == 4


@pytest.mark.parametrize("extra, message", [
    (["--grid", "train.lr=1e-3", "--select", "train.epochs"], "not a --grid axis"),
    (["--grid", "train.lr=1e-3,1e-3"], "repeated value"),
    (["--grid", "train.lr"], "expected key=value1"),
    (["--arm", "a=run.mode=supervised", "--compare", "a", "b"], "no such arm"),
    (["--seeds", "0,0"], "distinct integers"),
    (["--grid", "train.lr=1e-3,-1"], "train.lr must be > 0"),
    (["--arm", "x=train.no_such_key=1"], "no_such_key"),
    (["--arm", "bad name=run.seed=1"], "expected NAME="),
])
def test_bad_sweeps_are_refused_before_any_run(tmp_path, cxr_shards, random_teacher, extra, message):
    with pytest.raises(ConfigError, match=message):
        sweep.build_plan(_args(tmp_path, cxr_shards, random_teacher, *extra))


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert sweep.main(["--config", str(CFG), "--out", str(tmp_path), "--grid", "train.lr"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --grid") and err.count("\n") == 1


def test_another_plan_for_the_same_directory_is_refused(tmp_path, cxr_shards, random_teacher):
    a = sweep.build_plan(_args(tmp_path, cxr_shards, random_teacher, "--seeds", "0,1"))
    sweep.write_or_check_plan(tmp_path / "sw", a)
    assert sweep.write_or_check_plan(tmp_path / "sw", a)["runs"] == a["runs"]  # same plan: continue
    b = sweep.build_plan(_args(tmp_path, cxr_shards, random_teacher, "--seeds", "0,1,2"))
    with pytest.raises(ConfigError, match="differs in seeds"):
        sweep.write_or_check_plan(tmp_path / "sw", b)


def _fake_finished(out: Path, run: dict, val: float, test: float, cxr_shards: Path, rng) -> None:
    """What distill.py leaves in a finished run: predictions of val and test, then metrics.json."""
    from launcher.metrics_doc import metrics_document, split_report
    from launcher.validation import save_predictions

    manifest = read_manifest(cxr_shards)
    d = out / run["run_dir"]
    splits = {}
    for split, target_score in (("val", val), ("test", test)):
        sids = np.array(sorted(split_patients(cxr_shards, split)))
        labels = np.random.default_rng(len(split))  # the same labels in every run
        targets = (labels.random((len(sids), 14)) < 0.3).astype(np.float32)
        probs = rng.random(targets.shape)
        save_predictions(d / "predictions" / f"student_{split}.npz", {"sid": sids, "probs": probs, "targets": targets})
        splits[split] = split_report(manifest, split, {"student": (probs, targets)}, {"student": None},
                                     {"student": {"model": "rmsnet_xxs", "checkpoint": "-"}}, reps=20)
        splits[split]["models"]["student"]["mean_auroc"] = target_score  # steer the choice
    d.mkdir(parents=True, exist_ok=True)
    doc = metrics_document("launcher/distill.py", manifest, cxr_shards, 1, 1, "val", splits)
    (d / "metrics.json").write_text(json.dumps(doc))


def test_choice_is_made_on_validation_never_on_test(tmp_path, cxr_shards, random_teacher):
    out = tmp_path / "sw"
    plan = sweep.write_or_check_plan(out, sweep.build_plan(_args(
        tmp_path, cxr_shards, random_teacher, "--arm", "a=run.mode=supervised", "--arm", "b=",
        "--grid", "train.lr=1e-3,2e-3,5e-3", "--select", "train.lr", "--seeds", "0,1", "--compare", "b", "a")))
    # arm a: lr 2e-3 best on val, 5e-3 best on test. arm b: 5e-3 best on val but one seed missing,
    # so only 1e-3 and 2e-3 are eligible.
    scores = {("a", "1e-3"): (0.60, 0.70), ("a", "2e-3"): (0.80, 0.60), ("a", "5e-3"): (0.70, 0.90),
              ("b", "1e-3"): (0.75, 0.50), ("b", "2e-3"): (0.70, 0.95), ("b", "5e-3"): (0.99, 0.99)}
    rng = np.random.default_rng(0)
    for r in plan["runs"]:
        if (r["arm"], r["hparams"]["train.lr"], r["seed"]) == ("b", "5e-3", 1):
            continue  # not finished
        val, test = scores[r["arm"], r["hparams"]["train.lr"]]
        _fake_finished(out, r, val + 0.01 * r["seed"], test, cxr_shards, rng)
    doc = sweep_report.write_report(out, plan, reps=50)
    assert doc["chosen"]["a"]["hparams"] == {"train.lr": "2e-3"}
    assert doc["chosen"]["b"]["hparams"] == {"train.lr": "1e-3"}
    assert doc["chosen"]["a"]["val"]["mean"] == pytest.approx(0.805)
    assert doc["chosen"]["a"]["val"]["sd"] == pytest.approx(np.std([0.80, 0.81], ddof=1))
    c = doc["comparisons"][0]
    assert (c["a"], c["b"], c["a_hparams"], c["b_hparams"]) == ("b", "a", {"train.lr": "1e-3"}, {"train.lr": "2e-3"})
    assert c["paired_seeds"] == [0, 1] and c["patients"] == read_manifest(cxr_shards)["splits"]["test"]["patients"]
    md = (out / "sweep.md").read_text()
    assert "| a | train.lr=2e-3 | 2/2 | 0.805 ± 0.007 | 0.600 ± 0.000 | **chosen** |" in md
    assert "| b | train.lr=5e-3 | 1/2 |" in md and "| b − a |" in md
    assert (out / "sweep.png").stat().st_size > 0 and (out / "sweep_results.json").is_file()


def test_split_patients_are_the_dataset_patient_ids(cxr_shards, cxr_root):
    test = split_patients(cxr_shards, "test")
    assert len(test) == read_manifest(cxr_shards)["splits"]["test"]["samples"]
    listed = {line.split("_")[0].lstrip("0") for line in (cxr_root / "test_list.txt").read_text().split()}
    assert {p.lstrip("0") for p in test.values()} == listed


# ----------------------------------------------------------------------------- real runs
TINY = ("--set", "data.image_size=48", "--set", "train.epochs=1", "--set", "train.batch_size_per_gpu=4",
        "--set", "train.checkpoint_every_steps=3", "--set", "train.log_every=1")


def _sweep_cmd(out, cxr_shards, random_teacher):
    return [sys.executable, str(REPO / "launcher" / "sweep.py"), "--config", str(CFG), "--out", str(out),
            "--set", f"data.shards={cxr_shards}", "--set", f"teacher.checkpoint={random_teacher}", *TINY,
            "--arm", "alone=run.mode=supervised", "--grid", "train.lr=1e-3,3e-3", "--select", "train.lr",
            "--seeds", "0"]  # (a comparison of real runs: tests/test_slurm.py)


@pytest.mark.slow
def test_sweep_runs_each_run_once_resumes_an_interrupted_one_and_reports(tmp_path, cxr_shards, random_teacher):
    out = tmp_path / "sw"
    cmd = _sweep_cmd(out, cxr_shards, random_teacher)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # 1. killed (SIGKILL, the whole process group) as soon as the first run has a checkpoint
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    first = out / "runs" / "alone" / "train.lr-1e-3" / "seed0"
    deadline = time.time() + 300
    complete = lambda: list((first / "checkpoints").glob(f"*/{FILES}"))  # noqa: E731 (written last)
    while not complete() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert complete(), proc.stdout.read().decode()
    assert not (first / "metrics.json").exists(), "the run finished before it could be interrupted"
    # 2. run again: the interrupted run resumes, the others run, the table is written
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 runs, 0 finished, 2 to run" in res.stdout
    assert "alone train.lr=1e-3 seed 0 (resuming)" in res.stdout
    assert "resuming from main-" in (out / "logs" / "run000.log").read_text()
    doc = json.loads((out / "sweep_results.json").read_text())
    # the choice is the better validation score, read from the runs' own files
    vals = {r["hparams"]["train.lr"]: model_result(read_metrics(out / r["run_dirs"]["0"] / "metrics.json"),
                                                   "student", "val")["mean_auroc"] for r in doc["rows"]}
    assert doc["chosen"]["alone"]["hparams"]["train.lr"] == max(vals, key=vals.get)
    assert "**chosen**" in (out / "sweep.md").read_text() and (out / "sweep.png").is_file()
    # 3. and again: every run is finished, nothing is launched
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/**/metrics.json")}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "2 runs, 2 finished, 0 to run" in res.stdout, res.stdout + res.stderr
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("runs/**/metrics.json")}
