"""Distil a frozen teacher into an RMS-Net student with DeepSpeed, or train one model supervised.

    deepspeed --num_gpus 2 launcher/distill.py --config launcher/configs/demo_distill.yaml
    deepspeed --num_gpus 2 launcher/distill.py --config CFG.yaml --set train.lr=3e-4 --set train.epochs=5
    python launcher/distill.py --config CFG.yaml          # one process (CPU or one GPU)
    srun python launcher/distill.py --config CFG.yaml     # SLURM, one task per GPU (see cluster/)

On a host without a GPU, `--num_gpus 2` starts two CPU ranks (gloo); DALI then runs in its
CPU-only mode. Every rank runs the frozen teacher in DeepSpeed's inference engine beside the
student, which DeepSpeed trains with ZeRO data parallelism. SIGUSR1 (and SIGTERM under srun) makes
every rank checkpoint at the same step and exit 75 (launcher/preemption.py); `--resume auto`
continues from there. Reads top to bottom in the order it runs:
config -> distributed init -> data -> teacher and student -> deepspeed.initialize -> loop -> eval.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path

import torch

from data_pipeline.loader import build_emulated_loader, build_loader
from data_pipeline.loader_common import AugmentSpec, read_manifest
from launcher.config import (ConfigError, check_world, deepspeed_config, dump_yaml, load_config,
                             resolve_precision)
from launcher.dist import all_gather_with_grad, barrier, detect_env, init_distributed, shutdown
from launcher import checkpoints as ckpt
from launcher.checkpoints import Position, export_student, load_student, resume_position
from launcher.engine import run_epoch
from launcher.monitor import Monitor, NullMonitor, Progress
from launcher.plots import attention_figure, roc_figure
from launcher.preemption import EXIT_PREEMPTED, PREEMPTED_MARKER, Preempted, StopRequest
from launcher.validation import BestTracker, evaluate_split, save_predictions
from rmsnet.metrics import format_auroc_table
from rmsnet.objective import DistillTask
from rmsnet.teachers import create_tapped_model, create_teacher

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="experiment YAML (launcher/configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--resume", default="none",
                   help="none | auto (newest complete checkpoint of the run, if any) | a checkpoint tag")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed adds it
    return p.parse_args(argv)


def check_inputs(cfg) -> dict:
    """Everything a user can get wrong, checked before any process group starts."""
    check_world(cfg, detect_env()["world_size"])
    manifest = read_manifest(cfg.data.shards)
    if cfg.run.mode == "distill" and not Path(cfg.teacher.checkpoint).is_file():
        raise FileNotFoundError(f"teacher.checkpoint {cfg.teacher.checkpoint}: file not found")
    if cfg.student.pretrained_file and not Path(cfg.student.pretrained_file).is_file():
        raise FileNotFoundError(f"student.pretrained_file {cfg.student.pretrained_file}: file not found")
    return manifest


def make_loaders(cfg, env):
    """A train-loader factory (one loader per epoch: see data_pipeline.loader) and eval loaders."""
    d, seed = cfg.data, cfg.run.seed
    common = dict(backend=d.loader, batch_size=cfg.train.batch_size_per_gpu, image_size=d.image_size,
                  rank=env.rank, world_size=env.world_size, num_threads=d.num_threads,
                  device_id=env.device.index if env.device.type == "cuda" else None)
    a = d.augment
    augment = AugmentSpec(tuple(a.crop_scale), a.hflip, a.rotate_degrees, a.brightness, a.contrast)
    def train_for(epoch: int):
        if d.emulate_world_size > 1:
            emulated = {k: v for k, v in common.items() if k not in ("rank", "world_size")}
            return build_emulated_loader(d.shards, d.train_split, virtual_world_size=d.emulate_world_size,
                                         train=True, seed=seed, augment=augment, epoch=epoch, **emulated)
        return build_loader(d.shards, d.train_split, train=True, seed=seed, augment=augment,
                            epoch=epoch, **common)
    evals = {s: build_loader(d.shards, s, train=False, seed=seed, **common)
             for s in (d.val_split, d.test_split)}
    return train_for, evals


def build_teacher(cfg, env, classes: int):
    """Frozen teacher in DeepSpeed's inference engine, with an explicit dtype (its default is fp16)."""
    if cfg.run.mode != "distill":
        return None, None
    import deepspeed
    t = create_teacher(cfg.teacher.name, classes, checkpoint=cfg.teacher.checkpoint,
                       in_chans=cfg.teacher.in_chans, feature_indices=cfg.teacher.feature_indices)
    dtype = DTYPES[resolve_precision(cfg.teacher.dtype, env.device.type == "cuda")]
    teacher = deepspeed.init_inference(t, dtype=dtype, replace_with_kernel_inject=False)
    teacher.module.eval()
    return teacher, dtype


