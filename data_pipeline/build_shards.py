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

    python -m data_pipeline.build_shards --dataset csv --root data/mine --out shards/mine \
        --csv labels.csv --path-column file --label-column finding --label-sep '|' \
        --labels Effusion,Mass,Nodule --patient-column patient --split-column split --verify

`--dataset csv` reads any dataset described by one CSV table (see data_pipeline/adapters/csv.py);
images may be DICOM (windowing: data_pipeline/image_io.py, `--dicom-window C,W` to fix it).
`--verify` re-reads every shard after the build (`--verify-only`: of an existing `--out`) and
exits non-zero naming the shard and sample of any problem (data_pipeline/verify_shards.py). An
interrupted build resumes when the same command is run again (data_pipeline/build_state.py).
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
from data_pipeline.build_state import BuildState, parameters_digest, start_or_resume
from data_pipeline.image_io import BadImage, MissingDependency, prepare
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


def write_split(split: str, records: list[Record], out: Path, index: DatasetIndex, args, pool,
                state: BuildState) -> dict:
    """Write one split's shards (from where `state` left off); returns its manifest entry."""
    if split in state.done:
        return state.done[split]
    progress = state.progress(split, len(index.label_names))
    opts = dict(size=args.size, fit=args.fit, fmt=args.format, jpeg_quality=args.jpeg_quality,
                max_pixels=args.max_pixels, window=args.dicom_window)
    work = partial(_prepare_one, **opts)
    todo = records[progress.position:]  # a resumed build does not decode the kept records again
    results = pool.map(work, todo, chunksize=16) if pool else map(work, todo)
    ext = IMAGE_EXT[args.format]
    writer = None
    try:
        bar = tqdm(results, total=len(records), initial=progress.position, desc=f"{split:5s}",
                   unit="img", disable=args.quiet, file=sys.stderr)
        for position, (record, image, reason) in enumerate(bar, start=progress.position):
            if reason is not None:
                index.reject(record.path, reason)
                continue
            if writer is not None and (writer.samples >= args.shard_size
                                       or writer.tar.offset + len(image) > args.shard_bytes):
                progress.shards.append(writer.close())
                writer = None
                progress.position = position  # this record opens the next shard
                state.checkpoint(split, progress)
            if writer is None:
                writer = ShardWriter(out / f"{split}-{len(progress.shards):06d}.tar")
            meta = {"key": record.key, "patient": record.patient, "split": split,
                    "labels": [n for n, v in zip(index.label_names, record.labels) if v]}
            writer.write(sample_members(record.key, image, ext, record.labels, progress.sid, meta))
            progress.positives += np.asarray(record.labels)
            progress.patients.add(record.patient)
            progress.sid += 1
        if writer is not None:
            progress.shards.append(writer.close())
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    entry = {"samples": progress.sid, "patients": len(progress.patients),
             "positives": dict(zip(index.label_names, progress.positives.tolist())),
             "shards": progress.shards}
    state.finish(split, entry)
    return entry


def adapter_options(args) -> dict:
    """Keyword options of the dataset's adapter (`load_dataset`)."""
    options = {"val_fraction": args.val_fraction, "seed": args.seed}
    if args.dataset == "csv":
        options.update(csv_file=args.csv, path_column=args.path_column,
                       label_columns=args.label_columns, label_column=args.label_column,
                       label_sep=args.label_sep, patient_column=args.patient_column,
                       split_column=args.split_column, labels=args.labels,
                       negative_label=args.negative_label, delimiter=args.delimiter,
                       test_fraction=args.test_fraction)
    return options


def build_parameters(args) -> dict:
    """Every option that changes the output bytes (the resume state is keyed on these)."""
    return {"format_version": FORMAT_VERSION, "dataset": args.dataset,
            "root": str(Path(args.root).resolve()), "options": adapter_options(args),
            "size": args.size, "fit": args.fit, "format": args.format,
            "jpeg_quality": args.jpeg_quality, "shard_size": args.shard_size,
            "shard_bytes": args.shard_bytes, "max_pixels": args.max_pixels,
            "dicom_window": args.dicom_window}


