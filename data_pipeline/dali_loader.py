"""NVIDIA DALI input pipeline over the project's WebDataset shards.

read (webdataset reader, per-rank shard, DALI index) -> decode (GPU: "mixed"; CPU-only mode:
"cpu") -> augment (train only) -> float CHW in [0, 1]. Each batch is a dict:

    image  (b, 1, s, s) float32 in [0, 1]    label  (b, C) float32    sid  (b,) int64

Why these choices (docs/design.md, "Library behaviour the code relies on"):
* `device_id=None` is DALI's CPU-only mode; then every op must be a CPU op, so the device of each
  op is chosen here from one flag rather than hard-coded.
* `pad_last_batch=True` with `reader_name` on the iterator and `LastBatchPolicy.FILL` gives every
  rank the same number of iterations (that of the largest shard): unequal counts hang ZeRO's
  collectives. The padding repeats the shard's last sample; evaluation drops the repeats by `sid`.
* The reader is given each shard's index so it does not scan every tar at start-up. It reads each
  sample at the offsets the index gives, so damaged samples to skip (`skip`) are left out of a
  copy of the index and never read (`_kept_indexes`).
* Labels and ids are read as raw uint8 / int64 members, no decoding (see `shard_format.py`).
* `random_shuffle` only mixes inside a buffer of `initial_fill` samples; the shard builder shuffled
  globally, and the shard a rank reads rotates with `epoch`, so the mix is good.
* One pipeline per epoch, seeded from (seed, epoch, rank): the data order of epoch e does not depend
  on how many epochs this process has run, which is what makes resuming exact.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_pipeline.loader_common import AugmentSpec, split_shards
from data_pipeline.read_checks import DamagedSample, first_damaged_sample, read_keyed_index
from data_pipeline.shard_format import label_problem


@dataclass
class DaliLoader:
    """Iterable of batches; `len()` is the per-rank number of iterations in one epoch.

    Labels stay on the host (the step moves them), so checking them costs no device sync. A
    damaged sample (a label that is not 0/1, an image the pipeline cannot decode) is a
    `DamagedSample` naming the shard and the sample key: the pipeline's own error names neither,
    so on a pipeline failure the rank's shards are re-read to find it."""
    iterator: object
    batches_per_epoch: int
    tars: list = field(default_factory=list)
    manifest: dict = field(default_factory=dict)
    split: str = ""
    skip: frozenset = frozenset()

    def __iter__(self):
        classes, multilabel = len(self.manifest["label_names"]), self.manifest["multilabel"]
        batches = iter(self.iterator)
        while True:
            try:
                out = next(batches)
            except StopIteration:
                break
            except Exception as e:  # DALI raises RuntimeError with the C++ stack in the message
                raise _damaged(e, self.tars, self.manifest, self.split, self.skip) from None
            b = out[0]
            labels = b["label"].numpy()
            if labels.shape[1:] != (classes,) or labels.max(initial=0) > 1 or \
                    (not multilabel and (labels.sum(axis=1) != 1).any()):
                raise DamagedSample(self._bad_label(labels, b["sid"].view(-1).tolist(), classes, multilabel))
            yield {"image": b["image"], "label": b["label"].float(), "sid": b["sid"].view(-1)}
        self.iterator.reset()

    def _bad_label(self, labels, sids, classes, multilabel) -> str:
        """The message for the first sample of a batch whose label vector cannot be trained on."""
        for row, sid in zip(labels, sids):
            why = label_problem(row, classes, multilabel)
            if why is None:
                continue
            first = 0  # sample ids run 0..n-1 over the split's shards, in order
            for tar, shard in zip(self.tars, self.manifest["splits"][self.split]["shards"]):
                if sid < first + shard["samples"]:
                    index = str(Path(tar).parent / shard["index"])
                    _, key, _ = read_keyed_index(tar, index)[sid - first]
                    return f"{tar}: sample {key}: {why}"
                first += shard["samples"]
            return f"split {self.split}: sample id {sid}: {why}"
        return f"split {self.split}: a batch of labels has shape {tuple(labels.shape)}, expected (b, {classes})"

    def __len__(self) -> int:
        return self.batches_per_epoch


