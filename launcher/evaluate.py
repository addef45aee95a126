"""Evaluate a student checkpoint (and its teacher, side by side) on one split of a shard set.

    python launcher/evaluate.py --checkpoint runs/student --shards shards/cxr     # run dir: final/model.pt
    python launcher/evaluate.py --checkpoint runs/student/final/model.pt --shards shards/cxr
    python launcher/evaluate.py --checkpoint runs/student/checkpoints --shards shards/cxr  # DeepSpeed
    python launcher/evaluate.py --checkpoint runs/student/checkpoints/main-e0010-s00001000 --shards ...
    deepspeed --num_gpus 2 launcher/evaluate.py --checkpoint runs/student --shards shards/cxr
    torchrun --nproc_per_node 2 launcher/evaluate.py --checkpoint runs/student --shards shards/cxr

A DeepSpeed checkpoint (ZeRO stage 1-3) is consolidated with DeepSpeed's own tool
(`deepspeed.utils.zero_to_fp32`); stage 0 keeps the whole module in `mp_rank_00_model_states.pt`.
The architecture then comes from the run's `config.yaml` and the label names from the shards'
manifest. Started by a distributed launcher, every rank scores its part of each split and
`engine.predict` gathers them and drops the padding repeats by sample id, so every sample is scored
exactly once and the numbers equal a single-process run; only rank 0 computes and writes.

Writes under --out (default: <run dir>/eval/<split>):
    metrics.json          per-class AUROC (+ bootstrap 95 % CI) and macro mean with CI, AUPRC,
                          sensitivity / specificity at the validation thresholds, ECE (15 bins),
                          accuracy and confusion matrix (single-label), for student [and teacher]
    thresholds.json       per-class Youden-J thresholds chosen on --val-split; also written next to
                          the model, where launcher/export.py picks them up
    roc_<split>.png, reliability_<split>.png, predictions/<model>_<split>.npz, tb/ (TensorBoard)
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from data_pipeline.loader_common import read_manifest
from launcher.config import ConfigError
from launcher.model_loading import (THRESHOLDS, CheckpointError, LoadedModel, _find_run_dir,
                                    _run_config, load_model, load_teacher, locate_checkpoint,
                                    resolve_teacher, write_thresholds)
from rmsnet import metrics as M
from rmsnet.calibration import expected_calibration_error

def split_semantics(manifest: dict, split: str) -> dict:
    """Is the split patient-disjoint from the others? From how the shard builder made it."""
    if "patient_disjoint" in manifest:  # an explicit statement wins
        return {"patient_disjoint": bool(manifest["patient_disjoint"]), "basis": "manifest.json"}
    options = manifest.get("dataset_options") or {}
    if manifest.get("dataset") == "csv" and not options.get("patient_column"):
        return {"patient_disjoint": False,
                "basis": "csv dataset built without --patient-column: every image was its own patient, "
                         "so splits are image-level and may share patients"}
    patients = manifest["splits"][split].get("patients")
    return {"patient_disjoint": True,
            "basis": f"data_pipeline.build_shards ({manifest.get('dataset')}): splits assigned by patient "
                     f"and every patient found in two splits rejected; '{split}' has {patients} patients"}


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


# ---------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True,
                   help="run directory, model.pt, or DeepSpeed checkpoint directory (or one tag of it)")
    p.add_argument("--shards", default=None, help="shard directory (default: the run config's data.shards)")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--val-split", default="val", help="split the thresholds are chosen on (default val)")
    p.add_argument("--out", default=None, help="output directory (default <run dir>/eval/<split>)")
    p.add_argument("--teacher", default=None,
                   help="teacher checkpoint (default: the run config's, if the file exists)")
    p.add_argument("--teacher-name", default=None, help="timm name of --teacher's architecture")
    p.add_argument("--no-teacher", action="store_true", help="evaluate the student only")
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--loader", choices=("auto", "dali", "torch"), default=None,
                   help="default: the run config's data.loader, else auto")
    p.add_argument("--num-threads", type=int, default=1, help="loader threads per rank")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed adds it
    return p.parse_args(argv)


def default_shards(checkpoint) -> str:
    """The run config's data.shards, for a checkpoint evaluated without --shards."""
    path = locate_checkpoint(checkpoint)[1]
    cfg = _run_config(_find_run_dir(path if path.is_dir() else path.parent))
    if cfg is None or not cfg.data.shards:
        raise ValueError(f"--shards is needed: no run config.yaml with data.shards found above {path}")
    return cfg.data.shards


