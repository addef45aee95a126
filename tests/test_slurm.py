"""The templates in cluster/ submitted to a real SLURM (started by cluster/local/slurm.sh).

* distill.sbatch with 2 CPU tasks under srun, then evaluate.sbatch on its run;
* build_shards.sbatch as a 3-task array job plus its merge job == the single-process build;
* a running distillation requeued with `scontrol requeue` (SIGTERM) and one told to stop with
  SIGUSR1 (what `--signal=USR1@300` sends before the time limit) both checkpoint, are requeued,
  resume with `--resume auto` and end bit-identical to the uninterrupted run, same sample order;
* with a two-node cluster (nodes in their own network namespaces), one task per node gives the
  same parameters as two tasks on one node.

Without a running SLURM these tests are skipped, unless RMS_REQUIRE_SLURM=1 (set by .ci/run),
which turns the skip into a failure.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _launch import REPO, assert_same_student, trained_params
from launcher.metrics_doc import model_result, read_metrics

pytestmark = pytest.mark.slow
CFG = REPO / "launcher" / "configs" / "demo_distill.yaml"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _slurm_nodes() -> int:
    if not shutil.which("sinfo"):
        return 0
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%D %t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return 0
    return sum(int(n) for n, state in (l.split() for l in out.stdout.splitlines())
               if state in ("idle", "mix", "alloc")) if out.returncode == 0 else 0


def _local_test_cluster() -> bool:
    """The running SLURM is the one cluster/local/slurm.sh configured (never submit the suite's
    jobs to a real cluster's queue by accident)."""
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=20)
    return re.search(r"^ClusterName\s*=\s*rmsdistill$", out.stdout, re.M) is not None


@pytest.fixture(scope="module")
def nodes() -> int:
    n = _slurm_nodes()
    if n and not _local_test_cluster():
        pytest.skip("the running SLURM is not the local test cluster of cluster/local/slurm.sh")
    if n == 0:
        msg = "no SLURM running (start one: sudo bash cluster/local/slurm.sh up [--nodes 2])"
        if os.environ.get("RMS_REQUIRE_SLURM") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return n


def _sbatch(template: str, workdir: Path, env: dict, *opts: str) -> int:
    full_env = dict(os.environ, RMS_HOME=str(REPO), PYTHON=sys.executable, **env)
    out = subprocess.run(["sbatch", "--parsable", *opts, str(REPO / "cluster" / template)],
                         cwd=workdir, env=full_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().split(";")[0])


def job_info(job: int | str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout.splitlines()[0]))


def wait_for(job: int | str, timeout: float = 900) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(job)
        if info["JobState"] in FINAL_STATES:
            print(f"job {job} ({info.get('JobName')}): {info['JobState']} ExitCode={info['ExitCode']} "
                  f"Restarts={info['Restarts']} NodeList={info['NodeList']} RunTime={info['RunTime']}")
            return info
        time.sleep(1)
    subprocess.run(["scancel", str(job)])
    pytest.fail(f"job {job} did not finish in {timeout} s: {job_info(job)}")