def build_dali_loader(shard_dir, split: str, *, batch_size: int, image_size: int, train: bool,
                      rank: int = 0, world_size: int = 1, device_id: int | None = None,
                      num_threads: int = 1, seed: int = 0, augment: AugmentSpec | None = None,
                      prefetch: int = 2, epoch: int = 0, skip: frozenset = frozenset()) -> DaliLoader:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    manifest, tars, idxs = split_shards(shard_dir, split)
    read_tars, read_idxs = _kept_indexes(tars, idxs, skip) if skip else (tars, idxs)
    ext = manifest["image"]["ext"]
    stored = manifest["image"]["size"]
    aug = augment if (train and augment is not None) else AugmentSpec.none()
    gpu = device_id is not None
    reader_seed = (seed * 1_000_003 + epoch) % (2 ** 31)

    @pipeline_def(enable_conditionals=False)
    def pipe():
        raw, label, sid = fn.readers.webdataset(
            paths=read_tars, index_paths=read_idxs, ext=[ext, "lbl", "sid"],
            dtypes=[types.UINT8, types.UINT8, types.INT64], missing_component_behavior="error",
            shard_id=(rank + epoch) % world_size, num_shards=world_size, random_shuffle=train,
            initial_fill=1024, stick_to_shard=True,
            pad_last_batch=True, seed=reader_seed, name="reader")
        if ext == "raw":
            img = fn.reshape(raw, shape=[stored, stored, 1], layout="HWC")
            img = img.gpu() if gpu else img
        else:
            img = fn.decoders.image(raw, device="mixed" if gpu else "cpu", output_type=types.GRAY)
        if aug.crop_scale[0] < 1.0:
            img = fn.random_resized_crop(img, size=[image_size, image_size],
                                         random_area=list(aug.crop_scale), random_aspect_ratio=[0.9, 1.1],
                                         antialias=True)
        elif image_size != stored:
            img = fn.resize(img, size=[image_size, image_size], antialias=True)
        if aug.rotate_degrees > 0:
            angle = fn.random.uniform(range=[-aug.rotate_degrees, aug.rotate_degrees])
            img = fn.rotate(img, angle=angle, keep_size=True, fill_value=0)
        if aug.brightness > 0 or aug.contrast > 0:
            img = fn.brightness_contrast(
                img, brightness=fn.random.uniform(range=[1 - aug.brightness, 1 + aug.brightness]),
                contrast=fn.random.uniform(range=[1 - aug.contrast, 1 + aug.contrast]))
        mirror = fn.random.coin_flip(probability=aug.hflip) if aug.hflip > 0 else 0
        img = fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="CHW",
                                       mean=[0.0], std=[255.0], mirror=mirror)
        return img, label, sid  # labels stay on the host: DaliLoader checks them

    p = pipe(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
             seed=(reader_seed * 7919 + rank) % (2 ** 31), prefetch_queue_depth=prefetch, exec_dynamic=True)
    p.build()
    try:  # the iterator runs the pipeline at once (prefetch): a damaged first batch fails here
        it = DALIGenericIterator([p], ["image", "label", "sid"], reader_name="reader",
                                 last_batch_policy=LastBatchPolicy.FILL, auto_reset=False)
    except Exception as e:
        raise _damaged(e, tars, manifest, split, skip) from None
    return DaliLoader(it, len(it), tars, manifest, split, skip)


_KEPT_DIR: list[Path] = []  # this process's directory of filtered index copies, removed at exit
_KEPT: dict = {}  # (index, skip) -> the copy's path, or None when the shard keeps no sample


def _kept_indexes(tars, idxs, skip: frozenset) -> tuple[list, list]:
    """(tars, index paths) with copies of the indexes that leave out the samples whose keys are in
    `skip` (a shard left with no sample is dropped); written once per process."""
    if not _KEPT_DIR:
        _KEPT_DIR.append(Path(tempfile.mkdtemp(prefix="rms-dali-kept-")))
        atexit.register(shutil.rmtree, _KEPT_DIR[0], True)
    out_tars, out_idxs = [], []
    for tar, idx in zip(tars, idxs):
        if (idx, skip) not in _KEPT:
            lines = Path(idx).read_text().splitlines()[1:]
            kept = [ln for ln, (_, key, _) in zip(lines, read_keyed_index(tar, idx)) if key not in skip]
            copy = _KEPT_DIR[0] / f"{len(_KEPT):05d}-{Path(idx).name}"
            if kept:
                copy.write_text(f"v1.2 {len(kept)}\n" + "".join(ln + "\n" for ln in kept))
            _KEPT[idx, skip] = copy if kept else None
        if _KEPT[idx, skip] is not None:
            out_tars.append(tar)
            out_idxs.append(str(_KEPT[idx, skip]))
    if not out_tars:
        raise ValueError(f"every sample of {', '.join(tars)} is damaged: nothing is left to read")
    return out_tars, out_idxs


def _damaged(error: Exception, tars, manifest: dict, split: str, skip: frozenset = frozenset()) -> Exception:
    """A pipeline failure as a DamagedSample naming the shard and sample behind it (found by
    re-reading the shards, passing over those skipped), or the original error when every sample reads."""
    found = first_damaged_sample(tars, manifest, split, skip)
    if found is None:
        return error
    lines = [ln.strip() for ln in str(error).splitlines()
             if ln.strip() and "no longer valid" not in ln and "Critical error" not in ln]
    return DamagedSample(f"{found} (DALI: {lines[-1][:200] if lines else type(error).__name__})")


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
        return True
    except Exception:  # ImportError, or a CUDA library mismatch on import
        return False


def default_device_id(local_rank: int) -> int | None:
    """The GPU of this rank, or None (DALI's CPU-only mode) when there is none."""
    return local_rank if torch.cuda.is_available() else None