def build(args) -> dict:
    out = Path(args.out)
    if (out / MANIFEST).exists() and not args.overwrite:
        raise SystemExit(f"error: {out / MANIFEST} exists; pass --overwrite to rebuild")
    index = load_dataset(args.dataset, Path(args.root), **adapter_options(args))
    out.mkdir(parents=True, exist_ok=True)
    n_inputs = len(index.records) + len(index.rejected)
    state = start_or_resume(out, parameters_digest(build_parameters(args), index), index.rejected,
                            overwrite=args.overwrite, quiet=args.quiet)
    index.rejected = state.rejected  # adapter rejects, plus image rejects of a resumed build so far
    kept = sum(shard["samples"] for shard in state.kept_shards())
    t0 = time.perf_counter()
    pool = ProcessPoolExecutor(args.workers) if args.workers > 1 else None
    try:
        splits = {s: write_split(s, shuffled([r for r in index.records if r.split == s], args.seed, s),
                                 out, index, args, pool, state) for s in SPLITS}
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)  # after an error, do not decode the rest first
    seconds = time.perf_counter() - t0
    n_ok = sum(s["samples"] for s in splits.values())
    frac = len(index.rejected) / max(n_inputs, 1)
    if frac > args.max_reject_fraction or n_ok == 0:
        for shard in out.glob("*.tar"):
            shard.unlink()
            shard.with_suffix(".idx").unlink(missing_ok=True)
        state.remove()
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
                    "seconds": round(seconds, 2), "images_per_second": round((n_ok - kept) / seconds, 1)},
        "rejected": index.rejected,
    }
    if args.dataset == "csv":  # the other datasets' options are their fixed layouts
        manifest["dataset_options"] = {k: v for k, v in adapter_options(args).items()
                                       if k not in ("val_fraction", "seed")}
    if args.dicom_window is not None:
        manifest["image"]["dicom_window"] = list(args.dicom_window)
    tmp = out / (MANIFEST + ".part")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    state.remove()  # the manifest marks the build complete
    return manifest


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _window(text: str) -> tuple[float, float]:
    try:
        center, width = (float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected CENTER,WIDTH (two numbers), got {text!r}") from None
    if width < 1:
        raise argparse.ArgumentTypeError(f"window width must be >= 1, got {width}")
    return center, width


def _delimiter(text: str) -> str:
    text = {"\\t": "\t", "tab": "\t"}.get(text, text)
    if len(text) != 1:
        raise argparse.ArgumentTypeError(f"delimiter must be one character (or 'tab'), got {text!r}")
    return text


CSV_FLAGS = ("csv", "label_columns", "label_column", "label_sep", "patient_column", "split_column",
             "labels", "negative_label")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=["chestxray14", "fetal_planes", "csv"])
    p.add_argument("--root", help="dataset directory in its original layout")
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
    p.add_argument("--dicom-window", type=_window, metavar="CENTER,WIDTH",
                   help="DICOM window for every image, instead of each file's WindowCenter/Width")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild from scratch (without it, an interrupted build is resumed)")
    p.add_argument("--verify", action="store_true", help="re-read and check every shard after the build")
    p.add_argument("--verify-only", action="store_true", help="only check the shards already in --out")
    p.add_argument("--quiet", action="store_true")
    g = p.add_argument_group("--dataset csv (see data_pipeline/adapters/csv.py)")
    g.add_argument("--csv", help="the CSV table: as given, or relative to --root")
    g.add_argument("--path-column", default="path", help="image path, relative to --root or absolute")
    g.add_argument("--label-columns", type=_list, metavar="A,B,C", help="one 0/1 column per class")
    g.add_argument("--label-column", help="class name(s) of each image, one column")
    g.add_argument("--label-sep", help="separator of several names in --label-column (multi-label)")
    g.add_argument("--negative-label", help="with --label-sep: value meaning no positive class")
    g.add_argument("--labels", type=_list, metavar="A,B,C", help="label vocabulary and order")
    g.add_argument("--patient-column", help="default: every image its own patient")
    g.add_argument("--split-column", help="train/val/test; default: carved by patient")
    g.add_argument("--test-fraction", type=float, default=0.1,
                   help="of patients, without --split-column")
    g.add_argument("--delimiter", type=_delimiter, default=",", help="CSV field separator")
    a = p.parse_args(argv)
    if a.size < 16 or a.shard_size < 1 or a.workers < 1 or not 1 <= a.jpeg_quality <= 100:
        p.error("--size >= 16, --shard-size >= 1, --workers >= 1, 1 <= --jpeg-quality <= 100")
    if not a.verify_only and (a.dataset is None or a.root is None):
        p.error("--dataset and --root are required (except with --verify-only)")
    used = [f"--{f.replace('_', '-')}" for f in CSV_FLAGS if getattr(a, f) is not None]
    if a.dataset == "csv" and a.csv is None:
        p.error("--dataset csv needs --csv FILE")
    if a.dataset not in ("csv", None) and used:
        p.error(f"{', '.join(used)} only apply to --dataset csv")
    return a


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.verify_only:
        try:
            m = build(args)
        except (FileNotFoundError, ValueError, MissingDependency) as e:
            raise SystemExit(f"error: {e}") from None
        s = m["summary"]
        counts = ", ".join(f"{k} {v['samples']} ({v['patients']} patients, {len(v['shards'])} shards)"
                           for k, v in m["splits"].items())
        print(f"{m['dataset']}: {s['accepted']} samples [{counts}], {s['rejected']} rejected, "
              f"{s['images_per_second']} img/s -> {Path(args.out) / MANIFEST}")
    if args.verify or args.verify_only:
        from data_pipeline.verify_shards import verify_or_exit
        try:
            verify_or_exit(Path(args.out), args.quiet)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
