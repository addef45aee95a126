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
    assert set(result["summary"]) == {"project", "hand"}
    assert all(s["median_samples_per_s"] > 0 for s in result["summary"].values())
    assert {"project_over_hand", "overhead_pct"} <= result["ratio"].keys()
    assert {"teacher_s", "student_s"} <= result["split_ms"]["project"].keys()
    assert {"teacher_s", "forward_s", "backward_s", "optimizer_s"} <= result["split_ms"]["hand"].keys()
    assert result["data_loading"]["median_ms_per_batch"] > 0
    assert set(result["memory"]["step_peak_mib"]) == {"project", "hand"}
    assert result["config"]["deepspeed"]["zero_optimization"]["stage"] == 2
    # Same models, same batch, same objective: the paths agree before either has stepped.
    assert result["checks"]["first_step_loss_abs_diff"] < 1e-4
    assert result["checks"]["lr_matches"]
    assert set(result["first_step_s"]) == {"project", "hand"}
    assert result["config"]["compile"] == ("aot_eager" if variant else False)
    assert result["config"]["channels_last"] == bool(variant)
