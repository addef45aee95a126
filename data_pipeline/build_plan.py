"""What a whole shard build and one slice of it share: the plan, the shard writer loop, the options.

A split's records are shuffled deterministically (`shuffled`) and cut into fixed ranges of
`--shard-size` records (`plan_shards`); `write_shards` streams the planned shards' records through
the decode pool and writes each shard, reporting every closed one to the caller's checkpoint.
`data_pipeline.build_shards` runs every planned shard in one process; `data_pipeline.slices` runs
every N-th one per slice and merges the slices. `build_parameters` keys the resume state;
`manifest_head` is everything the manifest says apart from what the build produced.
"""
from __future__ import annotations

import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipeline.adapters import SPLITS, DatasetIndex, Record
from data_pipeline.build_state import SplitProgress
from data_pipeline.image_io import BadImage, prepare
from data_pipeline.manifest import synthetic_marker
from data_pipeline.disk import DiskFull, disk_full, out_of_space
from data_pipeline.shard_format import IMAGE_EXT, ShardWriter, sample_members

FORMAT_VERSION = 1
SLICES_DIR = "slices"  # a sliced build's partial manifests and checkpoints, inside --out


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


@dataclass
class PlannedShard:
    """Shard `number` of `split`: the records at positions [start, start + len(records)) of the
    split's shuffled list (rejected ones will be left out)."""
    split: str
    number: int
    start: int
    records: list[Record]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.number:06d}.tar"

    @property
    def end(self) -> int:
        return self.start + len(self.records)


def plan_shards(index: DatasetIndex, seed: int, shard_size: int) -> dict[str, list[PlannedShard]]:
    """Every split's shards: fixed ranges of `shard_size` records of its shuffled record list."""
    plan = {}
    for split in SPLITS:
        records = shuffled([r for r in index.records if r.split == split], seed, split)
        plan[split] = [PlannedShard(split, k, start, records[start:start + shard_size])
                       for k, start in enumerate(range(0, len(records), shard_size))]
    return plan


def plan_end(shards: list[PlannedShard]) -> int:
    """The number of records in a split, from its planned shards."""
    return shards[-1].end if shards else 0


@dataclass
class ShardResult:
    """What writing one planned shard gave: its manifest entry (None when every record was
    rejected), its rejects (with their positions in the split), positives and patients."""
    planned: PlannedShard
    first_sid: int
    entry: dict | None
    rejected: list[dict]
    positives: np.ndarray
    patients: set


def write_shards(todo: list[PlannedShard], first_sid, out: Path, index: DatasetIndex, args, pool,
                 done, desc: str = "shards") -> None:
    """Write the planned shards in order, streaming all their records through the worker pool.
    `first_sid(planned)` is the id of a shard's first sample (asked when the shard starts);
    `done(result)` is called after each shard closes (the checkpoint)."""
    opts = dict(size=args.size, fit=args.fit, fmt=args.format, jpeg_quality=args.jpeg_quality,
                max_pixels=args.max_pixels, window=args.dicom_window)
    work = partial(_prepare_one, **opts)
    records = [r for planned in todo for r in planned.records]
    results = iter(pool.map(work, records, chunksize=16) if pool else map(work, records))
    ext, n_classes = IMAGE_EXT[args.format], len(index.label_names)
    bar = tqdm(total=len(records), desc=desc, unit="img", disable=args.quiet, file=sys.stderr)
    seen, written = 0, [0, 0]  # records read; bytes and samples of the shards closed so far
    for planned in todo:
        result = ShardResult(planned, first_sid(planned), None, [],
                             np.zeros(n_classes, dtype=np.int64), set())
        writer = None
        try:
            for position in range(planned.start, planned.end):
                record, image, reason = next(results)
                seen += 1
                bar.update()
                if reason is not None:
                    result.rejected.append({"input": str(record.path), "reason": reason,
                                            "position": position})
                    continue
                if writer is None:
                    writer = ShardWriter(out / planned.name)
                elif writer.tar.offset + len(image) > args.shard_bytes:
                    raise SystemExit(
                        f"error: {planned.name} would exceed --shard-bytes {args.shard_bytes} after "
                        f"{writer.samples} samples; a shard holds up to --shard-size "
                        f"({args.shard_size}) records whatever their size, so rebuild with "
                        f"--overwrite and a --shard-size of at most {writer.samples} (or a larger "
                        f"--shard-bytes)")
                meta = {"key": record.key, "patient": record.patient, "split": planned.split,
                        "labels": [n for n, v in zip(index.label_names, record.labels) if v]}
                writer.write(sample_members(record.key, image, ext, record.labels,
                                            result.first_sid + writer.samples, meta))
                result.positives += np.asarray(record.labels)
                result.patients.add(record.patient)
            if writer is not None:
                result.entry = writer.close()
        except BaseException as e:
            if writer is not None:
                writer.abort()
            bar.close()
            if out_of_space(e, out):
                lost = writer.samples if writer is not None else 0
                raise _disk_full(out / planned.name, written, writer, len(records) - seen + lost) from None
            raise
        if result.entry is not None:
            written[0] += result.entry["bytes"]
            written[1] += result.entry["samples"]
        done(result)
    bar.close()


