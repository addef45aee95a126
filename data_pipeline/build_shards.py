"""Build validated WebDataset shards (+ DALI indices + manifest.json) from a dataset on disk.

    python -m data_pipeline.build_shards --dataset chestxray14 --root data/cxr --out shards/cxr \
        --size 256 --format png --workers 8

Per split (train / val / test), samples are shuffled globally with `--seed` (DALI's reader only
shuffles inside a small buffer, so the global shuffle must happen here), decoded, validated, resized
and re-encoded by `--workers` processes, and written in order to `<split>-NNNNNN.tar` shards. Each
shard is written under a temporary name and renamed when complete, with its DALI index.
`manifest.json` (written last, atomically) records label names, samples / patients / positives per
split, every shard's sha256, every rejected input with its reason, and `synthetic` (the dataset
root's SYNTHETIC.json) when the images are data_pipeline.synthetic's stand-ins. The build fails with a
non-zero exit, and leaves no shards behind, when the rejected fraction exceeds
`--max-reject-fraction`. Identical inputs and seed give byte-identical shards.

The shard plan: shard k of a split holds the records at positions [k*S, (k+1)*S) of the split's
shuffled record list, S = `--shard-size`, less those rejected (so a shard may hold fewer than S
samples; one whose records were all rejected is not written, leaving a gap in the numbers). The plan
depends on the records and the seed only, never on what decoding finds, which is what lets a sliced
build write any shard without knowing the others. `--shard-bytes` is a cap, not a boundary: a shard
that would grow past it stops the build with an error asking for a smaller `--shard-size`. Sample
ids run 0..n-1 per split in shard order.

    python -m data_pipeline.build_shards --dataset csv --root data/mine --out shards/mine \
        --csv labels.csv --path-column file --label-column finding --label-sep '|' \
        --labels Effusion,Mass,Nodule --patient-column patient --split-column split --verify

`--dataset csv` reads any dataset described by one CSV table (see data_pipeline/adapters/csv.py);
images may be DICOM (windowing: data_pipeline/image_io.py, `--dicom-window C,W` to fix it).
`--verify` re-reads every shard after the build (`--verify-only`: of an existing `--out`) and
exits non-zero naming the shard and sample of any problem (data_pipeline/verify_shards.py). An
interrupted build resumes when the same command is run again (data_pipeline/build_state.py).

Sliced build (e.g. a SLURM array job, one slice per task; data_pipeline/slices.py):

    python -m data_pipeline.build_shards <the usual options> --num-slices N --slice I   # I = 0..N-1
    python -m data_pipeline.build_shards --merge-slices N --out DIR [--verify]

Every slice computes the same plan; the shards of all splits, numbered in order (train's, then
val's, then test's), go round-robin to the slices: the g-th shard to slice g mod N. A slice writes
its shards under their final names into `--out` and its partial manifest to
`<out>/slices/slice-IIII-of-NNNN.json`; a rerun resumes or, when complete, does nothing. A slice
numbers a shard's samples from the position of its first record; the merge checks every slice
manifest and shard, gives the shards that follow a reject their final ids (0..n-1 per split; only
the 8-byte `.sid` members change), applies `--max-reject-fraction` to the whole, and writes
`manifest.json`: the shards and manifest equal a single-process build's with the same options,
timing fields aside.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from data_pipeline.cli import add_debug_flag, fail, run_cli
from data_pipeline import slices
from data_pipeline.adapters import SPLITS, load_dataset
from data_pipeline.build_plan import (SLICES_DIR, ShardResult, adapter_options, build_parameters,
                                      make_pool, manifest_head, plan_end, plan_shards, split_entry,
                                      too_many_rejects, write_shards)
from data_pipeline.build_state import STATE_FILE, parameters_digest, start_or_resume
from data_pipeline.image_io import MissingDependency, parse_window
from data_pipeline.manifest import MANIFEST, make_manifest, split_warnings, write_manifest
from data_pipeline.shard_format import IMAGE_EXT


def build(args) -> dict:
    out = Path(args.out)
    if (out / MANIFEST).exists() and not args.overwrite:
        raise SystemExit(f"error: {out / MANIFEST} exists; pass --overwrite to rebuild")
    index = load_dataset(args.dataset, Path(args.root), **adapter_options(args))
    out.mkdir(parents=True, exist_ok=True)
    n_inputs = len(index.records) + len(index.rejected)
    state = start_or_resume(out, parameters_digest(build_parameters(args), index), index.rejected,
                            overwrite=args.overwrite, quiet=args.quiet)
    shutil.rmtree(out / SLICES_DIR, ignore_errors=True)  # a single-process build owns all of `out`
    index.rejected = state.rejected  # adapter rejects, plus image rejects of a resumed build so far
    kept = sum(shard["samples"] for shard in state.kept_shards())
    plan = plan_shards(index, args.seed, args.shard_size)
    progress = {s: state.progress(s, len(index.label_names)) for s in SPLITS if s not in state.done}
    for split, p in progress.items():
        if p.position not in {planned.start for planned in plan[split]} | {plan_end(plan[split])}:
            raise SystemExit(f"error: {out / STATE_FILE} resumes {split} at record {p.position}, "
                             f"which starts no shard; pass --overwrite to start the build over")
    todo = [planned for split in progress for planned in plan[split]
            if planned.start >= progress[split].position]

    def done(result: ShardResult) -> None:
        planned, p = result.planned, progress[result.planned.split]
        state.rejected.extend({"input": r["input"], "reason": r["reason"]} for r in result.rejected)
        if result.entry is not None:
            p.shards.append(result.entry)
        p.sid += result.entry["samples"] if result.entry else 0
        p.positives += result.positives
        p.patients |= result.patients
        p.position = planned.end
        if planned is plan[planned.split][-1]:
            state.finish(planned.split, split_entry(p, index.label_names))
        else:
            state.checkpoint(planned.split, p)

    t0 = time.perf_counter()
    pool = make_pool(args)
    try:
        write_shards(todo, lambda planned: progress[planned.split].sid, out, index, args, pool, done)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)  # after an error, do not decode the rest first
    for split in progress:  # splits without records
        if split not in state.done:
            state.finish(split, split_entry(progress[split], index.label_names))
    splits = {s: state.done[s] for s in SPLITS}
    seconds = time.perf_counter() - t0
    n_ok = sum(s["samples"] for s in splits.values())
    error = too_many_rejects(out, index.rejected, n_inputs, n_ok, args.max_reject_fraction)
    if error:
        state.remove()
        raise SystemExit(error)
    manifest = make_manifest(manifest_head(index, args), splits, {
        "inputs": n_inputs, "accepted": n_ok, "rejected": len(index.rejected),
        "seconds": round(seconds, 2), "images_per_second": round((n_ok - kept) / seconds, 1)},
        index.rejected)
    write_manifest(out, manifest)
    state.remove()  # the manifest marks the build complete
    return manifest


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _window(text: str) -> tuple[float, float]:
    try:
        return parse_window(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _delimiter(text: str) -> str:
    text = {"\\t": "\t", "tab": "\t"}.get(text, text)
    if len(text) != 1:
        raise argparse.ArgumentTypeError(f"delimiter must be one character (or 'tab'), got {text!r}")
    return text


CSV_FLAGS = ("csv", "label_columns", "label_column", "label_sep", "patient_column", "split_column",
             "labels", "negative_label")


def parse_args(argv=None):
    paragraphs = __doc__.split("\n\n")
    rules = [t for t in paragraphs if t.startswith("The shard plan:")]
    rules += paragraphs[next(i for i, t in enumerate(paragraphs) if t.startswith("Sliced build")):]
    p = argparse.ArgumentParser(description=paragraphs[0], epilog="\n\n".join(rules),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=["chestxray14", "fetal_planes", "csv"])
    p.add_argument("--root", help="dataset directory in its original layout")
    p.add_argument("--out", required=True, help="output directory for shards and manifest.json")
    p.add_argument("--size", type=int, default=256, help="output side in pixels")
    p.add_argument("--fit", choices=["pad", "crop", "stretch"], default="pad")
    p.add_argument("--format", choices=list(IMAGE_EXT), default="png")
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--shard-size", type=int, default=1000,
                   help="records per shard (a shard holds them less its rejects)")
    p.add_argument("--shard-bytes", type=int, default=1 << 30,
                   help="max bytes per shard: a shard that would grow past it stops the build")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--seed", type=int, default=0, help="shuffle and validation-carving seed")
    p.add_argument("--val-fraction", type=float, default=0.1, help="of train patients, by patient")
    p.add_argument("--max-reject-fraction", type=float,
                   help="of all inputs (default 0.01; with --merge-slices: the slices' value)")
    p.add_argument("--max-pixels", type=int, default=100_000_000)
    p.add_argument("--dicom-window", type=_window, metavar="CENTER,WIDTH",
                   help="DICOM window for every image, instead of each file's WindowCenter/Width")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild from scratch (without it, an interrupted build is resumed)")
    p.add_argument("--verify", action="store_true", help="re-read and check every shard after the build")
    p.add_argument("--verify-only", action="store_true", help="only check the shards already in --out")
    p.add_argument("--quiet", action="store_true")
    sl = p.add_argument_group("sliced build, e.g. one SLURM array task per slice (see below)")
    sl.add_argument("--num-slices", type=int, metavar="N", help="build only one slice of N ...")
    sl.add_argument("--slice", type=int, metavar="I", help="... this one, 0 <= I < N")
    sl.add_argument("--merge-slices", type=int, metavar="N",
                   help="merge the N finished slices in --out into manifest.json (needs only --out)")
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
    add_debug_flag(p)
    a = p.parse_args(argv)
    _check_slicing(p, a)
    if a.size < 16 or a.shard_size < 1 or a.workers < 1 or not 1 <= a.jpeg_quality <= 100:
        p.error("--size >= 16, --shard-size >= 1, --workers >= 1, 1 <= --jpeg-quality <= 100")
    if a.merge_slices is None and a.max_reject_fraction is None:
        a.max_reject_fraction = 0.01
    if a.merge_slices is None and not a.verify_only and (a.dataset is None or a.root is None):
        p.error("--dataset and --root are required (except with --verify-only)")
    used = [f"--{f.replace('_', '-')}" for f in CSV_FLAGS if getattr(a, f) is not None]
    if a.dataset == "csv" and a.csv is None:
        p.error("--dataset csv needs --csv FILE")
    if a.dataset not in ("csv", None) and used:
        p.error(f"{', '.join(used)} only apply to --dataset csv")
    return a


def _check_slicing(p: argparse.ArgumentParser, a) -> None:
    if (a.slice is None) != (a.num_slices is None):
        p.error("--slice I and --num-slices N go together")
    if a.num_slices is not None:
        if a.num_slices < 1 or not 0 <= a.slice < a.num_slices:
            p.error(f"--slice must be in 0..N-1 and --num-slices N >= 1, got --slice {a.slice} "
                    f"--num-slices {a.num_slices}")
        if a.verify or a.verify_only:
            p.error("--verify checks a whole build: pass it to --merge-slices, not to a slice")
    if a.merge_slices is not None:
        if a.merge_slices < 1:
            p.error(f"--merge-slices N needs N >= 1, got {a.merge_slices}")
        if a.slice is not None or a.verify_only:
            p.error("--merge-slices goes with neither --slice/--num-slices nor --verify-only")
        if (a.dataset is None) != (a.root is None):
            p.error("with --merge-slices, give both --dataset and --root (to check them against the "
                    "slices) or neither")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.slice is not None or args.merge_slices is not None:
        try:
            slices.build_slice(args) if args.slice is not None else slices.merge(args)
        except (FileNotFoundError, ValueError, MissingDependency) as e:
            fail(e, args.debug)
        return
    if not args.verify_only:
        try:
            m = build(args)
        except (FileNotFoundError, ValueError, MissingDependency) as e:
            fail(e, args.debug)
        s = m["summary"]
        counts = ", ".join(f"{k} {v['samples']} ({v['patients']} patients, {len(v['shards'])} shards)"
                           for k, v in m["splits"].items())
        print(f"{m['dataset']}: {s['accepted']} samples [{counts}], {s['rejected']} rejected, "
              f"{s['images_per_second']} img/s -> {Path(args.out) / MANIFEST}")
        for line in split_warnings(m):
            print(f"warning: {line}", file=sys.stderr)
    if args.verify or args.verify_only:
        from data_pipeline.verify_shards import verify_or_exit
        try:
            verify_or_exit(Path(args.out), args.quiet)
        except (FileNotFoundError, ValueError) as e:
            fail(e, args.debug)


if __name__ == "__main__":
    sys.exit(run_cli(main))
