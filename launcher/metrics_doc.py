"""metrics.json: one format for the end of a training run (launcher/report.py) and for
launcher/evaluate.py, built here and read through `model_result`.

    {"format": 1, "written_by": "launcher/distill.py" | "launcher/evaluate.py",
     "dataset", "shards", "label_names", "multilabel", "step", "world_size",
     "thresholds": {"chosen_on": <val split>, "rule": ...},
     "splits": {<split>: {"samples", "patient_disjoint", "basis",
                          "models": {"student": <summary>, "teacher": <summary>},
                          "student_minus_teacher": {"mean_auroc", "ci95", "method"}}},
     "skipped_samples": {"counts": {<split>: n}, "samples": [...], "shards_changed": [...]}}
                                   (present when data.on_damaged / --on-damaged is skip)

A training run reports its validation and test splits, evaluate.py the split it was asked for
(evaluate.py adds `thresholds_file` and, per split, `figures`). A model's summary (`summarise`):
per-class AUROC with bootstrap 95 % intervals, the macro mean with its interval, AUPRC,
sensitivity and specificity at the per-class Youden thresholds chosen on the validation split,
expected calibration error, and for single-label tasks accuracy and the confusion matrix.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np

from data_pipeline.manifest import MANIFEST
from rmsnet import metrics as M
from rmsnet.calibration import expected_calibration_error

FORMAT = 1
THRESHOLD_RULE = "per class, Youden's J (sensitivity + specificity - 1) maximised"
PAIRED = "paired percentile bootstrap (same resamples for both models)"


def split_semantics(manifest: dict, split: str) -> dict:
    """Is the split patient-disjoint from the others? From how the shard builder made it."""
    if "patient_disjoint" in manifest:  # an explicit statement wins
        return {"patient_disjoint": bool(manifest["patient_disjoint"]), "basis": MANIFEST}
    options = manifest.get("dataset_options") or {}
    if manifest.get("dataset") == "csv" and not options.get("patient_column"):
        return {"patient_disjoint": False,
                "basis": "csv dataset built without --patient-column: every image was its own patient, "
                         "so splits are image-level and may share patients"}
    patients = manifest["splits"][split].get("patients")
    return {"patient_disjoint": True,
            "basis": f"data_pipeline.build_shards ({manifest.get('dataset')}): splits assigned by patient "
                     f"and every patient found in two splits rejected; '{split}' has {patients} patients"}


def youden_thresholds(probs: np.ndarray, targets: np.ndarray) -> tuple[list, list]:
    """(per-class thresholds, their Youden J) on validation predictions; None where a class lacks
    positives or negatives."""
    chosen = [M.youden_threshold(probs[:, c], targets[:, c]) for c in range(probs.shape[1])]
    return [t for t, _ in chosen], [j for _, j in chosen]


def summarise(probs, targets, label_names, multilabel: bool, thresholds, replicates, seed: int) -> dict:
    """Every number metrics.json reports for one model on one split."""
    base = M.classification_summary(probs, targets, label_names, multilabel)  # warns on missing classes
    boot = M.summarise_bootstrap(replicates, seed)
    ap = M.per_class_average_precision(probs, targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the AUROC warning above already named the classes
        mean_ap = M.macro_mean(ap, list(label_names), "AUPRC")
    sens_spec = [M.sensitivity_specificity(probs[:, c], targets[:, c], thresholds[c] if thresholds else None)
                 for c in range(len(label_names))]
    ece, bins = expected_calibration_error(probs, targets, multilabel)
    out = {"samples": base["samples"], "positives": base["positives"],
           "missing_classes": [n for n, v in base["auroc"].items() if v is None],
           "auroc": base["auroc"], "auroc_ci95": dict(zip(label_names, boot["auroc_ci95"])),
           "mean_auroc": base["mean_auroc"], "mean_auroc_ci95": boot["mean_auroc_ci95"],
           "bootstrap": {k: boot[k] for k in ("reps", "reps_used", "seed", "level", "method")},
           "auprc": dict(zip(label_names, ap)), "mean_auprc": mean_ap,
           "thresholds": dict(zip(label_names, thresholds)) if thresholds else None,
           "sensitivity": dict(zip(label_names, [s for s, _ in sens_spec])),
           "specificity": dict(zip(label_names, [s for _, s in sens_spec])),
           "ece": ece, "ece_over": "every class probability (n x C)" if multilabel else "top-1 confidence",
           "calibration_bins": bins}
    if not multilabel:
        out["accuracy"] = base["accuracy"]
        cm = M.confusion_matrix(targets.argmax(1), probs.argmax(1), len(label_names))
        out["confusion_matrix"] = {"rows": "true class", "columns": "predicted class (argmax)",
                                   "labels": list(label_names), "counts": cm.tolist()}
    return out


def split_report(manifest: dict, split: str, scores: dict, thresholds: dict, models: dict,
                 reps: int = 1000, seed: int = 0) -> dict:
    """One split's entry. `scores[role]` = (probs, targets) of that role's model on the split,
    `thresholds[role]` its per-class thresholds (or None), `models[role]` = {"model", "checkpoint"}.
    With a teacher, both are scored on the same resamples, so their difference is paired."""
    entry = {"samples": None, **split_semantics(manifest, split), "models": {}}
    replicate_means = {}
    for role, (probs, targets) in scores.items():
        replicates = M.bootstrap_auroc_replicates(probs, targets, reps, seed)
        replicate_means[role] = M.replicate_means(replicates)
        entry["models"][role] = {**summarise(probs, targets, manifest["label_names"], manifest["multilabel"],
                                             thresholds.get(role), replicates, seed), **models[role]}
        entry["samples"] = int(len(probs))
    if "student" in scores and "teacher" in scores:
        s, t = (entry["models"][r]["mean_auroc"] for r in ("student", "teacher"))
        entry["student_minus_teacher"] = {
            "mean_auroc": None if s is None or t is None else s - t,
            "ci95": M.percentile_interval(replicate_means["student"] - replicate_means["teacher"]),
            "method": PAIRED}
    return entry


def metrics_document(written_by: str, manifest: dict, shards, step, world_size: int, val_split: str,
                     splits: dict) -> dict:
    """The whole metrics.json from its split entries (`split_report`)."""
    return {"format": FORMAT, "written_by": written_by, "dataset": manifest.get("dataset"),
            "shards": str(Path(shards).resolve()) if shards else None,
            "label_names": list(manifest["label_names"]), "multilabel": manifest["multilabel"],
            "step": step, "world_size": world_size,
            "thresholds": {"chosen_on": val_split, "rule": THRESHOLD_RULE}, "splits": splits}


def write_metrics(path: Path, doc: dict) -> None:
    """Atomically (a reader sees the old document or the new one): for a run, its presence marks
    the run finished."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def read_metrics(path: Path) -> dict:
    """A metrics.json of this format, or ValueError naming the file and what is wrong."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable metrics.json ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("splits"), dict):
        raise ValueError(f"{path}: not a metrics.json of format {FORMAT} (written by launcher/distill.py "
                         f"or launcher/evaluate.py; rerun launcher/evaluate.py to rewrite it)")
    return doc


def model_result(doc: dict, role: str, split: str) -> dict | None:
    """The summary of `role` ("student" or "teacher") on `split`, or None when not reported."""
    return ((doc.get("splits") or {}).get(split) or {}).get("models", {}).get(role)


def report_text(doc: dict, split: str, labels: dict) -> str:
    """The per-class table of every model on `split` and one summary line each. `labels`: role ->
    the name to print."""
    entry = doc["splits"][split]
    summaries = entry["models"]
    disjoint = "patient-disjoint" if entry["patient_disjoint"] else "NOT known to be patient-disjoint"
    lines = [f"per-class metrics on the '{split}' split ({disjoint}, {entry['samples']} images; "
             f"sensitivity/specificity at Youden thresholds from '{doc['thresholds']['chosen_on']}'):",
             M.format_metrics_table({labels[m]: summaries[m] for m in labels}, doc["label_names"])]
    for m in labels:
        s = summaries[m]
        lo, hi = s["mean_auroc_ci95"] or (None, None)
        extra = f", accuracy {s['accuracy']:.3f}" if "accuracy" in s else ""
        lines.append(f"{labels[m]}: mean AUROC {fmt(s['mean_auroc'])} (95% CI {fmt(lo)}-{fmt(hi)}, "
                     f"{s['bootstrap']['reps']} resamples), mean AUPRC {fmt(s['mean_auprc'])}, "
                     f"ECE {s['ece']:.4f}{extra}")
    if "student_minus_teacher" in entry:
        d = entry["student_minus_teacher"]
        lo, hi = d["ci95"] or (None, None)
        lines.append(f"student - teacher mean AUROC {fmt(d['mean_auroc'], '+.3f')} "
                     f"(95% CI {fmt(lo, '+.3f')} to {fmt(hi, '+.3f')})")
    return "\n".join(lines)


def fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)
