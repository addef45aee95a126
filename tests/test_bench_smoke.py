"""The benchmark scripts run end to end on a tiny dataset: exit 0, print a table, and write JSON with
the keys bench/README.md reads. Timings are never asserted (the machines are shared and noisy)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--n", "40", "--image-size", "128"]


def _run(script: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / f"{script}.py"), *TINY,
                           "--work", str(tmp_path / "work"), "--out", str(out), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "|---" in proc.stdout, "a table is printed"
    return json.loads(out.read_text())


@pytest.mark.slow
def test_build_shards_scaling_writes_ratios_and_runs(tmp_path):
    result = _run("build_shards_scaling", tmp_path, "--repeats", "1")
    assert {"machine", "config", "generation", "runs", "summary", "ratios"} <= result.keys()
    assert set(result["summary"]) == {"ours-1w", "ours-2w", "plain"}
    assert {"speedup_2w_over_1w", "ours_1w_over_plain",
            "cpu_per_image_ours_1w_over_plain"} <= result["ratios"].keys()
    assert all(r["images"] == 40 and r["images_per_second"] > 0 and r["cpu_seconds"] > 0
               for r in result["runs"])


@pytest.mark.slow
def test_loader_throughput_covers_every_format_mode_and_loader(tmp_path):
    result = _run("loader_throughput", tmp_path, "--passes", "1", "--rounds", "1", "--batch-size", "16",
                  "--decode-images", "10", "--size", "64", "--output-size", "48")
    assert {"machine", "config", "shards", "decode", "summary", "cells",
            "ratios_dali_over_torch"} <= result.keys()
    loaders = {"dali", "torch"} if result["config"]["dali_available"] else {"torch"}
    cells = {(c["format"], c["mode"], c["loader"]) for c in result["cells"]}
    assert cells == {(f, m, lo) for f in ("png", "jpeg", "raw") for m in ("train", "eval") for lo in loaders}
    assert all(c["median_images_per_second"] > 0 for c in result["cells"] + result["summary"])
    assert all(r["ratio"] is None or r["ratio"] > 0 for r in result["ratios_dali_over_torch"].values())
    for fmt in ("png", "jpeg", "raw"):
        assert result["shards"][fmt]["image_bytes_per_sample"] > 0
    assert result["shards"]["raw"]["image_bytes_per_sample"] == 64 * 64  # --size 64, uint8, no header