def _disk_full(shard: Path, written: list, writer, samples_left: int) -> DiskFull:
    """The error for a shard write that found the disk full: its path (the `.part` is already
    removed), the bytes free, and the bytes the rest of the build needs at the mean sample size
    written so far."""
    if written[1]:
        per_sample = written[0] / written[1]
    else:  # the first shard: its bytes so far (the tar was closed by abort)
        per_sample = writer.tar.offset / writer.samples if writer is not None and writer.samples else None
    needed = int(per_sample * samples_left) if per_sample else None
    error = disk_full(shard, needed, " to finish the build")
    return DiskFull(f"{error}; the unfinished shard was removed: free space and run the same command "
                    f"again (the build resumes after its last complete shard)")


def split_entry(progress: SplitProgress, label_names) -> dict:
    return {"samples": progress.sid, "patients": len(progress.patients),
            "positives": dict(zip(label_names, progress.positives.tolist())),
            "shards": progress.shards}


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


def manifest_head(index: DatasetIndex, args) -> dict:
    """Everything manifest.json holds apart from splits, summary and rejects."""
    head = {
        "format_version": FORMAT_VERSION, "dataset": index.name, "multilabel": index.multilabel,
        "label_names": list(index.label_names),
        "image": {"size": args.size, "format": args.format, "ext": IMAGE_EXT[args.format],
                  "fit": args.fit, "channels": 1, "jpeg_quality": args.jpeg_quality},
        "seed": args.seed, "val_fraction": args.val_fraction,
    }
    if args.dicom_window is not None:
        head["image"]["dicom_window"] = list(args.dicom_window)
    synthetic = synthetic_marker(Path(args.root))
    if synthetic is not None:
        head["synthetic"] = synthetic
    if args.dataset == "csv":  # the other datasets' options are their fixed layouts
        head["dataset_options"] = {k: v for k, v in adapter_options(args).items()
                                   if k not in ("val_fraction", "seed")}
    return head


def too_many_rejects(out: Path, rejected: list[dict], n_inputs: int, n_ok: int,
                     max_fraction: float) -> str | None:
    """None when the build may be kept; else delete every shard in `out` and return the error."""
    frac = len(rejected) / max(n_inputs, 1)
    if frac <= max_fraction and n_ok > 0:
        return None
    for shard in out.glob("*.tar"):
        shard.unlink()
        shard.with_suffix(".idx").unlink(missing_ok=True)
    first = "; ".join(f"{r['input']}: {r['reason']}" for r in rejected[:3])
    return (f"error: {len(rejected)} of {n_inputs} inputs rejected ({frac:.1%}) "
            f"> --max-reject-fraction {max_fraction:.1%}; no shards kept. First: {first}")


def make_pool(args):
    return ProcessPoolExecutor(args.workers) if args.workers > 1 else None

