"""Distil a frozen teacher into an RMS-Net student with DeepSpeed, or train one model supervised.

    deepspeed --num_gpus 2 launcher/distill.py --config launcher/configs/demo_distill.yaml
    deepspeed --num_gpus 2 launcher/distill.py --config CFG.yaml --set train.lr=3e-4 --set train.epochs=5
    python launcher/distill.py --config CFG.yaml          # one process (CPU or one GPU)
    srun python launcher/distill.py --config CFG.yaml     # SLURM, one task per GPU (see cluster/)

On a host without a GPU, `--num_gpus 2` starts two CPU ranks (gloo); DALI then runs in its
CPU-only mode. Every rank runs the frozen teacher in DeepSpeed's inference engine beside the
student, which DeepSpeed trains with ZeRO data parallelism. Reads top to bottom in the order it runs:
config -> distributed init -> data -> teacher and student -> deepspeed.initialize -> loop -> eval.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from data_pipeline.loader import build_loader
from data_pipeline.loader_common import AugmentSpec, read_manifest
from launcher.config import ConfigError, deepspeed_config, dump_yaml, load_config, resolve_precision
from launcher.dist import all_gather_with_grad, barrier, init_distributed, shutdown
from launcher.engine import export_student, predict, save_checkpoint, train_step
from launcher.monitor import Monitor, NullMonitor, Progress
from rmsnet.metrics import classification_summary, format_auroc_table
from rmsnet.objective import TERMS, DistillTask
from rmsnet.teachers import create_tapped_model, create_teacher

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="experiment YAML (launcher/configs/*.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed adds it
    return p.parse_args(argv)


def check_inputs(cfg) -> dict:
    """Everything a user can get wrong, checked before any process group starts."""
    manifest = read_manifest(cfg.data.shards)
    if cfg.run.mode == "distill" and not Path(cfg.teacher.checkpoint).is_file():
        raise FileNotFoundError(f"teacher.checkpoint {cfg.teacher.checkpoint}: file not found")
    return manifest


def make_loaders(cfg, env, seed: int):
    d = cfg.data
    common = dict(backend=d.loader, batch_size=cfg.train.batch_size_per_gpu, image_size=d.image_size,
                  rank=env.rank, world_size=env.world_size, num_threads=d.num_threads,
                  device_id=env.local_rank if env.device.type == "cuda" else None)
    a = d.augment
    augment = AugmentSpec(tuple(a.crop_scale), a.hflip, a.rotate_degrees, a.brightness, a.contrast)
    train = build_loader(d.shards, d.train_split, train=True, seed=seed, augment=augment, **common)
    evals = {s: build_loader(d.shards, s, train=False, seed=seed, **common)
             for s in (d.val_split, d.test_split)}
    return train, evals


def build_models(cfg, env, manifest):
    classes = len(manifest["label_names"])
    student = create_tapped_model(cfg.student.name, classes, in_chans=cfg.student.in_chans,
                                  feature_indices=cfg.student.feature_indices,
                                  drop_rate=cfg.student.drop_rate)
    loss_cfg = cfg.loss
    teacher, teacher_channels = None, None
    if cfg.run.mode == "supervised":  # task loss only
        loss_cfg = dataclasses.replace(cfg.loss, kd_weight=0.0, at_weight=0.0, sp_weight=0.0,
                                       hint_weight=0.0)
    else:
        import deepspeed
        t = create_teacher(cfg.teacher.name, classes, checkpoint=cfg.teacher.checkpoint,
                           in_chans=cfg.teacher.in_chans, feature_indices=cfg.teacher.feature_indices)
        teacher_channels = t.feature_channels(cfg.data.image_size)
        dtype = DTYPES[resolve_precision(cfg.teacher.dtype, env.device.type == "cuda")]
        # Explicit dtype: init_inference defaults to fp16, which CPUs run slowly or not at all.
        teacher = deepspeed.init_inference(t, dtype=dtype, replace_with_kernel_inject=False)
        teacher.module.eval()
    task = DistillTask(student, loss_cfg, multilabel=manifest["multilabel"],
                       student_channels=student.feature_channels(cfg.data.image_size),
                       teacher_channels=teacher_channels, gather_fn=all_gather_with_grad)
    return task, teacher


def evaluate_split(forward_logits, loader, device, manifest, dtype):
    probs, targets, _ = predict(lambda x: forward_logits(x.to(dtype)), loader, device,
                                manifest["multilabel"])
    return classification_summary(probs, targets, manifest["label_names"], manifest["multilabel"])


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        manifest = check_inputs(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    env = init_distributed()
    import deepspeed
    torch.manual_seed(cfg.run.seed)
    run_dir = cfg.run_dir
    precision = resolve_precision(cfg.train.precision, env.device.type == "cuda")
    train_loader, eval_loaders = make_loaders(cfg, env, cfg.run.seed)
    task, teacher = build_models(cfg, env, manifest)
    teacher_dtype = DTYPES[resolve_precision(cfg.teacher.dtype, env.device.type == "cuda")]

    accum = cfg.train.gradient_accumulation_steps
    steps_per_epoch = len(train_loader) // accum
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    ds_config = deepspeed_config(cfg, env.world_size, total_steps, precision)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        (run_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=1))
    engine, _, _, _ = deepspeed.initialize(
        model=task, model_parameters=[p for p in task.parameters() if p.requires_grad],
        config=ds_config)
    student_dtype = DTYPES[precision]

    monitor = Monitor(run_dir / "tb") if env.is_main else NullMonitor()
    monitor.print(f"run dir {run_dir} | world {env.world_size} ({env.backend}, {env.device.type}) | "
                  f"{cfg.run.mode}: {cfg.student.name}"
                  + (f" <- {cfg.teacher.name}" if teacher is not None else "")
                  + f" | {steps_per_epoch} steps/epoch x {cfg.train.epochs} epochs, ZeRO-{cfg.train.zero_stage}")
    progress = Progress(total_steps, env.is_main)
    global_batch = ds_config["train_batch_size"]
    step, epoch, t_log = 0, 0, time.perf_counter()
    while step < total_steps:
        engine.train()
        for i, batch in enumerate(train_loader):
            if step >= total_steps:
                continue  # drain the epoch so the loader resets cleanly
            log_now = (step + 1) % cfg.train.log_every == 0 or step + 1 == total_steps
            timings = {} if log_now else None
            batch["image"] = batch["image"].to(student_dtype)
            terms = train_step(engine, teacher, batch, teacher_dtype, timings)
            if (i + 1) % accum:
                continue
            step += 1
            if log_now:  # the only place that syncs with .item()
                dt = time.perf_counter() - t_log
                values = {k: terms[k].item() for k in ("loss",) + TERMS if k in terms}
                sps = global_batch * cfg.train.log_every / dt if step >= cfg.train.log_every else 0.0
                monitor.scalars(values, step, "train/")
                monitor.scalars({"lr": engine.get_lr()[0], "samples_per_s": sps,
                                 "grad_norm": engine.get_global_grad_norm(),
                                 "time/teacher_forward_s": timings["teacher_s"],
                                 "time/student_step_s": timings["student_s"]}, step, "train/")
                progress.line(step, epoch, values, sps)
                t_log = time.perf_counter()
        epoch += 1

    # ----------------------------------------------------------------------- evaluation and close
    engine.eval()
    student = engine.module.student
    results = {}
    for split, loader in eval_loaders.items():
        results[f"student/{split}"] = evaluate_split(student.forward_logits, loader, engine.device,
                                                     manifest, student_dtype)
        if teacher is not None:
            results[f"teacher/{split}"] = evaluate_split(teacher.module.forward_logits, loader,
                                                         engine.device, manifest, teacher_dtype)
    for name, r in results.items():
        monitor.scalars({"mean_auroc": r["mean_auroc"], **{f"auroc/{k}": v for k, v in r["auroc"].items()}},
                        step, f"eval/{name}/")
    test = cfg.data.test_split
    columns = {m: results[f"{m}/{test}"] for m in ("teacher", "student") if f"{m}/{test}" in results}
    table = format_auroc_table(columns, manifest["label_names"])
    monitor.print(f"\nper-class AUROC on the '{test}' split (patient-disjoint, "
                  f"{columns['student']['samples']} images):\n{table}")
    monitor.text("eval/auroc_table", f"```\n{table}\n```", step)

    meta = {"arch": cfg.student.name, "num_classes": len(manifest["label_names"]),
            "in_chans": cfg.student.in_chans, "feature_indices": student.feature_indices,
            "image_size": cfg.data.image_size, "label_names": manifest["label_names"],
            "multilabel": manifest["multilabel"], "step": step, "mode": cfg.run.mode}
    export_student(engine, run_dir / "final" / "model.pt", meta, env.is_main)
    save_checkpoint(engine, run_dir / "checkpoints", f"step{step:08d}",
                    {"step": step, "epoch": epoch, "stage": "final"})
    if env.is_main:
        (run_dir / "metrics.json").write_text(json.dumps(results, indent=1))
        monitor.hparams({"student": cfg.student.name, "teacher": cfg.teacher.name, "mode": cfg.run.mode,
                         "lr": cfg.train.lr, "epochs": cfg.train.epochs, "kd_weight": cfg.loss.kd_weight,
                         "at_weight": cfg.loss.at_weight, "sp_weight": cfg.loss.sp_weight},
                        {"hparams/test_mean_auroc": columns["student"]["mean_auroc"]})
        print(f"TensorBoard logs: {run_dir / 'tb'}   (tensorboard --logdir {run_dir})")
    monitor.close()
    barrier()
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
