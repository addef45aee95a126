"""The end of a training run: evaluate on the validation and test splits, report, export.

Writes into the run directory, in this order: `final/model.pt` (the deployable student with its
metadata), `predictions/<model>_<split>.npz` (what sweeps and comparisons pair), then
`metrics.json` atomically: its presence is what marks the run finished. Prints the per-class AUROC
table of the test split and logs scalars, the table, ROC curves and (with a teacher) attention
maps to TensorBoard. metrics.json keys are roles (`student/<split>`, `teacher/<split>`);
TensorBoard tags name the trained architecture instead in a supervised run.
"""
from __future__ import annotations

import json
import os

from launcher.model_loading import model_meta
from launcher.plots import attention_figure, roc_figure
from launcher.validation import evaluate_split, save_predictions
from rmsnet.metrics import format_auroc_table


def evaluate_models(trainer, engine, eval_loaders: dict) -> tuple[dict, dict]:
    """Student (and teacher) on every eval split: ({role/split: summary}, {role/split: scores})."""
    student, teacher, run = engine.module.student, trainer.teacher, trainer.run
    results, scores = {}, {}
    for split, loader in eval_loaders.items():
        scores[f"student/{split}"], scores[f"teacher/{split}"] = {}, {}
        results[f"student/{split}"] = evaluate_split(student.forward_logits, loader, engine.device,
                                                     trainer.data.manifest, run.student_dtype,
                                                     scores[f"student/{split}"])
        if teacher is not None:
            results[f"teacher/{split}"] = evaluate_split(teacher.module.forward_logits, loader,
                                                         engine.device, trainer.data.manifest,
                                                         run.teacher_dtype, scores[f"teacher/{split}"])
    return results, scores


def final_report(trainer, engine, step: int, eval_loaders: dict) -> dict:
    """Evaluate, print and log, export the student, write predictions and metrics.json (every rank
    calls: evaluation and export are collective); returns the results."""
    cfg, monitor, manifest = trainer.cfg, trainer.monitor, trainer.data.manifest
    engine.eval()
    results, scores = evaluate_models(trainer, engine, eval_loaders)
    tag = {"student": trainer.eval_tag, "teacher": "teacher"}
    for name, r in results.items():
        role, split = name.split("/")
        monitor.scalars({"mean_auroc": r["mean_auroc"], **{f"auroc/{k}": v for k, v in r["auroc"].items()}},
                        step, f"eval/{tag[role]}/{split}/")
    test = cfg.data.test_split
    names = {"teacher": f"{cfg.teacher.name} (teacher)", "student": cfg.student.name}
    roles = [m for m in ("teacher", "student") if f"{m}/{test}" in results]
    table = format_auroc_table({names[m]: results[f"{m}/{test}"] for m in roles}, manifest["label_names"])
    monitor.print(f"\nper-class AUROC on the '{test}' split (patient-disjoint, "
                  f"{results[f'student/{test}']['samples']} images):\n{table}")
    monitor.text("eval/auroc_table", f"```\n{table}\n```", step)
    if trainer.env.is_main:
        curves = {names[m]: {**scores[f"{m}/{test}"], "auroc": results[f"{m}/{test}"]["auroc"]} for m in roles}
        monitor.figure("eval/roc_curves", roc_figure(curves, manifest["label_names"], f"ROC, '{test}' split"), step)
    student = engine.module.student
    if trainer.teacher is not None:  # what AT matches, for a few test images (all ranks: ZeRO-3 gathers)
        sample = next(iter(eval_loaders[test]))["image"][:4].to(engine.device)
        monitor.figure("eval/attention_maps", attention_figure(
            student, trainer.teacher.module, sample, trainer.run.student_dtype, trainer.run.teacher_dtype), step)

    trainer.ckpt.export(engine, "final/model.pt", model_meta(cfg, manifest, step, student.feature_indices))
    if trainer.env.is_main:
        write_outputs(trainer.run.dir, results, scores)
        stages = trainer.run.stages
        monitor.hparams({"student": cfg.student.name, "teacher": cfg.teacher.name, "mode": cfg.run.mode,
                         "lr": cfg.train.lr, "stages": ",".join(s.name for s in stages),
                         "kd_weight": stages[-1].loss.kd_weight, "at_weight": stages[-1].loss.at_weight,
                         "sp_weight": stages[-1].loss.sp_weight},
                        {"hparams/test_mean_auroc": results[f"student/{test}"]["mean_auroc"]})
        print(f"TensorBoard logs: {trainer.run.dir / 'tb'}   (tensorboard --logdir {trainer.run.dir})")
    return results


def write_outputs(run_dir, results: dict, scores: dict) -> None:
    """Predictions first, then metrics.json (atomically): metrics.json marks the run finished."""
    for name, s in scores.items():
        if s:  # (no teacher scores in a supervised run)
            save_predictions(run_dir / "predictions" / f"{name.replace('/', '_')}.npz", s)
    (run_dir / "metrics.json.part").write_text(json.dumps(results, indent=1))
    os.replace(run_dir / "metrics.json.part", run_dir / "metrics.json")