def main(argv=None) -> int:
    args = parse_args(argv)
    try:  # everything a user can get wrong, before any process group starts
        shards = args.shards or default_shards(args.checkpoint)
        manifest = read_manifest(shards)
        for s in {args.split, args.val_split}:
            if s not in manifest["splits"]:
                raise ValueError(f"{shards}: manifest has no split {s!r} (has {sorted(manifest['splits'])})")
        loaded = load_model(args.checkpoint, manifest)
        spec = None if args.no_teacher else resolve_teacher(loaded, args.teacher, args.teacher_name)
        teacher = load_teacher(spec, len(manifest["label_names"])) if spec else None
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from data_pipeline.loader import build_loader
    from launcher.dist import barrier, init_distributed, launched_distributed, shutdown
    from launcher.engine import predict
    if launched_distributed():
        env = init_distributed()
        rank, world, device = env.rank, env.world_size, env.device
    else:  # a plain `python launcher/evaluate.py`: no process group at all
        rank, world = 0, 1
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = {"student": loaded.model.to(device)}
    if teacher is not None:
        models["teacher"] = teacher.to(device)
    backend = args.loader or (loaded.config.data.loader if loaded.config else "auto")

    preds = {}  # (model, split) -> (probs (n, C), targets (n, C), sids (n,)), the same on every rank
    for split in dict.fromkeys([args.val_split, args.split]):
        for name, model in models.items():  # one loader at a time: DALI wants each drained in turn
            loader = build_loader(shards, split, backend=backend, batch_size=args.batch_size,
                                  image_size=loaded.meta["image_size"], train=False, rank=rank,
                                  world_size=world, num_threads=args.num_threads, seed=0,
                                  device_id=device.index if device.type == "cuda" else None)
            preds[name, split] = predict(model.forward_logits, loader, device, manifest["multilabel"])

    if rank == 0:
        out = Path(args.out) if args.out else (loaded.run_dir or loaded.model_dir) / "eval" / args.split
        report(args, loaded, spec, manifest, shards, preds, out, world)
    barrier()
    shutdown()
    return 0


def report(args, loaded: LoadedModel, spec, manifest, shards, preds, out: Path, world: int) -> dict:
    """Rank 0: thresholds on validation, metrics on the split, JSON, figures, TensorBoard, table."""
    names, multilabel, split = manifest["label_names"], manifest["multilabel"], args.split
    roles = [m for m in ("student", "teacher") if (m, split) in preds]
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions").mkdir(exist_ok=True)
    summaries, replicate_means = {}, {}
    for m in roles:
        thresholds = choose_thresholds(preds[m, args.val_split], loaded, args.val_split, out,
                                       write=m == "student")
        p, t, sids = preds[m, split]
        np.savez_compressed(out / "predictions" / f"{m}_{split}.npz", sid=sids, probs=p, targets=t)
        replicates = M.bootstrap_auroc_replicates(p, t, args.bootstrap, args.seed)
        replicate_means[m] = M.replicate_means(replicates)
        summaries[m] = summarise(p, t, names, multilabel, thresholds, replicates, args.seed)
        summaries[m]["model"] = loaded.meta["arch"] if m == "student" else spec.name
        summaries[m]["checkpoint"] = loaded.source if m == "student" else str(spec.checkpoint)

    n = len(preds["student", split][0])
    if n != manifest["splits"][split]["samples"]:  # engine.predict's dedupe guarantees this
        raise RuntimeError(f"scored {n} samples of split {split!r}, the manifest lists "
                           f"{manifest['splits'][split]['samples']}")
    doc = {"split": split, **split_semantics(manifest, split), "val_split": args.val_split,
           "dataset": manifest.get("dataset"), "shards": str(Path(shards).resolve()), "samples": n,
           "world_size": world, "label_names": names, "multilabel": multilabel,
           "step": loaded.meta.get("step"), "thresholds_file": THRESHOLDS, **summaries}
    if "teacher" in summaries:  # paired: both models were scored on the same resamples
        s, t = summaries["student"]["mean_auroc"], summaries["teacher"]["mean_auroc"]
        doc["student_minus_teacher"] = {
            "mean_auroc": None if s is None or t is None else s - t,
            "ci95": M.percentile_interval(replicate_means["student"] - replicate_means["teacher"]),
            "method": "paired percentile bootstrap (same resamples for both models)"}

    labels = {m: f"{m} ({summaries[m]['model']})" for m in roles}
    figures = make_figures(preds, summaries, labels, doc)
    doc["figures"] = {}
    for kind, fig in figures.items():
        fig.savefig(out / f"{kind}_{split}.png", dpi=110)
        doc["figures"][kind] = f"{kind}_{split}.png"
    (out / "metrics.json").write_text(json.dumps(doc, indent=1))
    text = report_text(doc, summaries, labels)
    print(text, flush=True)
    log_tensorboard(out / "tb", summaries, figures, text, split, int(loaded.meta.get("step") or 0))
    print(f"wrote {out / 'metrics.json'}, figures, TensorBoard logs in {out / 'tb'}; "
          f"thresholds in {loaded.model_dir / THRESHOLDS}", flush=True)
    return doc


