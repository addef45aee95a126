"""The on-disk sample format shared by the shard builder and both loaders.

A sample `<key>` is a run of tar members with the same basename (WebDataset convention):

    <key>.png | <key>.jpg | <key>.raw   the image, 8-bit grayscale (raw: size*size uint8, no header)
    <key>.lbl                           label vector, `classes` uint8 bytes (multi-hot or one-hot)
    <key>.sid                           sample id, int64 little-endian, unique within the split
    <key>.json                          human-readable metadata: key, patient, label names

Why `.lbl`/`.sid` as raw bytes: DALI's webdataset reader returns a member's bytes as a uint8 (or
int64) tensor with no decoding step, so labels and ids reach the GPU for free, and the id lets
distributed evaluation drop the duplicates that `pad_last_batch` adds. Keys never contain dots,
because WebDataset and DALI split a member name at the first dot of its basename.

Tars are written deterministically (fixed mtime/uid/mode, fixed member order) to a temporary name
and renamed when complete, with a DALI index (`.idx`, format v1.2, as `wds2idx` writes) beside them.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from data_pipeline.disk import write_atomic

IMAGE_EXT = {"png": "png", "jpeg": "jpg", "raw": "raw"}
LABEL_EXT, ID_EXT, META_EXT = "lbl", "sid", "json"


def sample_members(key: str, image: bytes, image_ext: str, labels, sid: int, meta: dict):
    """The (name, bytes) members of one sample, in a fixed order."""
    if "." in key:
        raise ValueError(f"sample key {key!r} contains a dot; WebDataset/DALI would split it there")
    return [
        (f"{key}.{image_ext}", image),
        (f"{key}.{LABEL_EXT}", np.asarray(labels, dtype=np.uint8).tobytes()),
        (f"{key}.{ID_EXT}", encode_sid(sid)),
        (f"{key}.{META_EXT}", json.dumps(meta, sort_keys=True).encode()),
    ]


class ShardWriter:
    """Writes one tar atomically: members go to `<name>.tar.part`, renamed on `close()`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".part")
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.GNU_FORMAT)
        self.samples = 0

    def write(self, members) -> None:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self.tar.addfile(info, io.BytesIO(data))
        self.samples += 1

    def close(self) -> dict:
        """Finish the tar, write its DALI index, rename both into place; return the shard entry."""
        self.tar.close()
        idx = self.path.with_suffix(".idx")
        write_atomic(idx, dali_index(self.tmp))
        os.replace(self.tmp, self.path)
        return {"name": self.path.name, "index": idx.name, "samples": self.samples,
                "bytes": self.path.stat().st_size, "sha256": sha256_file(self.path)}

    def abort(self) -> None:
        """Drop the unfinished tar. Closing it may fail again (a full disk fails the final flush
        too): the part is removed whatever happens."""
        try:
            self.tar.close()
        except OSError:
            pass
        finally:
            self.tmp.unlink(missing_ok=True)


def dali_index(tar_path: Path) -> str:
    """DALI webdataset index (v1.2): one line per sample, `ext offset size name` per member."""
    samples: list[list[str]] = []
    last = None
    with tarfile.open(tar_path) as tar:
        for m in tar:
            if not m.isfile():
                continue
            base = os.path.basename(m.name)
            key, ext = base.split(".", 1)
            if key != last:
                samples.append([])
                last = key
            samples[-1].append(f"{ext} {m.offset_data} {m.size} {m.name}")
    return f"v1.2 {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_shard(path: Path):
    """Yield (key, {ext: bytes}) per sample, straight from the tar (tests, --verify)."""
    current, members = None, {}
    with tarfile.open(path) as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, ext = os.path.basename(m.name).split(".", 1)
            if key != current and current is not None:
                yield current, members
                members = {}
            current = key
            members[ext] = tar.extractfile(m).read()
    if current is not None:
        yield current, members


def decode_label(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


def label_problem(label: np.ndarray, n_classes: int, multilabel: bool) -> str | None:
    """Why a decoded label vector (uint8) cannot be trained on, or None."""
    if label.shape != (n_classes,):
        return f"label vector has {label.size} entries, expected {n_classes}"
    if label.max(initial=0) > 1 or (not multilabel and int(label.sum()) != 1):
        return f"label vector {label.tolist()} is not {'multi-hot (0/1)' if multilabel else 'one-hot'}"
    return None


def encode_sid(sid: int) -> bytes:
    return np.int64(sid).astype("<i8").tobytes()


def decode_sid(data: bytes) -> int:
    return int(np.frombuffer(data, dtype="<i8")[0])


def sid_offsets(tar_path: Path) -> list[int]:
    """Byte offsets of the `.sid` members' data in a shard, in sample order (a sliced build's merge
    rewrites these 8 bytes in place; nothing else, not even the DALI index, changes)."""
    with tarfile.open(tar_path) as tar:
        members = [m for m in tar if m.isfile() and m.name.endswith(f".{ID_EXT}")]
    if any(m.size != 8 for m in members):
        raise ValueError(f"{Path(tar_path).name}: a .{ID_EXT} member is not 8 bytes")
    return [m.offset_data for m in members]
