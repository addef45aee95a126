"""Sliced shard builds: one slice per SLURM array task, then one merge.

    python -m data_pipeline.build_shards <the usual options> --num-slices N --slice I
    python -m data_pipeline.build_shards --merge-slices N --out DIR [--verify]

Every slice loads the dataset and computes the same shard plan (`plan_shards`: fixed ranges of
`--shard-size` records of each split's shuffled list, which depend on the records and the seed only).
The shards of all splits, numbered in order (train's, then val's, then test's), go round-robin to
the slices: the g-th to slice g mod N, so slices differ by at most one shard. A slice writes its
shards under their final names into `--out`, leaves every other file alone, and writes its partial
manifest atomically to `<out>/slices/slice-IIII-of-NNNN.json`: the build's fingerprint (the resume
digest of build_state.py: output options + the adapter's records and rejects), its options, the
manifest fields shared by all slices, the adapter's rejects, and per shard its entry (sha256,
samples), its image rejects with their positions, positives and patients. While it runs it keeps a
per-shard checkpoint beside it (`slice-IIII-of-NNNN.state.json`): rerun after a crash, it keeps the
shards it had closed and builds the rest; rerun after it finished, it checks its shards and does
nothing (or rebuilds itself if one is damaged), so resubmitting a whole array job is cheap.

A slice cannot know how many samples the other slices reject before its shards, so it numbers its
samples from the position of its shard's first record. The merge gives every shard its final ids
(0..n-1 per split in shard order, as a single-process build has them) by rewriting the 8-byte `.sid`
members of the shards that follow a reject; sizes, offsets and DALI indices do not change. Without
rejects no shard is rewritten. The merge applies `--max-reject-fraction` (the slices' value unless
given) to the whole build, reads every shard to check it against the sha256 its slice recorded (the
ids aside, so a merge that was interrupted can be rerun), and changes nothing unless all pass; then
it renumbers, optionally verifies everything (`--verify`, before manifest.json exists), writes
manifest.json atomically and removes `slices/`. The result equals a single-process build with the
same options, byte for byte, manifest included, apart from the timing fields (`summary.seconds`:
the slowest slice's; `summary.images_per_second`: all slices' images over that).

The fingerprint includes the resolved `--root` and every record's path, so all slices must see the
dataset under the same path (as on a cluster's shared file system).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

from data_pipeline.adapters import SPLITS, load_dataset
from data_pipeline.build_plan import (SLICES_DIR, PlannedShard, ShardResult, adapter_options,
                                      build_parameters, make_pool, manifest_head, plan_shards,
                                      too_many_rejects, write_shards)
from data_pipeline.build_state import (STATE_FILE, clean_out, parameters_digest, read_checkpoint,
                                       shards_problem)
from data_pipeline.manifest import MANIFEST, make_manifest, split_warnings, write_manifest
from data_pipeline.shard_format import encode_sid, sid_offsets

SLICE_VERSION = 1


def slice_file(i: int, n: int) -> str:
    return f"slice-{i:04d}-of-{n:04d}.json"


def state_file(i: int, n: int) -> str:
    return f"slice-{i:04d}-of-{n:04d}.state.json"


def assigned(plan: dict[str, list[PlannedShard]], i: int, n: int) -> list[PlannedShard]:
    """Slice i's shards: the g-th shard of the whole build (train's, val's, test's) for g % n == i."""
    return [planned for split in SPLITS for planned in plan[split]][i::n]


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _kept(results: list[dict]) -> list[dict]:
    return [r["shard"] for r in results if r["shard"] is not None]


# ------------------------------------------------------------------------------ one slice
class SliceState:
    """A slice's checkpoint: the results of the shards it has closed, saved after each."""

    def __init__(self, path: Path, digest: str, results: list[dict]):
        self.path, self.digest, self.results, self.new = path, digest, results, []

    def add(self, result: ShardResult) -> None:
        p = result.planned
        self.new.append({"split": p.split, "number": p.number, "start": p.start,
                         "records": len(p.records), "first_sid": result.first_sid,
                         "shard": result.entry, "rejected": result.rejected,
                         "positives": result.positives.tolist(),
                         "patients": sorted(result.patients)})
        self.results.append(self.new[-1])
        _write_json(self.path, {"version": SLICE_VERSION, "params_sha256": self.digest,
                                "results": self.results})


def _resume(out: Path, path: Path, digest: str, where: str, overwrite: bool, quiet: bool) -> list:
    """The results kept from an interrupted run of this slice ([] when starting afresh)."""
    if not path.exists() or overwrite:
        return []
    d = read_checkpoint(path, SLICE_VERSION, digest, where)
    problem = shards_problem(out, _kept(d["results"]))
    if problem:
        print(f"resume: {problem}; building {where} from scratch", file=sys.stderr)
        return []
    if not quiet:
        print(f"resume: keeping {len(d['results'])} shard(s) of {where}", file=sys.stderr)
    return d["results"]


