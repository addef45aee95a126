"""Checkpoints: DeepSpeed's own (model, optimizer, scheduler, ZeRO partitions) plus our position.

Layout under the run directory:

    checkpoints/<stage>-e<epoch>-s<step>/   DeepSpeed checkpoint of the end of an epoch
    checkpoints/<stage>-e<epoch>b<batch>-s<step>/   ... inside an epoch (train.checkpoint_every_steps)
    checkpoints/<tag>/files.json            every file of the tag with its size and sha256, written last
    checkpoints/latest                      DeepSpeed's pointer to the newest tag it saved
    stages/<stage>/model.pt                 student (+ adapters) at the end of a stage: next stage's start
    final/model.pt                          the deployable student with its metadata

A tag is complete when its `files.json` exists and every file it lists has the recorded size and
sha256. A save killed half-way leaves a tag without one; a file damaged later (a truncated model
states file, a flipped byte) fails the check. `--resume auto` takes the newest complete tag and
says which newer ones it passed over and why; an explicit `--resume TAG` that fails the check is
an error naming the file. Only the newest `keep` checkpoints are kept.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from data_pipeline.disk import DiskFull, disk_full, out_of_space
from data_pipeline.shard_format import sha256_file
from launcher.dist import average_batchnorm_stats, barrier

TAG = re.compile(r"^(?P<stage>[\w-]+?)-e(?P<epoch>\d{4})(b(?P<batch>\d{5}))?-s(?P<step>\d{8})$")
FILES = "files.json"  # in a tag directory: the checkpoint's files, sizes and checksums; written last


class CheckpointDamaged(RuntimeError):
    """A checkpoint tag that is incomplete or whose files differ from its files.json."""


def write_file_manifest(tag_dir: Path) -> None:
    """Record every file of a saved tag (size, sha256) in files.json, atomically: the mark that
    the checkpoint is complete."""
    files = {str(f.relative_to(tag_dir)): {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
             for f in sorted(tag_dir.rglob("*")) if f.is_file() and f.name != FILES
             and not f.name.endswith(".part")}
    tmp = tag_dir / (FILES + ".part")
    with open(tmp, "w") as fh:
        json.dump({"tag": tag_dir.name, "files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, tag_dir / FILES)


def check_complete(tag_dir: Path) -> None:
    """Raise CheckpointDamaged naming the first file (or the missing files.json) that is wrong."""
    listing = tag_dir / FILES
    if not listing.is_file():
        raise CheckpointDamaged(f"{tag_dir}: incomplete checkpoint, no {FILES} (the save did not "
                                f"finish)")
    try:
        files = json.loads(listing.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointDamaged(f"{listing}: unreadable ({e})") from None
    for rel, want in files.items():
        f = tag_dir / rel
        if not f.is_file():
            raise CheckpointDamaged(f"{f}: missing (listed in {FILES})")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise CheckpointDamaged(f"{f}: {size} bytes, {FILES} records {want['bytes']} "
                                    f"(truncated or overwritten)")
        if sha256_file(f) != want["sha256"]:
            raise CheckpointDamaged(f"{f}: sha256 differs from the one {FILES} records (the file "
                                    f"was changed after the save)")


def tags_newest_first(ckpt_dir: Path) -> list[str]:
    if not ckpt_dir.is_dir():
        return []
    tags = [d.name for d in ckpt_dir.iterdir() if d.is_dir() and TAG.match(d.name)]
    return sorted(tags, key=lambda t: int(TAG.match(t)["step"]), reverse=True)


def newest_complete(ckpt_dir: Path, passed_over: list[str] | None = None) -> str | None:
    """The newest tag that passes `check_complete`, or None. Each newer tag that fails is
    described in `passed_over`, when given."""
    for tag in tags_newest_first(Path(ckpt_dir)):
        try:
            check_complete(Path(ckpt_dir) / tag)
            return tag
        except CheckpointDamaged as e:
            if passed_over is not None:
                passed_over.append(str(e))
    return None


@dataclass(frozen=True)
class Position:
    """Where a run stands: stage index, epochs completed in that stage, optimizer steps in total,
    and loader batches already consumed in the current epoch (0 at an epoch boundary)."""
    stage: int = 0
    epoch: int = 0
    step: int = 0
    batch: int = 0


def tag_for(stage_name: str, epoch: int, step: int, batch: int = 0) -> str:
    inside = f"b{batch:05d}" if batch else ""
    return f"{stage_name}-e{epoch:04d}{inside}-s{step:08d}"


def _batchnorm_stats(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in module.named_buffers()
            if n.rsplit(".", 1)[-1] in ("running_mean", "running_var")}


def save(engine, ckpt_dir: Path, stage_name: str, pos: Position, keep: int, is_main: bool) -> None:
    """Checkpoint every rank's state at `pos`; the training that follows is unchanged by it."""
    own_bn = _batchnorm_stats(engine.module)
    average_batchnorm_stats(engine.module)  # the model states (rank 0's) hold every rank's mean
    tag = tag_for(stage_name, pos.epoch, pos.step, pos.batch)
    if is_main and (ckpt_dir / tag).exists():  # left by an earlier attempt at this step (a run that
        shutil.rmtree(ckpt_dir / tag)          # resumed from an older tag): its files are stale
    barrier()
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={
            "stage": pos.stage, "epoch": pos.epoch, "step": pos.step, "batch": pos.batch})
        # Per rank: its torch RNG (dropout, drop-path; the data order needs none, it is seeded per
        # epoch) and its own BatchNorm statistics, which it goes on updating from its own batches (an
        # interrupted run would otherwise continue from the average, an uninterrupted one from its own).
        state = {"cpu": torch.get_rng_state(), "batchnorm": own_bn}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        path = ckpt_dir / tag / f"rank{torch.distributed.get_rank()}_state.pt"
        torch.save(state, path.with_name(path.name + ".part"))  # atomic: DeepSpeed's `latest` already
        os.replace(path.with_name(path.name + ".part"), path)  # names this tag, a kill must not truncate it
    except Exception as e:
        own_part = ckpt_dir / tag / f"rank{torch.distributed.get_rank()}_state.pt.part"
        own_part.unlink(missing_ok=True)
        if not out_of_space(e, ckpt_dir):
            raise
        raise _checkpoint_disk_full(ckpt_dir, tag, engine.module) from None
    with torch.no_grad():
        buffers = dict(engine.module.named_buffers())
        for n, b in own_bn.items():
            buffers[n].copy_(b)
    barrier()
    if is_main:  # every rank's files are on disk: mark the tag complete, then prune
        write_file_manifest(ckpt_dir / tag)
        if keep > 0:
            for old in tags_newest_first(ckpt_dir)[keep:]:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    barrier()


