"""Loader throughput: DALI (CPU-only mode) vs the plain torch fallback, per shard format.

    python bench/loader_throughput.py                              # 2,000 synthetic 1024-px images
    python bench/loader_throughput.py --data $TMPDIR/rms-distill-bench/cxr_n5000_px1024 --n 2000
    python bench/loader_throughput.py --n 40 --image-size 128 --passes 1 --batch-size 16  # smoke

The same source images are built into 256-pixel shards once per format (png, jpeg, raw; reused
when a complete build is already under `--work`), and then, for each format and for train
(default `AugmentSpec`: random resized crop, rotation, brightness/contrast) and eval (resize only)
batches of 224 pixels, both loaders read the `--split` split through `data_pipeline.loader.build_loader`
with the same batch size and the same `num_threads` (DALI: a pool of that many threads; torch:
`num_workers = num_threads - 1` worker processes, as loader.py sets it, each with one intra-op
thread, plus the main process collating with `torch.get_num_threads()` threads). Each loader gets
one untimed warm-up epoch, then `--passes` timed epochs. The loaders of a cell run back to back,
the first of them rotating from cell to cell and from round to round; the whole sweep is repeated
`--rounds` times (fresh loaders each time) and a cell's figure is the median over all its timed
epochs; the ratio is also given per round, to show how much the shared machine moved it.

Also measured, for the GPU plan in bench/README.md: bytes per sample from the manifests (whole
tar, and the image member alone), the single-thread CPU decode cost per image (PIL over
in-memory bytes; DALI's CPU decoder with one thread, reader included), and each loader's CPU time
per image (all threads and worker processes, warm-up included). Wall time is what a shared
machine gives; CPU time is what the work costs, whatever other users' jobs are doing.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _common import (DEFAULT_WORK, REPO, RESULTS, count_rows, ensure_cxr, machine, median,
                     source_image_size, subset_cxr, table, write_json)
from data_pipeline.manifest import MANIFEST, read_manifest  # noqa: E402 (after _common: repo on the path)

FORMATS = ("png", "jpeg", "raw")


def build_format(root: Path, out: Path, fmt: str, size: int, workers: int) -> dict:
    """Shards of `root` in `fmt`, built unless a complete build of the same source is there."""
    manifest = out / MANIFEST
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        built = (m["image"]["format"], m["image"]["size"], m["summary"]["inputs"])
        if built == (fmt, size, count_rows(root)):
            return {"reused": True, "seconds": None}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "data_pipeline.build_shards", "--dataset", "chestxray14",
                           "--root", str(root), "--out", str(out), "--size", str(size), "--format", fmt,
                           "--workers", str(workers), "--quiet", "--overwrite"],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: building {fmt} shards failed:\n{proc.stderr[-2000:]}")
    return {"reused": False, "seconds": round(time.perf_counter() - t0, 2)}


def shard_bytes(shard_dir: Path) -> dict:
    """Mean bytes per sample over all splits: whole tar (headers, labels, ids, json) and image alone."""
    m = read_manifest(shard_dir)
    ext = m["image"]["ext"]
    shards = [s for split in m["splits"].values() for s in split["shards"]]
    samples = sum(s["samples"] for s in shards)
    image = [int(f[i + 2]) for s in shards
             for line in (shard_dir / s["index"]).read_text().splitlines()[1:]
             for f in [line.split()] for i in range(0, len(f), 4) if f[i] == ext]
    return {"samples": samples, "tar_bytes_per_sample": round(sum(s["bytes"] for s in shards) / samples, 1),
            "image_bytes_per_sample": round(float(np.mean(image)), 1)}


def image_members(shard_dir: Path, split: str, limit: int) -> tuple[str, int, list[bytes]]:
    from data_pipeline.loader_common import split_shards
    from data_pipeline.torch_loader import read_index
    manifest, tars, idxs = split_shards(shard_dir, split)
    ext = manifest["image"]["ext"]
    out = []
    for tar, idx in zip(tars, idxs):
        with open(tar, "rb") as f:
            for _, members in read_index(tar, idx):
                f.seek(members[ext][0])
                out.append(f.read(members[ext][1]))
                if len(out) == limit:
                    return ext, manifest["image"]["size"], out
    return ext, manifest["image"]["size"], out


def cpu_seconds() -> float:
    """CPU time of this process (all its threads) and of its waited-for children (torch workers)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def pil_decode_ms(shard_dir: Path, split: str, limit: int, repeats: int = 3) -> dict:
    """Single-thread decode of in-memory image members to a uint8 array: wall and CPU ms per image
    (medians). CPU time does not grow when other users' jobs take the core; wall time does."""
    from PIL import Image
    ext, size, blobs = image_members(shard_dir, split, limit)
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for b in blobs:
            if ext == "raw":
                np.frombuffer(b, dtype=np.uint8).reshape(size, size).copy()
            else:
                np.asarray(Image.open(io.BytesIO(b)).convert("L"))
        wall.append((time.perf_counter() - t0) / len(blobs) * 1e3)
        cpu.append((time.process_time() - c0) / len(blobs) * 1e3)
    return {"pil_ms_per_image_1thread": round(median(wall), 4),
            "pil_cpu_ms_per_image_1thread": round(median(cpu), 4)}


