"""Check a built shard directory against its manifest (`build_shards --verify` / `--verify-only`).

For every shard `manifest.json` lists: the tar exists with the recorded size and sha256; its DALI
index equals the one computed from the tar; every sample has exactly the image, `.lbl`, `.sid` and
`.json` members; the image decodes (8-bit grayscale, the manifest's size); the label vector has one
byte per class, each 0 or 1 (exactly one 1 when single-label); the json names the same key and
split. Per split: sample ids run 0..n-1 in shard order (unique and contiguous, which distributed
evaluation's de-duplication relies on), keys are unique across the directory, and the sample,
patient and positive counts equal the manifest's.

Every problem is collected (one damaged shard does not hide another) and names its shard and, where
it can, its sample.
"""
from __future__ import annotations

import io
import json
import re
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_pipeline.manifest import read_manifest
from data_pipeline.shard_format import (ID_EXT, LABEL_EXT, META_EXT, dali_index, decode_label,
                                        decode_sid, label_problem, read_shard, sha256_file)

PIL_FORMAT = {"png": "PNG", "jpg": "JPEG"}


@dataclass(frozen=True)
class Problem:
    shard: str
    sample: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.shard}: sample {self.sample}: {self.message}" if self.sample else \
            f"{self.shard}: {self.message}"


def decode_error(e: Exception) -> str:
    """PIL's reason an image does not decode, without the in-memory buffer's repr it names."""
    if isinstance(e, UnidentifiedImageError):
        return "PIL cannot identify the image format (the header is damaged or not an image)"
    return re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the member", str(e)) or type(e).__name__


def _image_problem(data: bytes, ext: str, size: int) -> str | None:
    if ext == "raw":
        ok = len(data) == size * size
        return None if ok else f"raw image has {len(data)} bytes, expected {size * size}"
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # PIL raises many types for damaged data
        return f"image does not decode: {decode_error(e)}"
    if img.format != PIL_FORMAT[ext] or img.mode != "L" or img.size != (size, size):
        return f"image is {img.format} {img.mode} {img.size}, expected {PIL_FORMAT[ext]} L ({size}, {size})"
    return None


def sample_problems(key: str, members: dict, ext: str, size: int, n_classes: int,
                     multilabel: bool, split: str) -> list[str]:
    expected = {ext, LABEL_EXT, ID_EXT, META_EXT}
    if set(members) != expected:
        return [f"members {sorted(members)}, expected {sorted(expected)}"]
    found = [_image_problem(members[ext], ext, size)]
    found.append(label_problem(decode_label(members[LABEL_EXT]), n_classes, multilabel))
    if len(members[ID_EXT]) != 8:
        found.append(f".sid has {len(members[ID_EXT])} bytes, expected 8")
    try:
        meta = json.loads(members[META_EXT])
        if meta.get("key") != key or meta.get("split") != split:
            found.append(f"json names key {meta.get('key')!r} split {meta.get('split')!r}")
    except (ValueError, AttributeError) as e:
        found.append(f"json does not parse: {e}")
    return [p for p in found if p]