def _checkpoint_disk_full(ckpt_dir: Path, tag: str, module) -> DiskFull:
    """This rank's save of `tag` found the disk full: say how much a checkpoint takes (the last
    complete one's size, else 16 bytes per parameter: weights, fp32 master and two Adam moments)
    and where to resume. The incomplete tag stays: another rank may still be writing into it, and
    without files.json --resume auto passes over it (a later save of the same step replaces it)."""
    last = newest_complete(ckpt_dir)
    if last is not None:
        listing = json.loads((ckpt_dir / last / FILES).read_text())["files"]
        needed, basis = sum(f["bytes"] for f in listing.values()), "the size of the last one"
    else:
        needed, basis = 16 * sum(p.numel() for p in module.parameters()), "an estimate"
    error = disk_full(ckpt_dir / tag, needed, f" for one checkpoint, {basis}")
    then = f"free space, then --resume auto continues from {last or 'the start (no checkpoint is complete)'}"
    return DiskFull(f"{error}; the incomplete checkpoint has no {FILES}, so --resume auto passes over it "
                    f"(deleting it frees its space); {then}")


def resume_position(resume: str, ckpt_dir: Path, say=print) -> tuple[str | None, Position]:
    """`none`, `auto` (the newest complete checkpoint if any; newer damaged or incomplete ones are
    passed over, each named through `say`; with none complete, a start from the beginning when
    every save was unfinished, else CheckpointDamaged) or a tag name (checked: CheckpointDamaged if
    it fails) -> (tag, position)."""
    if resume == "none":
        return None, Position()
    if resume == "auto":
        passed: list[str] = []
        tag = newest_complete(ckpt_dir, passed)
        for why in passed:
            say(f"warning: --resume auto passes over {why}" + (f"; resuming from {tag}" if tag else ""))
        if tag is None:
            tags = tags_newest_first(Path(ckpt_dir))
            if any((Path(ckpt_dir) / t / FILES).is_file() for t in tags):  # saved whole, since damaged
                raise CheckpointDamaged(f"--resume auto: no complete checkpoint in {ckpt_dir} "
                                        f"({len(passed)} damaged or incomplete; see above)")
            if tags:  # killed during its first save(s): nothing was lost that a restart redoes
                say(f"warning: --resume auto: no complete checkpoint in {ckpt_dir} ({len(tags)} "
                    f"unfinished save(s) passed over); starting from the beginning")
            return None, Position()
    else:
        tag = resume
        if not (ckpt_dir / tag).is_dir():
            raise FileNotFoundError(f"--resume {resume}: checkpoint {ckpt_dir / tag} not found")
        check_complete(ckpt_dir / tag)
    # ZeRO 0-2 write mp_rank_00_model_states.pt; ZeRO-3 writes one zero_pp_rank_<r>_... per rank,
    # each carrying the same client state.
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    found = [ckpt_dir / tag / n for n in names if (ckpt_dir / tag / n).is_file()]
    if not found:
        raise FileNotFoundError(f"{ckpt_dir / tag}: no DeepSpeed model states ({' or '.join(names)})")
    state = torch.load(found[0], map_location="cpu", weights_only=False)
    return tag, Position(int(state["stage"]), int(state["epoch"]), int(state["step"]),
                         int(state.get("batch", 0)))