def _finished(out: Path, path: Path, digest: str, where: str) -> dict | None:
    """The slice manifest when this slice is already built, intact, by the same build; else None."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"{path}: unreadable ({e}); rebuilding {where}", file=sys.stderr)
        return None
    if d.get("fingerprint") != digest:
        raise SystemExit(f"error: {path}: {where} was built with different options or inputs; "
                         f"rerun it with the original options, or pass --overwrite to rebuild it")
    for r in d["results"]:  # ids renumbered by a merge are fine (the next merge checks them)
        problem = r["shard"] and check_shard(out, r["shard"], r["first_sid"], r["first_sid"])[0]
        if problem:
            print(f"{path.name}: {r['shard']['name']}: {problem}; rebuilding {where}",
                  file=sys.stderr)
            return None
    return d


def build_slice(args) -> dict:
    """`--num-slices N --slice I`: write slice I's shards and its partial manifest."""
    out, i, n = Path(args.out), args.slice, args.num_slices
    where = f"slice {i} of {n}"
    if (out / MANIFEST).exists() and not args.overwrite:
        raise SystemExit(f"error: {out / MANIFEST} exists (the build is complete); pass --overwrite "
                         f"to rebuild")
    index = load_dataset(args.dataset, Path(args.root), **adapter_options(args))
    params = build_parameters(args)
    digest = parameters_digest(params, index)
    plan = plan_shards(index, args.seed, args.shard_size)
    mine = assigned(plan, i, n)
    sdir = out / SLICES_DIR
    sdir.mkdir(parents=True, exist_ok=True)
    path = sdir / slice_file(i, n)
    if path.exists() and not args.overwrite:
        done = _finished(out, path, digest, where)
        if done is not None:
            print(f"{where}: already built ({path}); nothing to do")
            return done
    path.unlink(missing_ok=True)  # from here on the slice is unfinished
    (out / MANIFEST).unlink(missing_ok=True)
    state = SliceState(sdir / state_file(i, n), digest,
                       _resume(out, sdir / state_file(i, n), digest, where, args.overwrite,
                               args.quiet))
    if not state.results:
        state.path.unlink(missing_ok=True)  # an old checkpoint must not outlive a fresh start
    owned = {name for p in mine for name in (p.name, Path(p.name).with_suffix(".idx").name)}
    clean_out(out, _kept(state.results), owned)
    done_keys = {(r["split"], r["number"]) for r in state.results}
    todo = [p for p in mine if (p.split, p.number) not in done_keys]
    t0 = time.perf_counter()
    pool = make_pool(args)
    try:
        write_shards(todo, lambda planned: planned.start, out, index, args, pool, state.add,
                     desc=f"slice {i}/{n}")
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    order = {(p.split, p.number): k for k, p in enumerate(mine)}
    results = sorted(state.results, key=lambda r: order[(r["split"], r["number"])])
    manifest = {
        "version": SLICE_VERSION, "slice": i, "num_slices": n, "fingerprint": digest,
        "parameters": params, "max_reject_fraction": args.max_reject_fraction,
        "inputs": len(index.records) + len(index.rejected),
        "shards_per_split": {s: len(plan[s]) for s in SPLITS},
        "head": manifest_head(index, args), "adapter_rejected": index.rejected,
        "seconds": round(time.perf_counter() - t0, 2),
        "written": sum(r["shard"]["samples"] for r in state.new if r["shard"]),
        "results": results,
    }
    _write_json(path, manifest)
    state.path.unlink(missing_ok=True)
    samples = sum(r["shard"]["samples"] for r in results if r["shard"])
    print(f"{where}: {len(_kept(results))} shards, {samples} samples, "
          f"{sum(len(r['rejected']) for r in results)} rejected -> {path}")
    return manifest


