"""What bench/distill_step.py times: the project's step once per ZeRO stage, each built exactly as
launcher/distill.py builds it, and the hand-written loops it is measured against (bench/hand_loop.py),
each as a stepper `(batch, timings=None) -> loss terms` under a name."""
from __future__ import annotations

import copy

import torch

from hand_loop import HandLoop
from launcher.config import load_config
from launcher.distill import build_teacher
from launcher.ds_config import deepspeed_config, resolve_precision
from launcher.engine import train_step
from launcher.trainer import DTYPES, build_task
from rmsnet.teachers import create_tapped_model, create_teacher


class Paths:
    """The timed paths by name: steppers (batch, timings=None) -> loss terms, in a fixed order.
    Project paths are named `project` (one ZeRO stage) or `project_z<stage>` (several); the
    baselines `hand` (the careful hand-written loop: compiled with --compile) and `hand_eager` (with
    --compile only: the same loop uncompiled, the eager baseline column)."""

    def __init__(self):
        self.step, self.label, self.engine, self.first_s, self.first = {}, {}, {}, {}, {}

    def add(self, name, label, stepper, engine=None):
        self.step[name], self.label[name] = stepper, label
        if engine is not None:
            self.engine[name] = engine

    @property
    def names(self) -> list[str]:
        return list(self.step)

    @property
    def projects(self) -> list[str]:
        return [p for p in self.step if p.startswith("project")]

    @property
    def baselines(self) -> list[str]:
        return [p for p in self.step if p.startswith("hand")]


def zero_stages(a, cfg) -> list[int]:
    if not a.zero_stages:
        return [cfg.train.resolved_zero_stage()]
    try:
        stages = [int(s) for s in a.zero_stages.split(",")]
    except ValueError:
        raise SystemExit(f"error: --zero-stages takes stages such as 0,1,2, got {a.zero_stages!r}")
    if not stages or any(s not in (0, 1, 2) for s in stages) or len(set(stages)) < len(stages):
        raise SystemExit(f"error: --zero-stages takes distinct stages among 0, 1, 2, got {a.zero_stages!r}")
    return stages


def build_projects(paths, a, overrides, manifest, env, total_steps):
    """The project path once per ZeRO stage, each exactly as launcher/distill.py builds it, sharing
    one frozen teacher (in DeepSpeed's inference engine; compiled once with --compile). Returns
    (teacher dtype, the first engine's DeepSpeed JSON, the student's initial weights)."""
    import deepspeed
    cfg = load_config(a.config, overrides)
    stages = zero_stages(a, cfg)
    stage = cfg.resolved_stages()[0]
    cuda = env.device.type == "cuda"
    teacher_dtype = DTYPES[resolve_precision(cfg.teacher.dtype, cuda)]
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    teacher_ds = build_teacher(cfg, len(manifest["label_names"]), teacher_dtype)
    teacher_ds.module.to(memory_format=fmt)
    if a.compile:  # what distill.build_teacher does with train.compile=on
        teacher_ds.module.compile(backend=a.compile_backend)
    first_config, student_init = None, None
    for z in stages:
        zcfg = load_config(a.config, overrides + [f"train.zero_stage={z}"])
        torch.manual_seed(cfg.run.seed)
        task = build_task(zcfg, stage, manifest, teacher_ds)
        if student_init is None:
            student_init = copy.deepcopy(task.student.state_dict())
        task.student.load_state_dict(student_init)
        ds_config = deepspeed_config(zcfg, env.world_size, total_steps, a.precision, stage, cuda=cuda)
        first_config = first_config or ds_config
        engine, *_ = deepspeed.initialize(model=task, config=ds_config,
                                          model_parameters=[p for p in task.parameters() if p.requires_grad])
        engine.train()
        if a.compile:  # what Trainer.run_stage does with train.compile=on
            engine.compile(backend=a.compile_backend)

        def project_step(batch, timings=None, engine=engine):
            batch = dict(batch, image=batch["image"].to(DTYPES[a.precision]))  # what Trainer.run_epoch does
            return train_step(engine, teacher_ds, batch, teacher_dtype, timings)

        name = "project" if len(stages) == 1 else f"project_z{z}"
        label = f"project (DeepSpeed ZeRO-{z} + train_step{', compiled' if a.compile else ''})"
        paths.add(name, label, project_step, engine)
    return teacher_dtype, first_config, student_init


def build_hand(cfg, stage, manifest, a, env, ds_config, student_init, compiled: bool) -> HandLoop:
    """The hand-written loop with its own teacher (same checkpoint) and the student's initial weights."""
    classes = len(manifest["label_names"])
    teacher = create_teacher(cfg.teacher.name, classes, checkpoint=cfg.teacher.checkpoint,
                             in_chans=cfg.teacher.in_chans, feature_indices=cfg.teacher.feature_indices)
    student = create_tapped_model(cfg.student.name, classes, in_chans=cfg.student.in_chans,
                                  feature_indices=cfg.student.feature_indices,
                                  drop_rate=cfg.student.drop_rate)
    student.load_state_dict(student_init)
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    teacher.to(env.device, memory_format=fmt), student.to(env.device, memory_format=fmt).train()
    if compiled:
        teacher.compile(backend=a.compile_backend)
        student.compile(backend=a.compile_backend)
    return HandLoop(teacher, student, stage.loss, manifest["multilabel"], ds_config, a.precision == "bf16")