def wait_for_line(path_glob: Path, pattern: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in path_glob.parent.glob(path_glob.name):
            if pattern in p.read_text(errors="replace"):
                return
        time.sleep(0.3)
    pytest.fail(f"'{pattern}' did not appear in {path_glob} within {timeout} s")


def distill_env(out_dir: Path, name: str, shards: Path, teacher: Path, *extra: str) -> dict:
    overrides = [f"data.shards={shards}", f"teacher.checkpoint={teacher}", "data.image_size=48",
                 "train.log_every=1", "train.batch_size_per_gpu=2", *extra]
    return {"CONFIG": str(CFG), "OUT_DIR": str(out_dir), "RUN_NAME": name, "SET": " ".join(overrides)}


CPU_TASKS = ("--gpus-per-node=0", "--cpus-per-task=1")
# 2 epochs of 10 steps, dropout (RNG state), no periodic checkpoints: any checkpoint in the
# interrupted runs is the one the stop request wrote.
RESUME_RUN = ("train.epochs=2", "train.keep_checkpoints=0", "train.log_sample_ids=true",
              "student.drop_rate=0.2")


@pytest.fixture(scope="module")
def reference_run(nodes, cxr_shards, random_teacher, tmp_path_factory) -> Path:
    """distill.sbatch, one node, 2 CPU tasks: the uninterrupted run the others are compared with."""
    work = tmp_path_factory.mktemp("slurm_distill")
    job = _sbatch("distill.sbatch", work, distill_env(work / "runs", "reference", cxr_shards,
                                                      random_teacher, *RESUME_RUN),
                  "--nodes=1", "--ntasks-per-node=2", *CPU_TASKS)
    info = wait_for(job)
    log = (work / f"slurm-rms-distill-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, log)
    return work / "runs" / "reference"


def test_distill_sbatch_runs_two_ranks_under_srun(reference_run):
    logs = sorted((reference_run / "logs").glob("job*-restart0/rank*.log"))
    assert [p.name for p in logs] == ["rank0.log", "rank1.log"]
    rank0 = logs[0].read_text()
    assert "world 2 (gloo, cpu)" in rank0 and "rank 0/2 on" in rank0
    assert "rank 1/2 on" in logs[1].read_text()
    assert (reference_run / "final" / "model.pt").is_file()
    metrics = read_metrics(reference_run / "metrics.json")
    assert 0.0 <= model_result(metrics, "student", "test")["mean_auroc"] <= 1.0
    assert list((reference_run / "tb").glob("events.out.tfevents.*"))


def test_evaluate_sbatch_scores_the_run(reference_run, tmp_path):
    job = _sbatch("evaluate.sbatch", tmp_path, {"RUN": str(reference_run), "EVAL_ARGS": "--bootstrap 50"},
                  "--nodes=1", "--ntasks-per-node=2", *CPU_TASKS)
    info = wait_for(job)
    log = (tmp_path / f"slurm-rms-evaluate-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", (info, log)
    result = read_metrics(reference_run / "eval" / "test" / "metrics.json")
    assert result["world_size"] == 2 and list(result["splits"]) == ["test"]
    # the same model on the same split as the training run's own final evaluation
    expected = model_result(read_metrics(reference_run / "metrics.json"), "student", "test")["mean_auroc"]
    assert model_result(result, "student", "test")["mean_auroc"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("how", ["scontrol-requeue", "sigusr1-time-limit"])
def test_interrupted_job_is_requeued_resumes_and_matches_the_uninterrupted_run(
        how, reference_run, cxr_shards, random_teacher, tmp_path):
    job = _sbatch("distill.sbatch", tmp_path, distill_env(tmp_path / "runs", "interrupted", cxr_shards,
                                                          random_teacher, *RESUME_RUN),
                  "--nodes=1", "--ntasks-per-node=2", *CPU_TASKS)
    run_dir = tmp_path / "runs" / "interrupted"
    wait_for_line(run_dir / "logs" / f"job{job}-restart0" / "rank0.log", "[step      3/")
    if how == "scontrol-requeue":  # SLURM signals SIGTERM, the ranks checkpoint, SLURM requeues
        subprocess.run(["scontrol", "requeue", str(job)], check=True)
    else:  # what --signal=USR1@300 sends; the batch script requeues the job itself
        subprocess.run(["scancel", "--signal=USR1", str(job)], check=True)
    info = wait_for(job)
    batch_log = (tmp_path / f"slurm-rms-distill-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, batch_log)

    first = (run_dir / "logs" / f"job{job}-restart0" / "rank0.log").read_text()
    second = (run_dir / "logs" / f"job{job}-restart1" / "rank0.log").read_text()
    stopped = re.search(r"stopped on request (at step|after epoch) (\d+)", first)
    assert stopped, first[-2000:]
    assert re.search(r"resuming from main-e\d{4}(b\d{5})?-s\d{8}", second), second[-2000:]
    assert "start 2 on" in batch_log
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) >= 2  # one log dir, 2 writers

    resumed = re.search(r"resuming from \S+", second).group(0)
    print(f"{how}: {stopped.group(0)}; restart: {resumed}")
    assert_same_student(reference_run, run_dir)
    print(f"{how}: final/model.pt bit-identical to the uninterrupted run's")
    for rank in (0, 1):
        ids = [(d / "sample_ids" / f"rank{rank}.txt").read_text() for d in (reference_run, run_dir)]
        assert ids[0] == ids[1] and ids[0].count("\n") == 20


def test_array_job_builds_slices_and_merges_them_like_one_process(nodes, cxr_root, cxr_shards, tmp_path):
    from conftest import SAMPLES_PER_SHARD, SHARD_SIZE_PX

    out = tmp_path / "shards"
    env = {"DATASET": "chestxray14", "ROOT": str(cxr_root), "SHARDS": str(out),
           "BUILD_ARGS": f"--size {SHARD_SIZE_PX} --shard-size {SAMPLES_PER_SHARD} --val-fraction 0.2"}
    array = _sbatch("build_shards.sbatch", tmp_path, env, "--array=0-2", "--cpus-per-task=1")
    for task in range(3):
        info = wait_for(f"{array}_{task}")
        assert info["JobState"] == "COMPLETED", (info, (tmp_path / f"slurm-rms-shards-{array}_{task}.out"))
    task0 = (tmp_path / f"slurm-rms-shards-{array}_0.out").read_text()
    merge = int(re.search(r"merge job (\d+) waits for array", task0).group(1))
    info = wait_for(merge)
    merge_log = (tmp_path / f"slurm-rms-shards-merge-{merge}.out").read_text()
    assert info["JobState"] == "COMPLETED", (info, merge_log)
    assert "merged 3 slices" in merge_log and "verified" in merge_log

    merged = json.loads((out / "manifest.json").read_text())
    single = json.loads((cxr_shards / "manifest.json").read_text())
    assert merged["splits"] == single["splits"]
    for name in sorted(p.name for p in cxr_shards.glob("*.tar")):
        assert (out / name).read_bytes() == (cxr_shards / name).read_bytes(), name


def test_two_nodes_one_task_each_equal_two_tasks_on_one_node(nodes, cxr_shards, random_teacher, tmp_path):
    if nodes < 2:
        pytest.skip("the cluster has one node (cluster/local/slurm.sh up --nodes 2 makes two)")
    sgd = ("train.optimizer=sgd", "train.max_steps=4")  # linear update: only summation order differs
    one = _sbatch("distill.sbatch", tmp_path, distill_env(tmp_path, "one_node", cxr_shards, random_teacher,
                                                          *sgd), "--nodes=1", "--ntasks-per-node=2",
                  *CPU_TASKS)
    two = _sbatch("distill.sbatch", tmp_path, distill_env(tmp_path, "two_nodes", cxr_shards,
                                                          random_teacher, *sgd),
                  "--nodes=2", "--ntasks-per-node=1", *CPU_TASKS)
    for job in (one, two):
        info = wait_for(job)
        assert info["JobState"] == "COMPLETED", (info, (tmp_path / f"slurm-rms-distill-{job}.out").read_text())
    hosts = [re.search(r"rank \d/2 on (\S+)", (p.read_text())).group(1)
             for p in sorted((tmp_path / "two_nodes" / "logs").glob("job*/rank*.log"))]
    assert len(hosts) == 2 and hosts[0] != hosts[1], hosts

    a, b = trained_params(tmp_path / "one_node"), trained_params(tmp_path / "two_nodes")
    assert a.keys() == b.keys()
    print(f"two nodes {hosts}: max |param difference| vs one node = "
          f"{max(float((a[k] - b[k]).abs().max()) for k in a):.3g}")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_rank_killed_under_srun_ends_the_job_within_60_s_without_requeue(nodes, cxr_shards, random_teacher, tmp_path):
    name = f"killed_rank_{os.getpid()}"
    job = _sbatch("distill.sbatch", tmp_path, distill_env(tmp_path, name, cxr_shards, random_teacher,
                                                          "train.epochs=20"),
                  "--nodes=1", "--ntasks-per-node=2", *CPU_TASKS)
    wait_for_line(tmp_path / name / "logs" / f"job{job}-restart0" / "rank1.log", "rank 1/2 on")
    wait_for_line(tmp_path / name / "logs" / f"job{job}-restart0" / "rank0.log", "[step      2/")
    pids = subprocess.run(["pgrep", "-f", f"run.name={name}"], capture_output=True, text=True).stdout.split()
    ranks = [p for p in pids  # the two rank processes, not srun (whose command line also matches)
             if Path(f"/proc/{p}/cmdline").read_text().split("\0")[0] == sys.executable]
    assert len(ranks) == 2, pids
    killed = time.time()
    os.kill(int(ranks[-1]), 9)
    info = wait_for(job, timeout=120)
    elapsed = time.time() - killed
    print(f"job ended {elapsed:.1f} s after SIGKILL of one rank: {info['JobState']} {info['ExitCode']}")
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0"
    assert info["Restarts"] == "0"  # a failure is not mistaken for a stop request and requeued
    assert elapsed < 60


def test_a_bad_config_fails_the_job_with_one_line_before_any_rank_starts(nodes, tmp_path):
    job = _sbatch("distill.sbatch", tmp_path, {"CONFIG": str(CFG), "OUT_DIR": str(tmp_path),
                                               "RUN_NAME": "bad", "SET": "train.no_such_key=1"},
                  "--nodes=1", "--ntasks-per-node=2", *CPU_TASKS)
    info = wait_for(job, timeout=120)
    log = (tmp_path / f"slurm-rms-distill-{job}.out").read_text()
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", (info, log)
    assert log.strip().splitlines()[-1].startswith("error: ") and "train.no_such_key" in log, log
    assert "Traceback" not in log and not (tmp_path / "bad" / "logs").exists()


@pytest.mark.parametrize("action", ["up", "down"])
def test_local_slurm_script_never_touches_a_slurm_it_did_not_configure(nodes, action, tmp_path):
    """`make test` as root on a real cluster node must not replace its slurm.conf or stop its
    daemons: cluster/local/slurm.sh refuses (exit 3) when the configuration is not its own."""
    (tmp_path / "slurm.conf").write_text("ClusterName=production\nSlurmctldHost=head\n")
    proc = subprocess.run(["bash", str(REPO / "cluster" / "local" / "slurm.sh"), action],
                          env=dict(os.environ, RMS_SLURM_CONF_DIR=str(tmp_path)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert "was not written by this script" in proc.stderr
    assert (tmp_path / "slurm.conf").read_text().startswith("ClusterName=production")
    deadline = time.monotonic() + 30  # a node still completing the previous test's job is not counted
    while _slurm_nodes() != nodes and time.monotonic() < deadline:
        time.sleep(1)
    assert _slurm_nodes() == nodes, "the running SLURM was left alone"


def test_sweep_runs_as_an_array_job_and_a_report_job_after_it(nodes, cxr_shards, random_teacher, tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "launcher" / "sweep.py"), "--config", str(CFG), "--out", str(out),
           "--set", f"data.shards={cxr_shards}", "--set", f"teacher.checkpoint={random_teacher}",
           "--set", "data.image_size=48", "--set", "train.epochs=1", "--set", "train.batch_size_per_gpu=4",
           "--arm", "alone=run.mode=supervised", "--arm", "kd=loss.at_weight=0 loss.sp_weight=0",
           "--seeds", "0", "--compare", "kd", "alone", "--bootstrap", "50", "--slurm",
           "--sbatch-args", " ".join(CPU_TASKS)]
    env = dict(os.environ, PYTHON=sys.executable)
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    array = re.search(r"submitted array job (\d+): 2 runs", res.stdout).group(1)
    report = re.search(r"submitted report job (\d+)", res.stdout).group(1)
    info = wait_for(report)
    assert info["JobState"] == "COMPLETED", (info, *[p.read_text() for p in (out / "logs").glob("slurm-*")])
    for arm in ("alone", "kd"):
        assert (out / "runs" / arm / "default" / "seed0" / "metrics.json").is_file()
        logs = list((out / "runs" / arm / "default" / "seed0" / "logs").glob("job*-restart0/rank0.log"))
        assert logs, f"{arm}: no rank log from distill.sbatch under srun"
    assert f"array job {array}" in "".join(p.read_text() for p in (out / "logs").glob(f"slurm-{array}_*.out"))
    assert "| kd − alone |" in (out / "sweep.md").read_text()
    # everything finished: a second submission runs no array task, only the report
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "submitted array job" not in res.stdout, res.stdout + res.stderr
    wait_for(re.search(r"submitted report job (\d+)", res.stdout).group(1))
