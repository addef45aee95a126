"""The end of a training run: evaluate on the validation and test splits, report, export.

Writes into the run directory, in this order: `final/model.pt` (the deployable student with its
metadata), `predictions/<model>_<split>.npz` (what sweeps and comparisons pair), then
`metrics.json` atomically: its presence is what marks the run finished. Prints the per-class AUROC
table of the test split and logs scalars, the table, ROC curves and (with a teacher) attention
maps to TensorBoard. metrics.json has launcher/metrics_doc.py's format, the same as
launcher/evaluate.py's: per split and role (`student`, `teacher`) the per-class AUROC with
bootstrap intervals, AUPRC, calibration and sensitivity/specificity at thresholds chosen on the
validation split. TensorBoard tags name the trained architecture instead of the role in a
supervised run.
"""
from __future__ import annotations

from data_pipeline.manifest import split_warnings
from launcher.metrics_doc import (fmt, metrics_document, model_result, split_report, write_metrics,
                                  youden_thresholds)
from launcher.model_loading import model_meta
from launcher.plots import attention_figure, roc_figure
from launcher.validation import evaluate_split, save_predictions
from rmsnet.metrics import format_auroc_table


def evaluate_models(trainer, engine, eval_loaders: dict) -> dict:
    """{role: {split: scores}} of the student (and teacher) on every eval split, on every rank;
    scores = {"probs", "targets", "sid"}, every sample exactly once."""
    student, teacher, run = engine.module.student, trainer.teacher, trainer.run
    scores = {"student": {}, "teacher": {}} if teacher is not None else {"student": {}}
    for split, loader in eval_loaders.items():
        evaluate_split(student.forward_logits, loader, engine.device, trainer.data.manifest,
                       run.student_dtype, scores["student"].setdefault(split, {}))
        if teacher is not None:
            evaluate_split(teacher.module.forward_logits, loader, engine.device, trainer.data.manifest,
                           run.teacher_dtype, scores["teacher"].setdefault(split, {}))
    return scores


def run_document(trainer, scores: dict, step: int) -> dict:
    """The run's metrics.json (launcher/metrics_doc.py's format, the same as evaluate.py's): every
    eval split, thresholds chosen on the validation split."""
    cfg, manifest = trainer.cfg, trainer.data.manifest
    val = cfg.data.val_split
    thresholds = {role: youden_thresholds(s[val]["probs"], s[val]["targets"])[0] if val in s else None
                  for role, s in scores.items()}
    models = {"student": {"model": cfg.student.name, "checkpoint": str(trainer.run.dir / "final" / "model.pt")},
              "teacher": {"model": cfg.teacher.name, "checkpoint": str(cfg.teacher.checkpoint)}}
    splits = {split: split_report(manifest, split,
                                  {role: (s[split]["probs"], s[split]["targets"]) for role, s in scores.items()},
                                  thresholds, models)  # evaluate.py's defaults: the same intervals
              for split in scores["student"]}
    doc = metrics_document("launcher/distill.py", manifest, cfg.data.shards, step,
                           trainer.env.world_size, val, splits)
    if trainer.data.skipped is not None and trainer.data.skipped.scanned:  # what the numbers leave out
        doc["skipped_samples"] = trainer.data.skipped.document(
            (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split))
    return doc


def final_report(trainer, engine, step: int, eval_loaders: dict) -> dict:
    """Evaluate, print and log, export the student, write predictions and metrics.json (every rank
    calls: evaluation and export are collective); returns the metrics document."""
    cfg, monitor, manifest = trainer.cfg, trainer.monitor, trainer.data.manifest
    engine.eval()
    scores = evaluate_models(trainer, engine, eval_loaders)
    doc = run_document(trainer, scores, step)  # every rank: the same numbers, no rank waits for one
    tag = {"student": trainer.eval_tag, "teacher": "teacher"}
    for split in doc["splits"]:
        for role in scores:
            r = model_result(doc, role, split)
            monitor.scalars({"mean_auroc": r["mean_auroc"], **{f"auroc/{k}": v for k, v in r["auroc"].items()}},
                            step, f"eval/{tag[role]}/{split}/")
    test = cfg.data.test_split
    names = {"teacher": f"{cfg.teacher.name} (teacher)", "student": cfg.student.name}
    roles = [m for m in ("teacher", "student") if m in scores]
    table = format_auroc_table({names[m]: model_result(doc, m, test) for m in roles}, manifest["label_names"])
    ci = model_result(doc, "student", test)["mean_auroc_ci95"]
    interval = f"; student mean AUROC 95% CI {fmt(ci[0])}-{fmt(ci[1])}" if ci else ""
    monitor.print(f"\nper-class AUROC on the '{test}' split (patient-disjoint, "
                  f"{doc['splits'][test]['samples']} images{interval}):\n{table}")
    monitor.text("eval/auroc_table", f"```\n{table}\n```", step)
    for line in split_warnings(manifest, (cfg.data.val_split, test)):  # small data: say what is undefined
        monitor.print(f"warning: {line}")
    if trainer.best.best is None:  # best/model.pt follows the validation mean AUROC
        monitor.print(f"warning: no best/model.pt was written: no validation of this run gave a mean AUROC "
                      f"on '{cfg.data.val_split}' (none ran, or the split lacks a positive or a negative "
                      f"of every class); final/model.pt is the trained student")
    if trainer.env.is_main:
        curves = {names[m]: {**scores[m][test], "auroc": model_result(doc, m, test)["auroc"]} for m in roles}
        monitor.figure("eval/roc_curves", roc_figure(curves, manifest["label_names"], f"ROC, '{test}' split"), step)
    student = engine.module.student
    if trainer.teacher is not None:  # what AT matches, for a few test images (all ranks: ZeRO-3 gathers)
        sample = next(iter(eval_loaders[test]))["image"][:4].to(engine.device)
        monitor.figure("eval/attention_maps", attention_figure(
            student, trainer.teacher.module, sample, trainer.run.student_dtype, trainer.run.teacher_dtype), step)

    trainer.ckpt.export(engine, "final/model.pt", model_meta(cfg, manifest, step, student.feature_indices))
    if trainer.env.is_main:
        write_outputs(trainer.run.dir, doc, scores)
        stages = trainer.run.stages
        monitor.hparams({"student": cfg.student.name, "teacher": cfg.teacher.name, "mode": cfg.run.mode,
                         "lr": cfg.train.lr, "stages": ",".join(s.name for s in stages),
                         "kd_weight": stages[-1].loss.kd_weight, "at_weight": stages[-1].loss.at_weight,
                         "sp_weight": stages[-1].loss.sp_weight},
                        {"hparams/test_mean_auroc": model_result(doc, "student", test)["mean_auroc"]})
        print(f"TensorBoard logs: {trainer.run.dir / 'tb'}   (tensorboard --logdir {trainer.run.dir})")
    return doc


def write_outputs(run_dir, doc: dict, scores: dict) -> None:
    """Predictions first (`predictions/<role>_<split>.npz`, what sweeps and comparisons pair), then
    metrics.json (atomically): metrics.json marks the run finished."""
    for role, per_split in scores.items():
        for split, s in per_split.items():
            save_predictions(run_dir / "predictions" / f"{role}_{split}.npz", s)
    write_metrics(run_dir / "metrics.json", doc)
