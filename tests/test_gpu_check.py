"""bench/gpu_check.sh, the prepared script for a lent GPU, run with --small on this CPU: every step
of it (the grid's eager and compiled bf16 points, the demo data, the 2-epoch bf16 demo run) ends
with status 0 and writes what bench/README.md says it writes. Marked slow, run in CI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_script_runs_every_step_shrunk_on_a_cpu(tmp_path):
    out = tmp_path / "gpu_check"
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(out), "--small"], cwd=REPO,
                          env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    names = [p["name"] for p in summary["points"]]
    assert names == ["step_resnet18_b4_px48_compiled", "step_resnet18_b4_px48_eager", "demo_data",
                     "demo_distill_bf16", "host_syncs_run"]
    assert summary["failed"] == [] and summary["skipped"] == []
    for mode, compiled in (("eager", False), ("compiled", "aot_eager")):
        point = json.loads((out / f"step_resnet18_b4_px48_{mode}.json").read_text())
        assert point["config"]["precision"] == "bf16" and point["config"]["compile"] == compiled
        assert point["config"]["channels_last"] == bool(compiled)
        assert all(s["median_samples_per_s"] > 0 for s in point["summary"].values())
        assert point["config"]["sync_audit_steps"] == 3 and set(point["host_syncs"]) == set(point["summary"])
    compiled_point = json.loads((out / "step_resnet18_b4_px48_compiled.json").read_text())
    assert set(compiled_point["summary"]) == {"project", "hand", "hand_eager"}  # both baselines
    eager_point = json.loads((out / "step_resnet18_b4_px48_eager.json").read_text())
    assert set(eager_point["summary"]) == {"project_z0", "project_z1", "project_z2", "hand"}
    audit = json.loads((out / "host_syncs_run.json").read_text())
    assert audit["rc"] == 0 and audit["train_steps"] == 4 and audit["project_in_step"] == []
    assert "student" in json.loads((out / "demo_metrics.json").read_text())["splits"]["test"]["models"]
    assert "compiled" in (out / "step_resnet18_b4_px48_compiled.log").read_text()


def test_the_gpu_check_script_refuses_an_unknown_second_argument(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path), "--tiny"], cwd=REPO,
                          env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "error: the second argument can only be --small, got --tiny" in proc.stderr


def test_gpu_wheels_lists_what_the_gpu_machine_lacks_and_leaves_out_what_it_has():
    from importlib import util

    spec = util.spec_from_file_location("gpu_wheels", REPO / "bench" / "gpu_wheels.py")
    gpu_wheels = util.module_from_spec(spec)
    spec.loader.exec_module(gpu_wheels)
    what = gpu_wheels.plan()
    assert {"deepspeed", "hjson", "pydantic", "tensorboard"} <= what["carry"].keys()  # DeepSpeed's needs too
    assert not {"torch", "torchvision", "timm", "numpy", "pillow", "triton"} & what["carry"].keys()
    assert "nvidia-dali-cuda130" not in what["carry"] and "torch" in what["on_device"]
    assert "tensorboard" not in gpu_wheels.plan(have=["tensorboard"])["carry"]
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_wheels.py"), "--list"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("carry (") and "deepspeed==" in proc.stdout