def restore_rank_state(engine, ckpt_dir: Path, tag: str) -> None:
    """Put back this rank's RNG state and BatchNorm statistics saved with checkpoint `tag`."""
    path = Path(ckpt_dir) / tag / f"rank{torch.distributed.get_rank()}_state.pt"
    if not path.is_file():  # written by a run with fewer ranks: continue, but not bit-exactly
        warnings.warn(f"{path} is missing (the checkpoint was written by fewer ranks): this rank "
                      f"continues with fresh RNG state and the averaged BatchNorm statistics")
        return
    state = torch.load(path, weights_only=False)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    buffers = dict(engine.module.named_buffers())
    with torch.no_grad():
        for n, b in state["batchnorm"].items():
            buffers[n].copy_(b.to(buffers[n].device))


def consolidated_state_dict(engine) -> dict:
    """The full module state dict on every rank, in fp32 (collective: every rank must call).

    fp32 training: the module's own tensors (ZeRO-3 partitions parameters: gather them). bf16/fp16
    training: the optimizer's fp32 master weights, not the rounded 16-bit copies the forward
    used, so an export (or the next stage, which starts from it) loses nothing."""
    if not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        if engine.zero_optimization_stage() == 3:
            return engine._zero3_consolidated_16bit_state_dict()
        return engine.module.state_dict()
    from deepspeed.utils import safe_get_full_fp32_param

    params = dict(engine.module.named_parameters())
    full = {}
    for name, t in engine.module.state_dict(keep_vars=True).items():  # the same order on every rank
        master = safe_get_full_fp32_param(t) if name in params else None
        t = master if master is not None else t.detach()
        full[name] = t.float() if t.is_floating_point() else t
    return full


def export_student(engine, path: Path, meta: dict, is_main: bool) -> None:
    """Write `model.pt` (student weights, adapters, metadata to rebuild it) atomically.
    Every rank must call (ZeRO-3 gathers); rank 0 writes."""
    full = consolidated_state_dict(engine)
    if is_main:
        student = {k[len("student.model."):]: v.detach().cpu() for k, v in full.items()
                   if k.startswith("student.model.")}
        adapters = {k[len("adapters."):]: v.detach().cpu() for k, v in full.items()
                    if k.startswith("adapters.")}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        try:
            torch.save({"model": student, "adapters": adapters, "meta": meta}, tmp)
            os.replace(tmp, path)
        except Exception as e:
            tmp.unlink(missing_ok=True)
            if out_of_space(e, path.parent):
                raise disk_full(path, sum(v.numel() * v.element_size() for v in student.values())) from None
            raise
    barrier()


def load_student(task, path: Path) -> None:
    """Start a stage from the previous stage's export: student strictly, adapters when both have them."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    task.student.model.load_state_dict(saved["model"])
    if task.adapters is not None and saved["adapters"]:
        task.adapters.load_state_dict(saved["adapters"])


class SampleLog:
    """Per-rank record of the sample ids each optimizer step consumed (`train.log_sample_ids`).

    On resume, lines of steps after the checkpoint (written before the crash, to be redone) are
    dropped, so the file always reads as one uninterrupted run would have written it.
    """

    def __init__(self, run_dir: Path, rank: int, resume_step: int):
        self.path = Path(run_dir) / "sample_ids" / f"rank{rank}.txt"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.path.is_file():
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln and int(ln.split()[0]) <= resume_step]
        self.path.write_text("".join(ln + "\n" for ln in kept))
        self.file = self.path.open("a")

    def __call__(self, step: int, sids) -> None:
        self.file.write(f"{step} " + " ".join(str(int(s)) for s in sids) + "\n")
        self.file.flush()


class Checkpointer:
    """The run's checkpoint directory, its keep-K policy and this rank's role, in one object: the
    trainer saves, resumes, restores, exports and starts stages through it."""

    def __init__(self, run_dir: Path, keep: int, is_main: bool):
        self.run_dir, self.keep, self.is_main = Path(run_dir), keep, is_main
        self.dir = self.run_dir / "checkpoints"

    def save(self, engine, stage_name: str, pos: Position) -> None:
        save(engine, self.dir, stage_name, pos, self.keep, self.is_main)

    def resume_position(self, resume: str) -> tuple[str | None, Position]:
        """`--resume none | auto | TAG` -> (tag or None, where the run continues); rank 0 prints
        what `auto` passed over."""
        return resume_position(resume, self.dir, print if self.is_main else (lambda _: None))

    def restore(self, engine, tag: str) -> None:
        """Engine (model, optimizer, scheduler, ZeRO partitions) and this rank's own state."""
        engine.load_checkpoint(str(self.dir), tag=tag)
        restore_rank_state(engine, self.dir, tag)

    def export(self, engine, rel_path: Path | str, meta: dict) -> Path:
        """The student as `model.pt` under the run directory (collective; rank 0 writes)."""
        path = self.run_dir / rel_path
        export_student(engine, path, meta, self.is_main)
        return path

    def load_stage_export(self, task, stage_name: str) -> None:
        """Start a stage from the student (and adapters) that stage `stage_name` exported."""
        load_student(task, self.run_dir / "stages" / stage_name / "model.pt")