def build_task(cfg, stage, manifest, teacher) -> DistillTask:
    """Student (+ adapters when the stage has a hint loss) and the stage's objective."""
    student = create_tapped_model(cfg.student.name, len(manifest["label_names"]),
                                  in_chans=cfg.student.in_chans,
                                  feature_indices=cfg.student.feature_indices,
                                  drop_rate=cfg.student.drop_rate,
                                  pretrained_file=cfg.student.pretrained_file or None)
    t_channels = teacher.module.feature_channels(cfg.data.image_size) if teacher is not None else None
    return DistillTask(student, stage.loss, multilabel=manifest["multilabel"],
                       student_channels=student.feature_channels(cfg.data.image_size),
                       teacher_channels=t_channels, gather_fn=all_gather_with_grad)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        manifest = check_inputs(cfg)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    env = init_distributed()
    print(f"rank {env.rank}/{env.world_size} on {socket.gethostname()} (local rank {env.local_rank}/"
          f"{env.local_world_size}, {env.device}, {torch.get_num_threads()} threads, rendezvous "
          f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')})", flush=True)
    stop_request = StopRequest()  # SIGUSR1 (and SIGTERM under srun): checkpoint, exit 75
    import deepspeed
    torch.manual_seed(cfg.run.seed)
    run_dir, ckpt_dir = cfg.run_dir, cfg.run_dir / "checkpoints"
    cuda = env.device.type == "cuda"
    precision = resolve_precision(cfg.train.precision, cuda)
    student_dtype = DTYPES[precision]
    stages = cfg.resolved_stages()
    # TensorBoard names what was evaluated: the roles in a distillation run, the architecture in a
    # supervised one (a teacher trained supervised is not a "student"). metrics.json keeps the roles.
    tag = {"student": cfg.student.name if cfg.run.mode == "supervised" else "student", "teacher": "teacher"}
    train_loader_for, eval_loaders = make_loaders(cfg, env)
    teacher, teacher_dtype = build_teacher(cfg, env, len(manifest["label_names"]))
    resume_tag, pos = resume_position(args.resume, ckpt_dir)

    monitor = Monitor(run_dir / "tb") if env.is_main else NullMonitor()
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        (run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
    accum = cfg.train.gradient_accumulation_steps
    steps_per_epoch = len(train_loader_for(0)) // accum
    total_steps = steps_per_epoch * sum(s.epochs for s in stages)
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    monitor.print(f"run dir {run_dir} | world {env.world_size} ({env.backend}, {env.device.type}) | "
                  f"{cfg.run.mode}: {cfg.student.name}"
                  + (f" <- {cfg.teacher.name}" if teacher is not None else "")
                  + f" | stages {[f'{s.name}:{s.epochs}ep' for s in stages]} x {steps_per_epoch} steps"
                  + f", ZeRO-{cfg.train.zero_stage}, {precision}"
                  + (f" | resuming from {resume_tag}" if resume_tag else ""))
    progress = Progress(total_steps, env.is_main)
    sample_log = ckpt.SampleLog(run_dir, env.rank, pos.step) if cfg.train.log_sample_ids else None
    best = BestTracker(run_dir, cfg.train.early_stopping_patience, env.is_main)
    val_loader = eval_loaders[cfg.data.val_split]
    early_stop = False

    step, engine = pos.step, None
    try:
        for si, stage in enumerate(stages):
            if si < pos.stage or ((step >= total_steps or early_stop) and engine is not None):
                continue  # done before the restart, or cut by train.max_steps
            task = build_task(cfg, stage, manifest, teacher)
            if si > 0:  # each stage starts from the previous stage's student (and adapters)
                load_student(task, run_dir / "stages" / stages[si - 1].name / "model.pt")
            stage_steps = steps_per_epoch * stage.epochs
            ds_config = deepspeed_config(cfg, env.world_size, stage_steps, precision, stage)
            if env.is_main:
                (run_dir / f"deepspeed.{stage.name}.json").write_text(json.dumps(ds_config, indent=1))
            engine, _, _, _ = deepspeed.initialize(
                model=task, model_parameters=[p for p in task.parameters() if p.requires_grad],
                config=ds_config)
            first_epoch = 0
            if resume_tag and si == pos.stage:
                engine.load_checkpoint(str(ckpt_dir), tag=resume_tag)
                ckpt.restore_rank_state(engine, ckpt_dir, resume_tag)
                first_epoch = pos.epoch
            monitor.scalars({"stage": si}, step, "train/")
            for epoch in range(first_epoch, stage.epochs):
                if step >= total_steps or early_stop:
                    break
                def save_inside(batches: int, at_step: int, si=si, epoch=epoch, stage=stage, engine=engine):
                    ckpt.save(engine, ckpt_dir, stage.name, Position(si, epoch, at_step, batches),
                              cfg.train.keep_checkpoints, env.is_main)
                resuming_here = resume_tag and si == pos.stage and epoch == pos.epoch
                step = run_epoch(engine, teacher, train_loader_for(epoch), teacher_dtype=teacher_dtype,
                                 student_dtype=student_dtype, accum=accum, step=step, last_step=total_steps,
                                 log_every=cfg.train.log_every, global_batch=ds_config["train_batch_size"],
                                 monitor=monitor, progress=progress, epoch=epoch,
                                 skip_batches=pos.batch if resuming_here else 0,
                                 save_every=cfg.train.checkpoint_every_steps, save=save_inside,
                                 sample_log=sample_log, stop=stop_request,
                                 grad_shares_every=cfg.train.grad_shares_every)
                if stage.loss.task_weight > 0 or stage.loss.kd_weight > 0:  # the head is trained
                    engine.eval()  # BatchNorm must use (not update) its running statistics
                    val = evaluate_split(engine.module.student.forward_logits, val_loader, engine.device,
                                         manifest, student_dtype)
                    monitor.scalars({"mean_auroc": val["mean_auroc"],
                                     **{f"auroc/{k}": v for k, v in val["auroc"].items()}},
                                    step, f"eval/{tag['student']}/{cfg.data.val_split}/")
                    early_stop = best.update(engine, val["mean_auroc"],
                                       {"arch": cfg.student.name, "stage": stage.name, "epoch": epoch + 1,
                                        "step": step})
                    if early_stop:
                        monitor.print(f"early stop: no gain in validation mean AUROC for "
                                      f"{best.bad_epochs} epochs (best {best.best:.4f})")
                ckpt.save(engine, ckpt_dir, stage.name, Position(si, epoch + 1, step),
                          cfg.train.keep_checkpoints, env.is_main)
                if stop_request.agreed():
                    raise Preempted(f"stopped on request after epoch {epoch + 1} of stage {stage.name}")
            export_student(engine, run_dir / "stages" / stage.name / "model.pt",
                           {"stage": stage.name, "step": step}, env.is_main)
    except Preempted as e:  # every rank checkpointed at the same step
        monitor.print(f"{e}; checkpoint written, exiting with {EXIT_PREEMPTED} (requeue and run "
                      f"again with --resume auto)")
        if env.is_main:  # for batch scripts: srun may report another rank's exit code
            (run_dir / PREEMPTED_MARKER).write_text(f"{e}\n")
        monitor.close()
        barrier()
        shutdown()
        return EXIT_PREEMPTED

    # ----------------------------------------------------------------------- evaluation and close
    engine.eval()
    student = engine.module.student
    results, scores = {}, {}
    for split, loader in eval_loaders.items():
        scores[f"student/{split}"], scores[f"teacher/{split}"] = {}, {}
        results[f"student/{split}"] = evaluate_split(student.forward_logits, loader, engine.device,
                                                     manifest, student_dtype, scores[f"student/{split}"])
        if teacher is not None:
            results[f"teacher/{split}"] = evaluate_split(teacher.module.forward_logits, loader,
                                                         engine.device, manifest, teacher_dtype,
                                                         scores[f"teacher/{split}"])
    for name, r in results.items():
        role, split = name.split("/")
        monitor.scalars({"mean_auroc": r["mean_auroc"], **{f"auroc/{k}": v for k, v in r["auroc"].items()}},
                        step, f"eval/{tag[role]}/{split}/")
    test = cfg.data.test_split
    names = {"teacher": f"{cfg.teacher.name} (teacher)", "student": cfg.student.name}
    columns = {names[m]: results[f"{m}/{test}"] for m in ("teacher", "student") if f"{m}/{test}" in results}
    table = format_auroc_table(columns, manifest["label_names"])
    monitor.print(f"\nper-class AUROC on the '{test}' split (patient-disjoint, "
                  f"{results[f'student/{test}']['samples']} images):\n{table}")
    monitor.text("eval/auroc_table", f"```\n{table}\n```", step)
    if env.is_main:
        curves = {names[m]: {**scores[f"{m}/{test}"], "auroc": results[f"{m}/{test}"]["auroc"]}
                  for m in ("teacher", "student") if f"{m}/{test}" in results}
        monitor.figure("eval/roc_curves", roc_figure(curves, manifest["label_names"],
                                                     f"ROC, '{test}' split"), step)
    if teacher is not None:  # what AT matches, for a few test images (all ranks: ZeRO-3 gathers)
        sample = next(iter(eval_loaders[test]))["image"][:4].to(engine.device)
        monitor.figure("eval/attention_maps", attention_figure(
            student, teacher.module, sample, student_dtype, teacher_dtype), step)

    meta = {"arch": cfg.student.name, "num_classes": len(manifest["label_names"]),
            "in_chans": cfg.student.in_chans, "feature_indices": student.feature_indices,
            "image_size": cfg.data.image_size, "label_names": manifest["label_names"],
            "multilabel": manifest["multilabel"], "step": step, "mode": cfg.run.mode}
    export_student(engine, run_dir / "final" / "model.pt", meta, env.is_main)
    if env.is_main:  # predictions first: metrics.json is what marks the run finished
        for name, s in scores.items():
            if s:  # (no teacher scores in a supervised run)
                save_predictions(run_dir / "predictions" / f"{name.replace('/', '_')}.npz", s)
        (run_dir / "metrics.json.part").write_text(json.dumps(results, indent=1))
        os.replace(run_dir / "metrics.json.part", run_dir / "metrics.json")
        monitor.hparams({"student": cfg.student.name, "teacher": cfg.teacher.name, "mode": cfg.run.mode,
                         "lr": cfg.train.lr, "stages": ",".join(s.name for s in stages),
                         "kd_weight": stages[-1].loss.kd_weight, "at_weight": stages[-1].loss.at_weight,
                         "sp_weight": stages[-1].loss.sp_weight},
                        {"hparams/test_mean_auroc": results[f"student/{test}"]["mean_auroc"]})
        print(f"TensorBoard logs: {run_dir / 'tb'}   (tensorboard --logdir {run_dir})")
    monitor.close()
    barrier()
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