def _check_shard(shard_dir: Path, shard: dict, split: str, first_sid: int, manifest: dict,
                 keys: set, totals: dict) -> list[Problem]:
    name, problems = shard["name"], []
    path, idx = shard_dir / name, shard_dir / shard["index"]
    if not path.is_file():
        return [Problem(name, None, "shard file is missing")]
    if path.stat().st_size != shard["bytes"]:
        problems.append(Problem(name, None, f"{path.stat().st_size} bytes, manifest says {shard['bytes']}"))
    if sha256_file(path) != shard["sha256"]:
        problems.append(Problem(name, None, "sha256 differs from the manifest (file changed or damaged)"))
    try:
        if not idx.is_file():
            problems.append(Problem(name, None, f"DALI index {shard['index']} is missing"))
        elif idx.read_text() != dali_index(path):
            problems.append(Problem(name, None, f"DALI index {shard['index']} does not match the tar"))
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        problems.append(Problem(name, None, f"cannot index the tar: {e}"))
    image, n, key = manifest["image"], 0, None
    try:
        for key, members in read_shard(path):
            expected_sid = first_sid + n
            for p in sample_problems(key, members, image["ext"], image["size"],
                                      len(manifest["label_names"]), manifest["multilabel"], split):
                problems.append(Problem(name, key, p))
            if len(members.get(ID_EXT, b"")) == 8 and decode_sid(members[ID_EXT]) != expected_sid:
                problems.append(Problem(name, key, f"sample id {decode_sid(members[ID_EXT])}, expected "
                                                   f"{expected_sid} (ids run 0..n-1 per split)"))
            if key in keys:
                problems.append(Problem(name, key, "duplicate sample key"))
            keys.add(key)
            if LABEL_EXT in members and len(members[LABEL_EXT]) == len(manifest["label_names"]):
                totals["positives"] += decode_label(members[LABEL_EXT])
            try:
                totals["patients"].add(json.loads(members[META_EXT])["patient"])
            except (KeyError, ValueError, TypeError):
                pass
            n += 1
    except (tarfile.TarError, OSError, ValueError, EOFError) as e:
        problems.append(Problem(name, key, f"tar unreadable after {n} samples: {e}"))
    if n != shard["samples"]:
        problems.append(Problem(name, None, f"{n} samples, manifest says {shard['samples']}"))
    return problems


def verify(shard_dir, manifest: dict | None = None) -> tuple[dict, list[Problem]]:
    """(summary, problems) of one shard directory; no problems means it is sound. `manifest`:
    check against this one instead of the directory's manifest.json (a merge before writing it)."""
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir) if manifest is None else manifest
    problems, keys, summary = [], set(), {"splits": {}, "shards": 0, "samples": 0}
    for split, entry in manifest["splits"].items():
        totals = {"positives": np.zeros(len(manifest["label_names"]), np.int64), "patients": set()}
        sid, found = 0, []
        for shard in entry["shards"]:
            found += _check_shard(shard_dir, shard, split, sid, manifest, keys, totals)
            sid += shard["samples"]
        where = f"split {split}"
        if not any(p.message == "shard file is missing" for p in found):  # else totals repeat it
            if sid != entry["samples"]:
                found.append(Problem(where, None, f"shards hold {sid} samples, manifest says "
                                                  f"{entry['samples']}"))
            if dict(zip(manifest["label_names"], totals["positives"].tolist())) != entry["positives"]:
                found.append(Problem(where, None, "per-class positives differ from the manifest"))
            if len(totals["patients"]) != entry["patients"]:
                found.append(Problem(where, None, f"{len(totals['patients'])} patients, manifest "
                                                  f"says {entry['patients']}"))
        problems += found
        summary["splits"][split] = {"shards": len(entry["shards"]), "samples": entry["samples"]}
        summary["shards"] += len(entry["shards"])
        summary["samples"] += entry["samples"]
    listed = {s[k] for e in manifest["splits"].values() for s in e["shards"] for k in ("name", "index")}
    summary["unlisted"] = sorted(p.name for p in shard_dir.iterdir()
                                 if p.suffix in (".tar", ".idx") and p.name not in listed)
    return summary, problems


def verify_or_exit(out: Path, quiet: bool, manifest: dict | None = None, hint=None) -> None:
    """`verify(out)` for the CLI: print a summary, or exit non-zero naming every problem (and
    `hint(problems)`, what to do about them, when given)."""
    summary, problems = verify(out, manifest)
    if problems:
        for problem in problems[:50]:
            print(f"verify: {problem}", file=sys.stderr)
        more = " (first 50 listed)" if len(problems) > 50 else ""
        raise SystemExit(f"error: verification of {out} failed with {len(problems)} problem(s){more}; "
                         f"first: {problems[0]}{hint(problems) if hint else ''}")
    if summary["unlisted"]:
        print(f"verify: note: files not in the manifest: {', '.join(summary['unlisted'])}",
              file=sys.stderr)
    counts = ", ".join(f"{k} {v['samples']}" for k, v in summary["splits"].items())
    if not quiet:
        print(f"verified {out}: {summary['shards']} shards, {summary['samples']} samples [{counts}]: "
              f"checksums, DALI indices, images, labels and sample ids OK")