def choose_thresholds(val_pred, loaded: LoadedModel, val_split: str, out: Path, write: bool) -> list:
    """Youden thresholds per class on the validation predictions; the student's are written to
    `out` and next to the model (for export.py)."""
    probs, targets, _ = val_pred
    chosen = [M.youden_threshold(probs[:, c], targets[:, c]) for c in range(probs.shape[1])]
    thresholds, j = [t for t, _ in chosen], [v for _, v in chosen]
    if write:
        write_thresholds(out / THRESHOLDS, loaded, val_split, thresholds, j, len(probs))
        try:
            write_thresholds(loaded.model_dir / THRESHOLDS, loaded, val_split, thresholds, j, len(probs))
        except OSError as e:
            print(f"warning: cannot write thresholds next to the model ({e}); copy "
                  f"{out / THRESHOLDS} there for export.py", file=sys.stderr)
    return thresholds


def make_figures(preds, summaries: dict, labels: dict, doc: dict) -> dict:
    from launcher.plots import reliability_figure, roc_figure
    split = doc["split"]
    curves = {labels[m]: {"probs": preds[m, split][0], "targets": preds[m, split][1],
                          "auroc": summaries[m]["auroc"]} for m in labels}
    what = "predicted probability (every class)" if doc["multilabel"] else "top-1 confidence"
    calib = {labels[m]: {"bins": summaries[m]["calibration_bins"], "ece": summaries[m]["ece"], "what": what}
             for m in labels}
    disjoint = "patient-disjoint, " if doc["patient_disjoint"] else ""
    title = f"'{split}' split ({disjoint}{doc['samples']} images)"
    return {"roc": roc_figure(curves, doc["label_names"], f"ROC per class, {title}"),
            "reliability": reliability_figure(calib, f"Reliability (15 bins), {title}")}


def report_text(doc: dict, summaries: dict, labels: dict) -> str:
    """The per-class table of every model and one summary line each."""
    disjoint = "patient-disjoint" if doc["patient_disjoint"] else "NOT known to be patient-disjoint"
    lines = [f"per-class metrics on the '{doc['split']}' split ({disjoint}, {doc['samples']} images; "
             f"sensitivity/specificity at Youden thresholds from '{doc['val_split']}'):",
             M.format_metrics_table({labels[m]: summaries[m] for m in labels}, doc["label_names"])]
    for m in labels:
        s = summaries[m]
        lo, hi = s["mean_auroc_ci95"] or (None, None)
        extra = f", accuracy {s['accuracy']:.3f}" if "accuracy" in s else ""
        lines.append(f"{labels[m]}: mean AUROC {_fmt(s['mean_auroc'])} (95% CI {_fmt(lo)}-{_fmt(hi)}, "
                     f"{s['bootstrap']['reps']} resamples), mean AUPRC {_fmt(s['mean_auprc'])}, "
                     f"ECE {s['ece']:.4f}{extra}")
    if "student_minus_teacher" in doc:
        d = doc["student_minus_teacher"]
        lo, hi = d["ci95"] or (None, None)
        lines.append(f"student - teacher mean AUROC {_fmt(d['mean_auroc'], '+.3f')} "
                     f"(95% CI {_fmt(lo, '+.3f')} to {_fmt(hi, '+.3f')})")
    return "\n".join(lines)


def log_tensorboard(log_dir: Path, summaries: dict, figures: dict, text: str, split: str,
                    step: int) -> None:
    from launcher.monitor import Monitor
    monitor = Monitor(log_dir)
    for m, s in summaries.items():
        values = {"mean_auroc": s["mean_auroc"], "mean_auprc": s["mean_auprc"], "ece": s["ece"],
                  "accuracy": s.get("accuracy")}
        if s["mean_auroc_ci95"]:
            values["mean_auroc_ci95_low"], values["mean_auroc_ci95_high"] = s["mean_auroc_ci95"]
        for key in ("auroc", "auprc", "sensitivity", "specificity"):
            values.update({f"{key}/{c}": v for c, v in s[key].items()})
        monitor.scalars(values, step, f"eval/{m}/{split}/")
    for kind, fig in figures.items():
        monitor.figure(f"eval/{split}/{kind}", fig, step)  # closes the figure
    monitor.text(f"eval/{split}/table", f"```\n{text}\n```", step)
    monitor.close()


def _fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


if __name__ == "__main__":
    sys.exit(main())