def dali_decode(shard_dir: Path, split: str, batch_size: int, threads: int) -> dict:
    """DALI CPU-only reader + decoder (raw: reshape), no augmentation, `threads` threads: wall and
    CPU (whole process) ms per image in the second of two epochs."""
    from nvidia.dali import fn, pipeline_def, types
    from data_pipeline.loader_common import split_shards
    manifest, tars, idxs = split_shards(shard_dir, split)
    ext, size = manifest["image"]["ext"], manifest["image"]["size"]
    n = manifest["splits"][split]["samples"]

    @pipeline_def
    def pipe():
        raw = fn.readers.webdataset(paths=tars, index_paths=idxs, ext=[ext], dtypes=[types.UINT8],
                                    pad_last_batch=True, name="reader")
        if ext == "raw":
            return fn.reshape(raw, shape=[size, size, 1], layout="HWC")
        return fn.decoders.image(raw, device="cpu", output_type=types.GRAY)

    p = pipe(batch_size=batch_size, num_threads=threads, device_id=None, prefetch_queue_depth=2)
    p.build()
    steps = -(-n // batch_size)
    for _ in range(2):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            p.run()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    del p
    images = steps * batch_size
    return {"dali_cpu_images_per_second_1thread": round(images / wall, 1),
            "dali_cpu_ms_per_image_1thread": round(wall / images * 1e3, 4),
            "dali_cpu_cpu_ms_per_image_1thread": round(cpu / images * 1e3, 4)}


def time_loader(make, passes: int) -> dict:
    """Build a loader, run one untimed warm-up epoch, then `passes` timed epochs."""
    load_before = os.getloadavg()[0]  # other users' load on a shared machine skews the ratios
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    loader = make()
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = sum(b["image"].shape[0] for b in loader)
    warm_s = time.perf_counter() - t0
    epochs = []
    for _ in range(passes):
        t0 = time.perf_counter()
        images = sum(b["image"].shape[0] for b in loader)  # (b, 1, s, s) float32 each
        epochs.append({"images": images, "seconds": round(time.perf_counter() - t0, 4)})
    del loader
    gc.collect()  # stop (and join) the torch workers / DALI threads before the next loader starts
    cpu = cpu_seconds() - cpu0  # build + warm-up + timed epochs, every thread and worker
    ips = [e["images"] / e["seconds"] for e in epochs]
    return {"build_seconds": round(built, 3), "warmup_seconds": round(warm_s, 3), "warmup_images": warm,
            "epochs": epochs, "median_images_per_second": round(median(ips), 1),
            "cpu_ms_per_image": round(cpu / (warm + sum(e["images"] for e in epochs)) * 1e3, 3),
            "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="source images (generated, or the first n of --data)")
    p.add_argument("--image-size", type=int, default=1024, help="side of generated source images")
    p.add_argument("--data", type=Path, help="reuse this ChestX-ray14-layout dataset (its first --n images)")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated subset of png,jpeg,raw")
    p.add_argument("--size", type=int, default=256, help="stored shard image side")
    p.add_argument("--output-size", type=int, default=224, help="loader output image side")
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-threads", type=int, default=2, help="DALI threads; torch workers = this - 1")
    p.add_argument("--torch-workers", type=int, nargs="*", default=[],
                   help="also time the torch loader with these num_workers (extra rows)")
    p.add_argument("--passes", type=int, default=3, help="timed epochs per loader (after a warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="repeats of the whole sweep, spread over time")
    p.add_argument("--decode-images", type=int, default=300, help="images in the decode-cost measurement")
    p.add_argument("--build-workers", type=int, default=2)
    p.add_argument("--gen-workers", type=int, default=2)
    p.add_argument("--work", type=Path, default=DEFAULT_WORK)
    p.add_argument("--out", type=Path, default=RESULTS / "loader_throughput.json")
    a = p.parse_args(argv)
    formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    if not formats or set(formats) - set(FORMATS) or min(a.passes, a.rounds, a.num_threads) < 1:
        p.error("--formats from png,jpeg,raw; --passes, --rounds and --num-threads >= 1")

    # 1. Source images and one shard build per format (subprocesses: nothing imported yet forks).
    root, generation = ensure_cxr(a.data, a.n, a.image_size, a.work, a.gen_workers)
    if generation["images"] > a.n:
        root = subset_cxr(root, a.work / f"{root.name}_first{a.n}", a.n)
        generation["subset_root"], generation["images"] = str(root), a.n
    source_px = source_image_size(root)[0]
    print(f"source: {generation['images']} images of {source_px} px in {root}"
          + ("" if generation["reused"] else f" (generated in {generation['seconds']:.1f} s)"))
    shard_dirs, builds = {}, {}
    for fmt in formats:
        shard_dirs[fmt] = a.work / f"loader_shards_{root.name}_{fmt}{a.size}"
        builds[fmt] = build_format(root, shard_dirs[fmt], fmt, a.size, a.build_workers)
        builds[fmt].update(shard_bytes(shard_dirs[fmt]))
        print(f"  {fmt:4s} shards: " + ("reused" if builds[fmt]["reused"]
                                        else f"built in {builds[fmt]['seconds']:.1f} s"), flush=True)

    import torch
    from data_pipeline.dali_loader import dali_available
    from data_pipeline.loader import build_loader
    from data_pipeline.loader_common import AugmentSpec
    from data_pipeline.torch_loader import build_torch_loader
    info = machine()
    have_dali = dali_available()

    # 2-3. Rounds: each measures every cell afresh, the loader order alternating by cell and round,
    # so a burst of other users' load hits both loaders of a cell alike over the whole run.
    torch_rule = max(0, a.num_threads - 1)
    loaders = (["dali"] if have_dali else []) + ["torch"] + [f"torch-w{w}" for w in a.torch_workers]

    def maker(fmt, loader, train):
        common = dict(batch_size=a.batch_size, image_size=a.output_size, train=train,
                      augment=AugmentSpec() if train else None)
        if loader.startswith("torch-w"):
            return lambda: build_torch_loader(shard_dirs[fmt], a.split, num_workers=int(loader[7:]), **common)
        return lambda: build_loader(shard_dirs[fmt], a.split, backend=loader, num_threads=a.num_threads,
                                    **common)

    decode_runs, cells = {fmt: [] for fmt in formats}, []
    for rnd in range(a.rounds):
        k = rnd  # the first loader of a cell rotates from cell to cell and from round to round
        for fmt in formats:  # decode cost per image, one thread
            d = pil_decode_ms(shard_dirs[fmt], a.split, a.decode_images)
            if have_dali:
                d.update(dali_decode(shard_dirs[fmt], a.split, a.batch_size, 1))
            decode_runs[fmt].append(d)
        for fmt in formats:
            for mode in ("train", "eval"):
                order = loaders[k % len(loaders):] + loaders[:k % len(loaders)]
                k += 1
                for loader in order:
                    r = time_loader(maker(fmt, loader, mode == "train"), a.passes)
                    cells.append({"format": fmt, "mode": mode, "loader": loader, "round": rnd, **r})
                    print(f"  round {rnd} {fmt:4s} {mode:5s} {loader:9s} "
                          f"{r['median_images_per_second']:8.1f} img/s"
                          f" (warm-up {r['warmup_seconds']:.2f} s, 1-min load {r['load_average_1min'][0]})",
                          flush=True)
    decode = {fmt: {key: round(median([d[key] for d in runs]), 4) for key in runs[0]}
              for fmt, runs in decode_runs.items()}

    def ips(fmt, mode, loader, rnd=None):
        """Median over the timed epochs of every round (or of round `rnd`)."""
        epochs = [e["images"] / e["seconds"] for c in cells
                  if (c["format"], c["mode"], c["loader"]) == (fmt, mode, loader)
                  and rnd in (None, c["round"])
                  for e in c["epochs"]]
        return round(median(epochs), 1) if epochs else None

    def cpu_ms(fmt, mode, loader):
        values = [c["cpu_ms_per_image"] for c in cells
                  if (c["format"], c["mode"], c["loader"]) == (fmt, mode, loader)]
        return round(median(values), 3) if values else None

    rows, ratios, summary = [], {}, []
    for fmt in formats:
        for mode in ("train", "eval"):
            for loader in loaders:
                summary.append({"format": fmt, "mode": mode, "loader": loader,
                                "median_images_per_second": ips(fmt, mode, loader),
                                "median_cpu_ms_per_image": cpu_ms(fmt, mode, loader)})
            d, t = ips(fmt, mode, "dali"), ips(fmt, mode, "torch")
            per_round = [round(ips(fmt, mode, "dali", r) / ips(fmt, mode, "torch", r), 2)
                         for r in range(a.rounds)] if d and t else []
            ratios[f"{fmt}/{mode}"] = {"ratio": round(d / t, 3) if d and t else None, "per_round": per_round}
            rows.append([fmt, mode, d, t] + [ips(fmt, mode, f"torch-w{w}") for w in a.torch_workers]
                        + [ratios[f"{fmt}/{mode}"]["ratio"], ", ".join(f"{x:.2f}" for x in per_round),
                           cpu_ms(fmt, mode, "dali"), cpu_ms(fmt, mode, "torch")])

    m = read_manifest(shard_dirs[formats[0]])
    n_split = m["splits"][a.split]["samples"]
    print(f"\nLoader throughput, split {a.split!r} ({n_split} images) of {generation['images']} "
          f"source images, "
          f"{a.size} px shards -> {a.output_size} px batches of {a.batch_size}; median of {a.passes} "
          f"epochs after a warm-up x {a.rounds} rounds; DALI CPU-only num_threads={a.num_threads}, "
          f"torch num_workers="
          f"{torch_rule}, torch.get_num_threads()={torch.get_num_threads()}; {info['cpus']} CPUs")
    print(table(["format", "mode", "DALI img/s", f"torch (w{torch_rule}) img/s"]
                + [f"torch (w{w}) img/s" for w in a.torch_workers]
                + ["DALI / torch", "per round", "DALI CPU-ms/img", "torch CPU-ms/img"], rows))
    print()
    print(table(["format", "tar bytes/sample", "image bytes/sample", "PIL decode ms/img wall (CPU)",
                 "DALI CPU-mode decode ms/img wall (CPU)"],
                [[fmt, builds[fmt]["tar_bytes_per_sample"], builds[fmt]["image_bytes_per_sample"],
                  f"{decode[fmt]['pil_ms_per_image_1thread']:.3g} "
                  f"({decode[fmt]['pil_cpu_ms_per_image_1thread']:.3g})",
                  f"{decode[fmt]['dali_cpu_ms_per_image_1thread']:.3g} "
                  f"({decode[fmt]['dali_cpu_cpu_ms_per_image_1thread']:.3g})" if have_dali else None]
                 for fmt in formats]))

    result = {"benchmark": "loader_throughput", "command": [Path(sys.argv[0]).name] + sys.argv[1:],
              "machine": info,
              "config": {"n_source": generation["images"], "source_image_size": source_px,
                         "split": a.split, "split_samples": n_split, "size": a.size,
                         "output_size": a.output_size,
                         "batch_size": a.batch_size, "num_threads": a.num_threads,
                         "torch_num_workers": torch_rule, "torch_extra_num_workers": a.torch_workers,
                         "torch_get_num_threads": torch.get_num_threads(), "passes": a.passes,
                         "rounds": a.rounds,
                         "dali_available": have_dali, "augment_train": dataclasses.asdict(AugmentSpec()),
                         "formats": formats},
              "generation": generation, "shards": builds, "decode": decode, "decode_runs": decode_runs,
              "summary": summary, "cells": cells, "ratios_dali_over_torch": ratios}
    write_json(result, a.out)


if __name__ == "__main__":
    main()
