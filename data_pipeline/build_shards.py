"""Build validated WebDataset shards (+ DALI indices + manifest.json) from a dataset on disk.

    python -m data_pipeline.build_shards --dataset chestxray14 --root data/cxr --out shards/cxr \
        --size 256 --format png --workers 8

Per split (train / val / test), samples are shuffled globally with `--seed` (DALI's reader only
shuffles inside a small buffer, so the global shuffle must happen here), decoded, validated, resized
and re-encoded by `--workers` processes, and written in order to `<split>-NNNNNN.tar` shards of at
most `--shard-size` samples / `--shard-bytes` bytes. Each shard is written under a temporary name and
renamed when complete, with its DALI index. `manifest.json` (written last, atomically) records label
names, samples / patients / positives per split, every shard's sha256, and every rejected input with
its reason. The build fails with a non-zero exit, and leaves no shards behind, when the rejected
fraction exceeds `--max-reject-fraction`. Identical inputs and seed give byte-identical shards.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipeline.adapters import SPLITS, DatasetIndex, Record, load_dataset
from data_pipeline.image_io import BadImage, prepare
from data_pipeline.shard_format import IMAGE_EXT, ShardWriter, sample_members

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def _prepare_one(record: Record, **opts):
    """Worker: returns (record, encoded bytes or None, reject reason or None)."""
    try:
        return record, prepare(record.path, **opts), None
    except BadImage as e:
        return record, None, str(e)


def shuffled(records: list[Record], seed: int, split: str) -> list[Record]:
    """Deterministic global shuffle, independent of the order the adapter listed files in."""
    records = sorted(records, key=lambda r: r.key)
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    return [records[i] for i in rng.permutation(len(records))]


def write_split(split: str, records: list[Record], out: Path, index: DatasetIndex, args, pool):
    """Write one split's shards; returns its manifest entry."""
    opts = dict(size=args.size, fit=args.fit, fmt=args.format, jpeg_quality=args.jpeg_quality,
                max_pixels=args.max_pixels)
    work = partial(_prepare_one, **opts)
    results = pool.map(work, records, chunksize=16) if pool else map(work, records)
    ext = IMAGE_EXT[args.format]
    shards, writer, sid = [], None, 0
    positives = np.zeros(len(index.label_names), dtype=np.int64)
    patients = set()
    try:
        for record, image, reason in tqdm(results, total=len(records), desc=f"{split:5s}",
                                          unit="img", disable=args.quiet, file=sys.stderr):
            if reason is not None:
                index.reject(record.path, reason)
                continue
            if writer is not None and (writer.samples >= args.shard_size
                                       or writer.tar.offset + len(image) > args.shard_bytes):
                shards.append(writer.close())
                writer = None
            if writer is None:
                writer = ShardWriter(out / f"{split}-{len(shards):06d}.tar")
            meta = {"key": record.key, "patient": record.patient, "split": split,
                    "labels": [n for n, v in zip(index.label_names, record.labels) if v]}
            writer.write(sample_members(record.key, image, ext, record.labels, sid, meta))
            positives += np.asarray(record.labels)
            patients.add(record.patient)
            sid += 1
        if writer is not None:
            shards.append(writer.close())
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return {"samples": sid, "patients": len(patients),
            "positives": dict(zip(index.label_names, positives.tolist())), "shards": shards}


def build(args) -> dict:
    out = Path(args.out)
    if (out / MANIFEST).exists() and not args.overwrite:
        raise SystemExit(f"error: {out / MANIFEST} exists; pass --overwrite to rebuild")
    index = load_dataset(args.dataset, Path(args.root), val_fraction=args.val_fraction, seed=args.seed)
    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("*.tar")) + list(out.glob("*.idx")) + [out / MANIFEST]:
        stale.unlink(missing_ok=True)
    n_inputs = len(index.records) + len(index.rejected)
    t0 = time.perf_counter()
    pool = ProcessPoolExecutor(args.workers) if args.workers > 1 else None
    try:
        splits = {s: write_split(s, shuffled([r for r in index.records if r.split == s], args.seed, s),
                                 out, index, args, pool) for s in SPLITS}
    finally:
        if pool:
            pool.shutdown()
    seconds = time.perf_counter() - t0
    n_ok = sum(s["samples"] for s in splits.values())
    frac = len(index.rejected) / max(n_inputs, 1)
    if frac > args.max_reject_fraction or n_ok == 0:
        for shard in out.glob("*.tar"):
            shard.unlink()
            shard.with_suffix(".idx").unlink(missing_ok=True)
        first = "; ".join(f"{r['input']}: {r['reason']}" for r in index.rejected[:3])
        raise SystemExit(f"error: {len(index.rejected)} of {n_inputs} inputs rejected ({frac:.1%}) "
                         f"> --max-reject-fraction {args.max_reject_fraction:.1%}; no shards kept. "
                         f"First: {first}")
    manifest = {
        "format_version": FORMAT_VERSION, "dataset": index.name, "multilabel": index.multilabel,
        "label_names": list(index.label_names),
        "image": {"size": args.size, "format": args.format, "ext": IMAGE_EXT[args.format],
                  "fit": args.fit, "channels": 1, "jpeg_quality": args.jpeg_quality},
        "seed": args.seed, "val_fraction": args.val_fraction, "splits": splits,
        "summary": {"inputs": n_inputs, "accepted": n_ok, "rejected": len(index.rejected),
                    "seconds": round(seconds, 2), "images_per_second": round(n_ok / seconds, 1)},
        "rejected": index.rejected,
    }
    tmp = out / (MANIFEST + ".part")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, choices=["chestxray14", "fetal_planes"])
    p.add_argument("--root", required=True, help="dataset directory in its original layout")
    p.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    p.add_argument("--size", type=int, default=256, help="output side in pixels")
    p.add_argument("--fit", choices=["pad", "crop", "stretch"], default="pad")
    p.add_argument("--format", choices=list(IMAGE_EXT), default="png")
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--shard-size", type=int, default=1000, help="max samples per shard")
    p.add_argument("--shard-bytes", type=int, default=1 << 30, help="max bytes per shard")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--seed", type=int, default=0, help="shuffle and validation-carving seed")
    p.add_argument("--val-fraction", type=float, default=0.1, help="of train patients, by patient")
    p.add_argument("--max-reject-fraction", type=float, default=0.01)
    p.add_argument("--max-pixels", type=int, default=100_000_000)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    if a.size < 16 or a.shard_size < 1 or a.workers < 1 or not 1 <= a.jpeg_quality <= 100:
        p.error("--size >= 16, --shard-size >= 1, --workers >= 1, 1 <= --jpeg-quality <= 100")
    return a


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        m = build(args)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    s = m["summary"]
    counts = ", ".join(f"{k} {v['samples']} ({v['patients']} patients, {len(v['shards'])} shards)"
                       for k, v in m["splits"].items())
    print(f"{m['dataset']}: {s['accepted']} samples [{counts}], {s['rejected']} rejected, "
          f"{s['images_per_second']} img/s -> {Path(args.out) / MANIFEST}")


if __name__ == "__main__":
    main()