# ------------------------------------------------------------------------------ merge
def _read_slices(sdir: Path, n: int) -> list[dict]:
    slices, bad = [], []
    for i in range(n):
        path = sdir / slice_file(i, n)
        try:
            d = json.loads(path.read_text())
            if (d.get("version"), d.get("slice"), d.get("num_slices")) != (SLICE_VERSION, i, n):
                raise ValueError(f"not slice {i} of {n} (version {SLICE_VERSION})")
            slices.append(d)
        except FileNotFoundError:
            running = (sdir / state_file(i, n)).exists()
            bad.append((i, f"{path} is missing" + (f" ({state_file(i, n)} is there: the task was "
                                                    f"interrupted or is still running)" if running
                                                    else "")))
        except (OSError, ValueError) as e:
            bad.append((i, f"{path} is unreadable ({e})"))
    if bad:
        others = sorted({int(m.group(1)) for f in sdir.glob("slice-*-of-*.json")
                         if (m := re.fullmatch(r"slice-\d+-of-(\d+)\.json", f.name))} - {n})
        hint = "".join(f" ({sdir} holds slice files of a {m}-slice build: --merge-slices {m}?)"
                       for m in others)
        tasks = ",".join(str(i) for i, _ in bad)
        raise SystemExit(f"error: {len(bad)} of {n} slices not finished: "
                         + "; ".join(why for _, why in bad)
                         + f". Rerun array task(s) {tasks} (--num-slices {n} --slice I, same "
                           f"options), then merge again{hint}")
    return slices


