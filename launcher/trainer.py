"""One training run: what is fixed for it (`Run`) and the object that carries it out (`Trainer`).

`Trainer.fit` walks the stages (each with its own DeepSpeed engine, starting from the previous
stage's student), the epochs of each stage and the optimizer steps of each epoch. After every
optimizer step one method, `_after_step`, decides whether to checkpoint (every
`train.checkpoint_every_steps`, and at every epoch end) and whether to stop (the ranks agree on a
stop request: checkpoint there, raise `Preempted`). One rule, `_stage_done`, says which stages are
finished: a run resumed at its very end still builds the last stage's engine, which the final
evaluation needs.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from data_pipeline.loader_common import batches_per_epoch
from launcher.checkpoints import Checkpointer, Position, SampleLog, newest_complete
from launcher.ds_config import deepspeed_config, resolve_precision, resolve_switch
from launcher.dist import all_gather_with_grad, average_batchnorm_stats
from launcher.engine import log_grad_shares, train_step
from launcher.monitor import Progress
from launcher.nonfinite import NonFiniteGuard
from launcher.preemption import Preempted
from launcher.validation import BestTracker, evaluate_split
from rmsnet.objective import TERMS, DistillTask
from rmsnet.teachers import create_tapped_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def graph_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far in this process, from torch.compile's counters."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


@dataclass(frozen=True)
class Run:
    """What is fixed for the whole run, decided before any engine exists."""
    dir: Path
    stages: tuple
    steps_per_epoch: int
    total_steps: int
    accum: int
    precision: str
    student_dtype: torch.dtype
    teacher_dtype: torch.dtype | None
    compile: bool = False
    memory_format: torch.memory_format = torch.contiguous_format

    @classmethod
    def plan(cls, cfg, manifest: dict, world_size: int, cuda: bool, skipped: int = 0) -> "Run":
        """Steps per epoch from the manifest's sample count less the `skipped` damaged ones, the
        way the loaders split it over ranks (the same count `len(loader)` gives, without building
        a loader)."""
        d, t = cfg.data, cfg.train
        samples = manifest["splits"][d.train_split]["samples"] - skipped
        if d.emulate_world_size > 1:  # one process replaying k ranks' batches in turn
            batches = batches_per_epoch(samples, d.emulate_world_size, t.batch_size_per_gpu) \
                * d.emulate_world_size
        else:
            batches = batches_per_epoch(samples, world_size, t.batch_size_per_gpu)
        stages = tuple(cfg.resolved_stages())
        steps_per_epoch = batches // t.gradient_accumulation_steps
        total = steps_per_epoch * sum(s.epochs for s in stages)
        precision = resolve_precision(t.precision, cuda)
        teacher_dtype = (DTYPES[resolve_precision(cfg.teacher.dtype, cuda)]
                         if cfg.run.mode == "distill" else None)
        memory_format = torch.channels_last if resolve_switch(t.channels_last, cuda) else torch.contiguous_format
        return cls(cfg.run_dir, stages, steps_per_epoch, min(total, t.max_steps) if t.max_steps else total,
                   t.gradient_accumulation_steps, precision, DTYPES[precision], teacher_dtype,
                   resolve_switch(t.compile, cuda, t.resolved_zero_stage()), memory_format)


@dataclass(frozen=True)
class Data:
    """The manifest, a train-loader factory (one loader per epoch), the validation loader, and the
    damaged samples the loaders leave out (launcher.read_faults.Skipped)."""
    manifest: dict
    train_for: Callable[[int], object]
    val: object
    skipped: object = None


def build_task(cfg, stage, manifest: dict, teacher) -> DistillTask:
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


class Trainer:
    """Owns the run's services and its loop: fit -> run_stage -> run_epoch -> train_step."""

    def __init__(self, cfg, run: Run, env, data: Data, teacher, checkpointer: Checkpointer, monitor, stop):
        self.cfg, self.run, self.env, self.data, self.teacher = cfg, run, env, data, teacher
        self.ckpt, self.monitor, self.stop = checkpointer, monitor, stop
        self.progress = Progress(run.total_steps, env.is_main)
        self.best = BestTracker(run.dir, cfg.train.early_stopping_patience, env.is_main)
        self.sample_log: SampleLog | None = None
        self.early_stop = False
        self.eval_tag = cfg.student.name if cfg.run.mode == "supervised" else "student"
        self._stage = (0, run.stages[0], 0)  # (index, stage, global batch) of the stage running
        self.guard = NonFiniteGuard(cfg.train.max_bad_steps, env.device)
        self._compile_pending = False  # the next step is the first of a compiled engine
        self._graphs = (0, 0)  # graph_counts() after that first step

    def _check_finite(self, before: str, engine=None) -> None:
        """Collective: stop (NonFiniteTraining) when training went non-finite; with `engine`, also
        when the student's weights hold NaN/inf (called before anything is saved from them)."""
        self.guard.check(before, lambda: newest_complete(self.ckpt.dir), engine.module if engine is not None else None)

    # ------------------------------------------------------------------------------ the loop
    def fit(self, resume_tag: str | None, start: Position):
        """Train from `start` (restored from checkpoint `resume_tag` when given) to the end of the
        run; returns (engine of the last stage run, optimizer steps done). Raises Preempted."""
        if self.cfg.train.log_sample_ids:
            self.sample_log = SampleLog(self.run.dir, self.env.rank, start.step)
        engine, pos = None, start
        for si, stage in enumerate(self.run.stages):
            if self._stage_done(si, start, pos, engine):
                continue
            engine, pos = self.run_stage(si, stage, resume_tag if si == start.stage else None, pos)
        return engine, pos.step

    def _stage_done(self, si: int, start: Position, pos: Position, engine) -> bool:
        """Done before the restart, or nothing left to train (train.max_steps, early stopping)
        once an engine exists for the final evaluation."""
        return si < start.stage or (engine is not None and (pos.step >= self.run.total_steps
                                                            or self.early_stop))

    def run_stage(self, si: int, stage, resume_tag: str | None, pos: Position):
        """One stage: its own engine and schedule, started from the previous stage's student (or
        from `resume_tag`, which restores the engine and where in the stage it stood)."""
        import deepspeed

        cfg, run = self.cfg, self.run
        task = build_task(cfg, stage, self.data.manifest, self.teacher)
        if si > 0:  # each stage starts from the previous stage's student (and adapters)
            self.ckpt.load_stage_export(task, run.stages[si - 1].name)
        ds_config = deepspeed_config(cfg, self.env.world_size, run.steps_per_epoch * stage.epochs,
                                     run.precision, stage, cuda=self.env.device.type == "cuda")
        if self.env.is_main:
            (run.dir / f"deepspeed.{stage.name}.json").write_text(json.dumps(ds_config, indent=1))
        engine, _, _, _ = deepspeed.initialize(
            model=task, model_parameters=[p for p in task.parameters() if p.requires_grad], config=ds_config)
        if run.compile:  # compiled on its first call; that step is timed apart (`_compile_done`)
            engine.compile(backend=cfg.train.compile_backend)
            self._compile_pending = True
        if resume_tag:  # `pos` is where that checkpoint stood
            self.ckpt.restore(engine, resume_tag)
        else:
            pos = Position(si, 0, pos.step)
        self._stage = (si, stage, ds_config["train_batch_size"])
        self.monitor.scalars({"stage": si}, pos.step, "train/")
        while pos.epoch < stage.epochs and pos.step < run.total_steps and not self.early_stop:
            pos = self.run_epoch(engine, self.data.train_for(pos.epoch), pos)
            if stage.loss.task_weight > 0 or stage.loss.kd_weight > 0:  # the head is trained
                self.validate(engine, pos)
            pos = Position(si, pos.epoch + 1, pos.step)
            self._after_step(engine, pos, epoch_end=True)
        if run.compile and not self._compile_pending:
            self._check_recompiles(pos.step)
        self._check_finite(f"exporting stage {stage.name}", engine)
        self.ckpt.export(engine, Path("stages") / stage.name / "model.pt",
                         {"stage": stage.name, "step": pos.step})
        return engine, pos

    def run_epoch(self, engine, loader, pos: Position) -> Position:
        """Train one epoch (or until the run's last step) from `pos` (its `batch` batches already
        consumed, on a mid-epoch resume); returns the position at the epoch's end (batch 0).

        The loader is always drained to its end (DALI requires it before the next pipeline starts);
        the skipped batches and those after the last step are read but not used."""
        run, t = self.run, self.cfg.train
        engine.train()
        step, t_log, last_log = pos.step, time.perf_counter(), pos.step
        for i, batch in enumerate(loader):
            if i < pos.batch or step >= run.total_steps:
                continue
            log_now = (step + 1) % t.log_every == 0 or step + 1 == run.total_steps
            timings = {} if log_now else None
            shares_now = (bool(t.grad_shares_every) and (step + 1) % t.grad_shares_every == 0
                          and (i + 1) % run.accum == 0)
            grad_norms = {} if shares_now else None
            batch["image"] = batch["image"].to(run.student_dtype, memory_format=run.memory_format)
            first = self._compile_pending
            t_first = time.perf_counter()
            terms = train_step(engine, self.teacher, batch, run.teacher_dtype, timings, grad_norms)
            if first:
                self._compile_done(step, t_first)
                t_log, last_log = time.perf_counter(), step + 1  # throughput starts after it
            if grad_norms:
                log_grad_shares(self.monitor, grad_norms, step + 1)
            if self.sample_log is not None:
                self.sample_log(step + 1, batch["sid"])
            if (i + 1) % run.accum:
                continue
            step += 1
            self.guard.observe(terms, step, engine.was_step_applied())
            if i + 1 < len(loader) and step < run.total_steps:  # the epoch end is saved by run_stage
                self._after_step(engine, Position(pos.stage, pos.epoch, step, i + 1), epoch_end=False)
            if log_now:  # the only place that syncs with .item()
                self._check_finite(f"logging step {step}")
                self._log(engine, terms, timings, Position(pos.stage, pos.epoch, step),
                          (step - last_log) / (time.perf_counter() - t_log))
                t_log, last_log = time.perf_counter(), step
        average_batchnorm_stats(engine.module)  # every rank evaluates and saves the same model
        return Position(pos.stage, pos.epoch, step)

    def _after_step(self, engine, pos: Position, epoch_end: bool) -> None:
        """After an optimizer step (or an epoch): checkpoint when it is time, and stop when the
        ranks agree that one of them was asked to (after checkpointing, so nothing is lost)."""
        every = self.cfg.train.checkpoint_every_steps
        saved = epoch_end or (bool(every) and pos.step % every == 0)
        if saved:
            self._check_finite(f"checkpointing step {pos.step}", engine)
            self.ckpt.save(engine, self._stage[1].name, pos)
        if self.stop is not None and self.stop.agreed():
            if not saved:
                self._check_finite(f"checkpointing step {pos.step}", engine)
                self.ckpt.save(engine, self._stage[1].name, pos)
            raise Preempted(f"stopped on request after epoch {pos.epoch} of stage {self._stage[1].name}"
                            if epoch_end else f"stopped on request at step {pos.step}")

    def _compile_done(self, step: int, started: float) -> None:
        """The first step of a compiled engine (begun at perf_counter `started`) ran, compiling
        student, objective and teacher: its time (the GPU's queued work included) and graph counts
        are reported apart, and the throughput figures start after it."""
        self._compile_pending = False
        if self.env.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        self._graphs = graph_counts()
        self.monitor.scalars({"time/compile_s": seconds, "compile/graphs": self._graphs[0],
                              "compile/graph_breaks": self._graphs[1]}, step + 1, "train/")
        self.monitor.print(f"compiled ({self.cfg.train.compile_backend}): the first step took {seconds:.1f} s; "
                           f"{self._graphs[0]} graphs, {self._graphs[1]} graph breaks")

    def _check_recompiles(self, step: int) -> None:
        """At a compiled stage's end: a graph compiled after the first step is a recompilation
        (a guard failed: a shape, dtype or flag changed between steps), which costs a compile."""
        graphs, breaks = graph_counts()
        self.monitor.scalars({"compile/graphs": graphs, "compile/graph_breaks": breaks}, step, "train/")
        if graphs > self._graphs[0]:
            self.monitor.print(f"warning: the compiled step recompiled {graphs - self._graphs[0]} time(s) after "
                               f"its first step ({graphs} graphs by step {step}): check TORCH_LOGS=recompiles")

    def _log(self, engine, terms: dict, timings: dict, at: Position, steps_per_s: float) -> None:
        values = {k: terms[k].item() for k in ("loss",) + TERMS if k in terms}
        sps, step = self._stage[2] * steps_per_s, at.step
        self.monitor.scalars(values, step, "train/")
        self.monitor.scalars({"lr": engine.get_lr()[0], "samples_per_s": sps,
                              "grad_norm": engine.get_global_grad_norm(),
                              **({"time/teacher_forward_s": timings["teacher_s"]}
                                 if self.teacher is not None else {}),  # none to time when supervised
                              "time/student_step_s": timings["student_s"]}, step, "train/")
        self.progress.line(step, at.epoch, values, sps)

    # ------------------------------------------------------------------------------ validation
    def validate(self, engine, pos: Position) -> None:
        """Validation mean AUROC after an epoch: logged, the best student exported, early stopping."""
        self._check_finite(f"validating at step {pos.step}", engine)
        engine.eval()  # BatchNorm must use (not update) its running statistics
        val = evaluate_split(engine.module.student.forward_logits, self.data.val, engine.device,
                             self.data.manifest, self.run.student_dtype)
        self.monitor.scalars({"mean_auroc": val["mean_auroc"],
                              **{f"auroc/{k}": v for k, v in val["auroc"].items()}},
                             pos.step, f"eval/{self.eval_tag}/{self.cfg.data.val_split}/")
        stage = self._stage[1]
        self.early_stop = self.best.update(engine, val["mean_auroc"], {
            "arch": self.cfg.student.name, "stage": stage.name, "epoch": pos.epoch + 1, "step": pos.step})
        if self.early_stop:
            self.monitor.print(f"early stop: no gain in validation mean AUROC for "
                               f"{self.best.bad_epochs} epochs (best {self.best.best:.4f})")
