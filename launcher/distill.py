"""Distil a frozen teacher into an RMS-Net student with DeepSpeed, or train one model supervised.

    deepspeed --num_gpus 2 launcher/distill.py --config launcher/configs/demo_distill.yaml
    deepspeed --num_gpus 2 launcher/distill.py --config CFG.yaml --set train.lr=3e-4 --set train.epochs=5
    python launcher/distill.py --config CFG.yaml          # one process (CPU or one GPU)
    srun python launcher/distill.py --config CFG.yaml     # SLURM, one task per GPU (see cluster/)

On a host without a GPU, `--num_gpus 2` starts two CPU ranks (gloo); DALI then runs in its
CPU-only mode. Every rank runs the frozen teacher in DeepSpeed's inference engine beside the
student, which DeepSpeed trains with ZeRO data parallelism. SIGUSR1 (and SIGTERM under srun) makes
every rank checkpoint at the same step and exit 75 (launcher/preemption.py); `--resume auto`
continues from there. A run directory has one writer at a time (launcher/run_lock.py); a new run
(no --resume) over an earlier one is refused unless --overwrite. Shards are checked against their
manifest before they are read, and a damaged sample stops every rank naming shard and sample
(launcher/read_faults.py). Any error ends as one `error:` line from the rank it happened in
(data_pipeline/cli.py; `--debug` or RMS_DEBUG=1 adds the traceback). `main()` reads top to bottom in the order it runs: config -> inputs
checked -> distributed init -> run directory locked -> shards checked -> loaders -> run plan ->
teacher -> checkpointer and resume (the newest complete checkpoint) -> trainer.fit
(launcher/trainer.py) -> final report and export (launcher/report.py) -> close.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

import torch

from data_pipeline.cli import add_debug_flag, run_cli
from data_pipeline.loader import build_emulated_loader, build_loader
from data_pipeline.loader_common import AugmentSpec
from data_pipeline.manifest import read_manifest
from data_pipeline.read_checks import DamagedSample, DamagedShard
from launcher.checkpoints import CheckpointDamaged, Checkpointer
from launcher.config import ConfigError, dump_yaml, load_config
from launcher.ds_config import check_device, check_world
from launcher.dist import barrier, detect_env, first_error, init_distributed, shutdown
from launcher.model_loading import CheckpointError, check_pretrained_file, check_teacher_file
from launcher.monitor import Monitor, NullMonitor
from launcher.nonfinite import EXIT_NONFINITE, NonFiniteTraining
from launcher.preemption import EXIT_PREEMPTED, PREEMPTED_MARKER, Preempted, StopRequest
from launcher.read_faults import SKIPPED_FILE, Skipped, agreed_loader, check_shards, cpu_group
from launcher.report import final_report
from launcher.run_lock import RunDirLocked, claim_run_dir, describe as describe_holder
from launcher.trainer import Data, Run, Trainer
from rmsnet.teachers import create_teacher


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="experiment YAML (launcher/configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--resume", default="none",
                   help="none | auto (newest complete checkpoint of the run, if any) | a checkpoint tag")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run directory that holds an earlier run (deleting it)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed adds it
    add_debug_flag(p)
    return p.parse_args(argv)


def check_inputs(cfg, args) -> dict:
    """Everything a user can get wrong, checked before any process group starts."""
    if args.overwrite and args.resume != "none":
        raise ValueError(f"--overwrite starts the run afresh; it cannot be combined with --resume {args.resume}")
    check_world(cfg, detect_env()["world_size"])
    check_device(cfg, torch.cuda.is_available())
    check_run_dir_path(cfg.run_dir)
    manifest = read_manifest(cfg.data.shards)
    if cfg.run.mode == "distill":
        if not Path(cfg.teacher.checkpoint).is_file():
            raise FileNotFoundError(f"teacher.checkpoint {cfg.teacher.checkpoint}: file not found")
        check_teacher_file(Path(cfg.teacher.checkpoint), manifest["label_names"])
    if cfg.student.pretrained_file:
        check_pretrained_file(cfg, len(manifest["label_names"]))
    return manifest


def check_run_dir_path(run_dir: Path) -> None:
    """The run directory is, or can become, a directory: no file in the way of it or its parents."""
    for path in (run_dir, *run_dir.parents):
        if path.exists():
            if not path.is_dir():
                raise ValueError(f"run directory {run_dir}: {path} is a file, not a directory (check "
                                 f"run.out_dir and run.name)")
            return


def make_loaders(cfg, env, skipped: Skipped):
    """A train-loader factory (one loader per epoch: see data_pipeline.loader) and eval loaders,
    each reading batches every rank agrees it has and leaving out the `skipped` samples
    (launcher/read_faults.py)."""
    d, seed, group = cfg.data, cfg.run.seed, cpu_group()
    common = dict(backend=d.loader, batch_size=cfg.train.batch_size_per_gpu, image_size=d.image_size,
                  rank=env.rank, world_size=env.world_size, num_threads=d.num_threads,
                  device_id=env.device.index if env.device.type == "cuda" else None)
    a = d.augment
    augment = AugmentSpec(tuple(a.crop_scale), a.hflip, a.rotate_degrees, a.brightness, a.contrast)
    def train_for(epoch: int):
        if d.emulate_world_size > 1:
            emulated = {k: v for k, v in common.items() if k not in ("rank", "world_size")}
            return agreed_loader(lambda: build_emulated_loader(
                d.shards, d.train_split, virtual_world_size=d.emulate_world_size, train=True, seed=seed,
                augment=augment, epoch=epoch, skip=skipped.keys(d.train_split), **emulated), group)
        return agreed_loader(lambda: build_loader(d.shards, d.train_split, train=True, seed=seed,
                                                  augment=augment, epoch=epoch,
                                                  skip=skipped.keys(d.train_split), **common), group)
    evals = {s: agreed_loader(lambda s=s: build_loader(d.shards, s, train=False, seed=seed,
                                                       skip=skipped.keys(s), **common), group)
             for s in (d.val_split, d.test_split)}
    return train_for, evals


def build_teacher(cfg, classes: int, dtype, run=None):
    """Frozen teacher in DeepSpeed's inference engine, with an explicit dtype (its default is fp16);
    with `run` (launcher.trainer.Run), in its memory format and compiled when the run compiles."""
    if cfg.run.mode != "distill":
        return None
    import deepspeed
    t = create_teacher(cfg.teacher.name, classes, checkpoint=cfg.teacher.checkpoint,
                       in_chans=cfg.teacher.in_chans, feature_indices=cfg.teacher.feature_indices)
    if run is not None:
        t.to(memory_format=run.memory_format)
    teacher = deepspeed.init_inference(t, dtype=dtype, replace_with_kernel_inject=False)
    teacher.module.eval()
    if run is not None and run.compile:  # in place: the module's state dict and methods are unchanged
        teacher.module.compile(backend=cfg.train.compile_backend)
    return teacher


def open_run_dir(cfg, env, skipped: Skipped, step: int):
    """The run directory with this run's config and the damaged samples it skips (rank 0), and
    the monitor writing into it."""
    splits = (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split)
    if not env.is_main:
        return NullMonitor()
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "config.yaml").write_text(dump_yaml(cfg))
    (cfg.run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
    (cfg.run_dir / SKIPPED_FILE).unlink(missing_ok=True)
    monitor = Monitor(cfg.run_dir / "tb")
    if skipped.scanned:
        where = skipped.write(cfg.run_dir, splits)
        for line in skipped.report(splits, where):
            monitor.print(line)
        monitor.scalars({s: skipped.count(s) for s in dict.fromkeys(splits)}, step, "data/skipped/")
    return monitor


def describe(cfg, run: Run, env, resume_tag: str | None) -> str:
    return (f"run dir {run.dir} | world {env.world_size} ({env.backend}, {env.device.type}) | "
            f"{cfg.run.mode}: {cfg.student.name}" + (f" <- {cfg.teacher.name}" if cfg.run.mode == "distill" else "")
            + f" | stages {[f'{s.name}:{s.epochs}ep' for s in run.stages]} x {run.steps_per_epoch} steps"
            + f", ZeRO-{cfg.train.resolved_zero_stage()}, {run.precision}"
            + (f", compiled ({cfg.train.compile_backend})" if run.compile else "")
            + (", channels-last" if run.memory_format == torch.channels_last else "")
            + (f" | resuming from {resume_tag}" if resume_tag else ""))


def claim(cfg, env, args):
    """Collective: rank 0 locks the run directory (launcher/run_lock.py); every rank learns
    whether it could. Returns (lock or None, error or None)."""
    lock, error = None, None
    if env.is_main:
        try:
            lock = claim_run_dir(cfg.run_dir, args.resume, args.overwrite, f"distill.py {cfg.run.mode}")
            if lock.took_over:
                print(f"taking over the stale lock of {describe_holder(lock.took_over)}: "
                      f"{lock.took_over['why']}", flush=True)
        except RunDirLocked as e:
            error = str(e)
    return lock, first_error(error)


def close(monitor, lock=None) -> None:
    monitor.close()
    barrier()
    if lock is not None:
        lock.release()
    shutdown()


def stop_with(error: str, env, lock, monitor=None) -> int:
    """Every rank ends on an error they all know: one line (rank 0), exit 2."""
    if env.is_main:
        print(f"error: {error}", file=sys.stderr, flush=True)
    close(monitor or NullMonitor(), lock)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    try:  # config -> inputs checked, before any process group
        cfg = load_config(args.config, args.set)
        manifest = check_inputs(cfg, args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError, RuntimeError) as e:
        if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:  # all ranks find it: say it once
            print(f"error: {e}", file=sys.stderr)
        return 2

    env = init_distributed()
    print(f"rank {env.rank}/{env.world_size} on {socket.gethostname()} (local rank {env.local_rank}/"
          f"{env.local_world_size}, {env.device}, {torch.get_num_threads()} threads, rendezvous "
          f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')})", flush=True)
    lock, error = claim(cfg, env, args)
    if error:
        return stop_with(error, env, lock)
    try:  # before any loader reads them
        d = cfg.data
        skipped = check_shards(d.shards, manifest, (d.train_split, d.val_split, d.test_split), d.verify,
                               env.rank, env.world_size, d.on_damaged)
    except DamagedShard as e:
        return stop_with(str(e), env, lock)
    stop = StopRequest()  # SIGUSR1 (and SIGTERM under srun): checkpoint, exit 75
    torch.manual_seed(cfg.run.seed)
    try:
        train_for, eval_loaders = make_loaders(cfg, env, skipped)
    except DamagedSample as e:  # raised on every rank together
        return stop_with(str(e), env, lock)
    run = Run.plan(cfg, manifest, env.world_size, env.device.type == "cuda",
                   skipped.count(cfg.data.train_split))
    teacher = build_teacher(cfg, len(manifest["label_names"]), run.teacher_dtype, run)
    checkpointer = Checkpointer(run.dir, cfg.train.keep_checkpoints, env.is_main)
    try:  # every rank reads the same files: they agree without a word
        resume_tag, start = checkpointer.resume_position(args.resume)
    except (CheckpointDamaged, FileNotFoundError) as e:
        return stop_with(str(e), env, lock)
    monitor = open_run_dir(cfg, env, skipped, start.step)
    monitor.print(describe(cfg, run, env, resume_tag))

    trainer = Trainer(cfg, run, env, Data(manifest, train_for, eval_loaders[cfg.data.val_split], skipped),
                      teacher, checkpointer, monitor, stop)
    try:
        engine, step = trainer.fit(resume_tag, start)
    except NonFiniteTraining as e:  # raised on every rank at the same point
        if env.is_main:
            print(f"error: {e}", file=sys.stderr, flush=True)
        close(monitor, lock)
        return EXIT_NONFINITE
    except DamagedSample as e:  # raised on every rank at the same batch
        return stop_with(f"{e}; the run stopped there (its last checkpoint is kept: fix or rebuild the "
                         f"shards, then --resume auto)", env, lock, monitor)
    except Preempted as e:  # every rank checkpointed at the same step
        monitor.print(f"{e}; checkpoint written, exiting with {EXIT_PREEMPTED} (requeue and run "
                      f"again with --resume auto)")
        if env.is_main:  # for batch scripts: srun may report another rank's exit code
            (run.dir / PREEMPTED_MARKER).write_text(f"{e}\n")
        close(monitor, lock)
        return EXIT_PREEMPTED

    try:
        final_report(trainer, engine, step, eval_loaders)
    except DamagedSample as e:
        return stop_with(f"{e}; the run stopped in its final evaluation", env, lock, monitor)
    close(monitor, lock)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