def _flat(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        flat.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return flat


def _differences(a: dict, b: dict) -> str:
    fa, fb = _flat(a), _flat(b)
    return ", ".join(f"{k}: {fa.get(k)!r} vs {fb.get(k)!r}" for k in sorted(set(fa) | set(fb))
                     if fa.get(k) != fb.get(k))


def _check_one_build(sdir: Path, n: int, slices: list[dict], args) -> None:
    ref = slices[0]
    for i, d in enumerate(slices[1:], start=1):
        a = {**ref["parameters"], "max_reject_fraction": ref["max_reject_fraction"]}
        b = {**d["parameters"], "max_reject_fraction": d["max_reject_fraction"]}
        if d["fingerprint"] != ref["fingerprint"] or a != b:
            why = _differences(a, b) or "same options, but the dataset's records differ"
            raise SystemExit(f"error: {sdir / slice_file(0, n)} and {sdir / slice_file(i, n)} "
                             f"come from different builds ({why}); rebuild the odd slice(s) with "
                             f"the options of the others and --overwrite, then merge again")
    if args.dataset is not None:  # the merge command was given the build's options: check them
        why = _differences(ref["parameters"], build_parameters(args))
        if why:
            raise SystemExit(f"error: the slices in {sdir} were built with other options than "
                             f"this command's ({why})")


def _stream(path: Path, offsets: list[int], provisional: int, final: int, dest=None):
    """(sha256 with the ids provisional.., sha256 with the ids final.., whether the file's ids
    differ from final..) of a shard whose `.sid` members sit at `offsets`; `dest`: also write the
    file with the final ids there."""
    as_built, as_final, changed = hashlib.sha256(), hashlib.sha256(), False
    with open(path, "rb") as f:
        position = 0
        for k, offset in enumerate(offsets + [None]):
            data = f.read() if offset is None else f.read(offset - position)
            as_built.update(data)
            as_final.update(data)
            if dest:
                dest.write(data)
            if offset is None:
                break
            want = encode_sid(final + k)
            changed |= f.read(8) != want
            as_built.update(encode_sid(provisional + k))
            as_final.update(want)
            if dest:
                dest.write(want)
            position = offset + 8
    return as_built.hexdigest(), as_final.hexdigest(), changed


def check_shard(out: Path, entry: dict, provisional: int, final: int):
    """(problem or None, sha256 with the final ids, whether the ids must be rewritten) of a shard
    its slice recorded as `entry` with ids from `provisional`. Only the 8 id bytes of each sample
    may differ from what the slice wrote, so a shard renumbered by an earlier (interrupted or
    failed) merge still passes."""
    path = out / entry["name"]
    if not path.is_file():
        return "missing", None, False
    if path.stat().st_size != entry["bytes"]:
        return f"{path.stat().st_size} bytes, its slice recorded {entry['bytes']}", None, False
    try:
        offsets = sid_offsets(path)
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        return f"unreadable tar ({e})", None, False
    if len(offsets) != entry["samples"]:
        return f"{len(offsets)} samples, its slice recorded {entry['samples']}", None, False
    as_built, as_final, changed = _stream(path, offsets, provisional, final)
    if as_built != entry["sha256"]:
        return "does not match the sha256 its slice recorded", None, False
    return None, as_final, changed


def renumber(out: Path, entry: dict, provisional: int, final: int) -> None:
    """Give a checked shard's samples the ids final, final + 1, ... (atomically)."""
    path = out / entry["name"]
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as dest:
        _stream(path, sid_offsets(path), provisional, final, dest)
    os.replace(tmp, path)


def merge(args) -> dict:
    """`--merge-slices N`: check the N slices of `--out` and write its manifest.json."""
    out, n = Path(args.out), args.merge_slices
    sdir = out / SLICES_DIR
    if not sdir.is_dir():
        if (out / MANIFEST).is_file():
            raise SystemExit(f"error: nothing to merge: {sdir} does not exist and {out / MANIFEST} "
                             f"does (the build is complete, or merged already)")
        raise SystemExit(f"error: nothing to merge: {sdir} does not exist; build the slices first "
                         f"(--num-slices {n} --slice I for I = 0..{n - 1})")
    slices = _read_slices(sdir, n)
    _check_one_build(sdir, n, slices, args)
    ref = slices[0]
    label_names = ref["head"]["label_names"]
    by_split = {s: [None] * ref["shards_per_split"][s] for s in SPLITS}
    for i, d in enumerate(slices):
        for r in d["results"]:
            if not 0 <= r["number"] < len(by_split[r["split"]]) or by_split[r["split"]][r["number"]]:
                raise SystemExit(f"error: {sdir / slice_file(i, n)} lists shard {r['split']} "
                                 f"{r['number']}, which is not its own; rebuild it with --overwrite")
            by_split[r["split"]][r["number"]] = (i, r)
    holes = [f"{s} {k}" for s in SPLITS for k, x in enumerate(by_split[s]) if x is None]
    if holes:
        raise SystemExit(f"error: no slice lists shard(s) {', '.join(holes[:5])}; rebuild the "
                         f"slices with --overwrite")
    rejected = list(ref["adapter_rejected"])
    splits, todo = {}, []
    for split in SPLITS:
        sid, positives, patients = 0, np.zeros(len(label_names), dtype=np.int64), set()
        for i, r in by_split[split]:
            rejected += [{"input": x["input"], "reason": x["reason"]} for x in r["rejected"]]
            positives += np.asarray(r["positives"], dtype=np.int64)
            patients |= set(r["patients"])
            if r["shard"] is not None:
                todo.append((split, i, r, sid))
                sid += r["shard"]["samples"]
        splits[split] = {"samples": sid, "patients": len(patients),
                         "positives": dict(zip(label_names, positives.tolist())), "shards": []}
    n_ok = sum(e["samples"] for e in splits.values())
    max_fraction = ref["max_reject_fraction"] if args.max_reject_fraction is None \
        else args.max_reject_fraction
    error = too_many_rejects(out, rejected, ref["inputs"], n_ok, max_fraction)
    if error:
        shutil.rmtree(sdir)
        raise SystemExit(error)
    problems, owner, rewrite = [], {}, []
    for split, i, r, first in todo:  # check everything before changing anything
        problem, sha, changed = check_shard(out, r["shard"], r["first_sid"], first)
        owner[r["shard"]["name"]] = i
        if problem:
            problems.append((i, f"{r['shard']['name']} (listed in {slice_file(i, n)}): {problem}"))
        else:
            splits[split]["shards"].append({**r["shard"], "sha256": sha})
            if changed:
                rewrite.append((r["shard"], r["first_sid"], first))
    if problems:
        tasks = ",".join(str(i) for i in sorted({i for i, _ in problems}))
        raise SystemExit(f"error: {len(problems)} shard(s) do not match their slice manifests: "
                         + "; ".join(p for _, p in problems[:10])
                         + f". Rerun array task(s) {tasks} (a rerun rebuilds what is damaged), "
                           f"then merge again")
    for entry, provisional, first in rewrite:
        renumber(out, entry, provisional, first)
    clean_out(out, [e for s in splits.values() for e in s["shards"]])  # stray files of other builds
    (out / STATE_FILE).unlink(missing_ok=True)  # a single-process build's checkpoint, now stale
    seconds = max(d["seconds"] for d in slices)
    summary = {"inputs": ref["inputs"], "accepted": n_ok, "rejected": len(rejected),
               "seconds": seconds,
               "images_per_second": round(sum(d["written"] for d in slices) / max(seconds, 1e-9), 1)}
    manifest = make_manifest(ref["head"], splits, summary, rejected)
    if args.verify:
        from data_pipeline.verify_shards import verify_or_exit

        def hint(found) -> str:
            tasks = sorted({owner[p.shard] for p in found if p.shard in owner})
            return (f". Rerun array task(s) {','.join(map(str, tasks))} with --overwrite, then merge "
                    f"again" if tasks else "")
        verify_or_exit(out, args.quiet, manifest, hint)
    write_manifest(out, manifest)
    shutil.rmtree(sdir)
    counts = ", ".join(f"{k} {v['samples']} ({v['patients']} patients, {len(v['shards'])} shards)"
                       for k, v in splits.items())
    print(f"{manifest['dataset']}: merged {n} slices: {n_ok} samples [{counts}], {len(rejected)} "
          f"rejected, {len(rewrite)} shard(s) renumbered -> {out / MANIFEST}")
    for line in split_warnings(manifest):
        print(f"warning: {line}", file=sys.stderr)
    return manifest
