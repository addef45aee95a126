"""Shard-build throughput: our builder with 2 workers vs 1 (scaling), and vs a plain loop (overhead).

    python bench/build_shards_scaling.py                          # 5,000 synthetic 1024x1024 images
    python bench/build_shards_scaling.py --n 300 --image-size 256 --repeats 2   # quick
    python bench/build_shards_scaling.py --data data/cxr          # reuse a ChestX-ray14-layout dir

Three configurations build 256-pixel PNG shards from the same source images, each as its own
process, timed wall-clock from start to exit (interpreter start, imports and dataset listing
included; importing webdataset makes the plain loop's start-up a few seconds longer):

    ours-1w   python -m data_pipeline.build_shards --workers 1   (decode + write in one process)
    ours-2w   python -m data_pipeline.build_shards --workers 2   (2 decode processes + the writer)
    plain     bench/plain_shard_loop.py: PIL decode -> resize -> PNG -> webdataset.ShardWriter

The machine is shared and noisy, so the configurations are interleaved (the order rotates every
repeat) and each is reported as the median of `--repeats` runs; the ratios are medians of the
per-repeat ratios (paired runs, close in time). The source images are read once beforehand so no
run pays for the first read from disk. The builder's own figure (`manifest.json` summary, which
excludes start-up and dataset listing) and the plain loop's own loop time are reported beside the
wall-clock figures as "in-process"; the ratios are given on both. Each run's CPU time (user +
system, all its processes) is recorded too: "cores used" = CPU time / wall time shows how much of
the machine a run actually got (other users' jobs take the rest), and CPU-ms per image compares
the configurations' work independently of that.

Generating the 1024-pixel source set takes minutes; its time is reported on its own, and a
complete copy under `--work` is reused by later runs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import (DEFAULT_WORK, REPO, RESULTS, ensure_cxr, machine, median, source_image_size,
                     table, warm_page_cache, write_json)
from data_pipeline.manifest import read_manifest  # noqa: E402 (after _common puts the repo on the path)

CONFIGS = ("ours-1w", "ours-2w", "plain")


def command(config: str, root: Path, out: Path, size: int) -> list[str]:
    if config == "plain":
        return [sys.executable, str(REPO / "bench" / "plain_shard_loop.py"), "--root", str(root),
                "--out", str(out), "--size", str(size)]
    workers = config.removeprefix("ours-").removesuffix("w")
    return [sys.executable, "-m", "data_pipeline.build_shards", "--dataset", "chestxray14",
            "--root", str(root), "--out", str(out), "--size", str(size), "--format", "png",
            "--workers", workers, "--quiet", "--overwrite"]


def _children_cpu() -> float:
    """User + system CPU seconds of every waited-for descendant (the builder's pool workers too)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(config: str, root: Path, out: Path, size: int, n_source: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    load_before = os.getloadavg()[0]  # other users' load on a shared machine skews the ratios
    cpu_before = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run(command(config, root, out, size), cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    cpu = _children_cpu() - cpu_before
    if proc.returncode != 0:
        raise SystemExit(f"error: {config} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    run = {"config": config, "seconds": round(seconds, 3), "images": n_source,
           "images_per_second": round(n_source / seconds, 2),
           "shard_bytes": sum(p.stat().st_size for p in out.glob("*.tar")),
           "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
           "cpu_seconds": round(cpu, 2), "cores_used": round(cpu / seconds, 2)}
    run["cpu_ms_per_image"] = round(cpu / n_source * 1e3, 2)
    if config == "plain":
        inner = json.loads(proc.stdout.strip().splitlines()[-1])
        run["in_process_images_per_second"] = round(inner["images"] / inner["seconds"], 2)
    else:
        summary = read_manifest(out)["summary"]
        run["images"] = summary["accepted"]
        run["images_per_second"] = round(summary["accepted"] / seconds, 2)
        run["in_process_images_per_second"] = summary["images_per_second"]
    return run


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=5000, help="synthetic images to generate")
    p.add_argument("--image-size", type=int, default=1024, help="side of the generated images")
    p.add_argument("--data", type=Path, help="reuse this ChestX-ray14-layout dataset instead")
    p.add_argument("--size", type=int, default=256, help="shard image side")
    p.add_argument("--repeats", type=int, default=3, help="runs of each configuration")
    p.add_argument("--gen-workers", type=int, default=2, help="processes generating the dataset")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help="datasets and shards go here")
    p.add_argument("--out", type=Path, default=RESULTS / "build_shards_scaling.json")
    a = p.parse_args(argv)
    if a.repeats < 1 or a.n < 1:
        p.error("--repeats and --n must be >= 1")

    info = machine()
    root, generation = ensure_cxr(a.data, a.n, a.image_size, a.work, a.gen_workers)
    if generation["reused"]:
        print(f"source: reusing {generation['images']} images in {root}")
    else:
        print(f"source: generated {a.n} images of {a.image_size}x{a.image_size} with "
              f"{a.gen_workers} workers in {generation['seconds']:.1f} s "
              f"({generation['images_per_second']:.1f} img/s) -> {root}")
    generation["page_cache_warm"] = warm_page_cache(root)
    n_source = generation["images"]
    source_px = source_image_size(root)[0]

    runs = []
    for r in range(a.repeats):
        order = CONFIGS[r % 3:] + CONFIGS[:r % 3]
        for config in order:
            run = run_once(config, root, a.work / "scaling_shards" / config, a.size, n_source)
            run["repeat"] = r
            runs.append(run)
            print(f"  repeat {r} {config:8s} {run['seconds']:8.2f} s  {run['images_per_second']:8.1f} img/s"
                  f"  {run['cores_used']:.2f} cores used  {run['cpu_ms_per_image']:.1f} CPU-ms/img"
                  f"  (1-min load {run['load_average_1min'][0]} -> {run['load_average_1min'][1]})",
                  flush=True)

    def of(config, key="images_per_second"):
        return [x[key] for x in runs if x["config"] == config]

    def paired(num, den, key):
        return [x / y for x, y in zip(of(num, key), of(den, key))]

    summary = {c: {"median_images_per_second": round(median(of(c)), 2),
                   "median_seconds": round(median(of(c, "seconds")), 2),
                   "median_in_process_images_per_second":
                       round(median(of(c, "in_process_images_per_second")), 2),
                   "median_cores_used": round(median(of(c, "cores_used")), 2),
                   "median_cpu_ms_per_image": round(median(of(c, "cpu_ms_per_image")), 2)} for c in CONFIGS}
    ratios = {}
    for key, suffix in (("images_per_second", ""), ("in_process_images_per_second", "_in_process")):
        ratios["speedup_2w_over_1w" + suffix] = round(median(paired("ours-2w", "ours-1w", key)), 3)
        ratios["ours_1w_over_plain" + suffix] = round(median(paired("ours-1w", "plain", key)), 3)
        ratios["ours_2w_over_plain" + suffix] = round(median(paired("ours-2w", "plain", key)), 3)
    # CPU time per image does not depend on how many cores other users left us: the cleanest
    # measure of our builder's overhead over the plain loop, and of the parallel overhead of 2w.
    for name, num, den in (("ours_1w_over_plain", "ours-1w", "plain"),
                           ("ours_2w_over_1w", "ours-2w", "ours-1w")):
        ratios["cpu_per_image_" + name] = round(median(paired(num, den, "cpu_ms_per_image")), 3)

    print(f"\nBuild {n_source} images {source_px}px -> {a.size}px PNG shards; medians of "
          f"{a.repeats} interleaved runs ({info['cpus']} CPUs, {info['cpu']})")
    print(table(["config", "img/s (wall)", "seconds (wall)", "img/s (in-process)", "cores used",
                 "CPU-ms/img"],
                [[c, summary[c]["median_images_per_second"], summary[c]["median_seconds"],
                  summary[c]["median_in_process_images_per_second"], summary[c]["median_cores_used"],
                  summary[c]["median_cpu_ms_per_image"]] for c in CONFIGS]))
    print()
    print(table(["ratio (median of paired runs)", "wall", "in-process"],
                [[name, ratios[key], ratios[key + "_in_process"]] for name, key in (
                    ("speedup 2w / 1w", "speedup_2w_over_1w"),
                    ("ours-1w / plain", "ours_1w_over_plain"),
                    ("ours-2w / plain", "ours_2w_over_plain"))]))
    print()
    print(table(["CPU time per image (median of paired runs)", "ratio"],
                [["ours-1w / plain", ratios["cpu_per_image_ours_1w_over_plain"]],
                 ["ours-2w / ours-1w", ratios["cpu_per_image_ours_2w_over_1w"]]]))

    result = {"benchmark": "build_shards_scaling", "command": [Path(sys.argv[0]).name] + sys.argv[1:],
              "machine": info,
              "config": {"n": n_source, "image_size": source_px, "size": a.size, "format": "png",
                         "repeats": a.repeats, "configs": list(CONFIGS)},
              "generation": generation, "runs": runs, "summary": summary, "ratios": ratios}
    write_json(result, a.out)


if __name__ == "__main__":
    main()
