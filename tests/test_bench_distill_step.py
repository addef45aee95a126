"""bench/distill_step.py runs end to end with tiny settings: exit 0, a table, and JSON with the keys
bench/README.md reads; both paths compute the same first-step loss. Timings are never asserted."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("variant", [[], ["--compile", "--compile-backend", "aot_eager", "--channels-last"]],
                         ids=["eager", "compiled"])
def test_distill_step_bench_runs_both_paths_and_writes_json(tmp_path, cxr_shards, variant):
    out = tmp_path / "distill_step.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "distill_step.py"), "--steps", "2",
                           "--rounds", "1", "--split-rounds", "1", "--warmup", "1", "--batch-size", "4",
                           "--image-size", "48", "--loader-batches", "3", "--shards", str(cxr_shards),
                           "--out", str(out), *variant],
                          cwd=REPO, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "|---" in proc.stdout, "a table is printed"
    result = json.loads(out.read_text())
    assert {"machine", "config", "rounds", "summary", "ratio", "split_ms", "data_loading", "memory",
            "checks"} <= result.keys()
    paths = {"project", "hand"} | ({"hand_eager"} if variant else set())  # compiled: the eager baseline too
    assert set(result["summary"]) == paths
    assert all(s["median_samples_per_s"] > 0 for s in result["summary"].values())
    assert {"project_over_hand", "overhead_pct"} <= result["ratio"].keys()
    assert ("project_over_hand_eager" in result["ratio"]) == bool(variant)
    assert {"teacher_s", "student_s"} <= result["split_ms"]["project"].keys()
    assert {"teacher_s", "forward_s", "backward_s", "optimizer_s"} <= result["split_ms"]["hand"].keys()
    assert result["data_loading"]["median_ms_per_batch"] > 0
    assert set(result["memory"]["step_peak_mib"]) == paths
    assert result["config"]["deepspeed"]["zero_optimization"]["stage"] == 1  # train.zero_stage: auto
    # Same models, same batch, same objective: the paths agree before either has stepped.
    assert result["checks"]["first_step_loss_abs_diff"] < 1e-4
    assert result["checks"]["lr_matches"]
    assert set(result["first_step_s"]) == paths
    assert result["config"]["compile"] == ("aot_eager" if variant else False)
    assert result["config"]["channels_last"] == bool(variant)


@pytest.mark.slow
def test_distill_step_bench_puts_zero_stages_side_by_side_and_audits_host_syncs(tmp_path):
    out = tmp_path / "distill_step.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "distill_step.py"), "--steps", "1",
                           "--rounds", "2", "--split-rounds", "0", "--warmup", "1", "--batch-size", "4",
                           "--image-size", "48", "--shards", "none", "--zero-stages", "0,2", "--sync-audit", "2",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["summary"]) == {"project_z0", "project_z2", "hand"}
    assert {"project_z0_over_hand", "project_z2_over_hand"} <= result["ratio"].keys()
    assert result["config"]["zero_stages"] == [0, 2]
    assert result["checks"]["first_step_loss_abs_diff"] < 1e-4 and result["checks"]["lr_matches"]
    z2 = result["host_syncs"]["project_z2"]  # DeepSpeed's gradient-norm check, found on the CPU too
    assert any(r["owner"] == "deepspeed" and "is_invalid_grad_norm" in r["site"] for r in z2), z2
    assert not [r for r in z2 if r["owner"] == "project"], z2
    assert "host syncs per step, project (DeepSpeed ZeRO-2" in proc.stdout
    bad = subprocess.run([sys.executable, str(REPO / "bench" / "distill_step.py"), "--zero-stages", "1,3",
                          "--shards", "none"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--zero-stages takes distinct stages among 0, 1, 2" in bad.stderr
