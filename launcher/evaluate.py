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
import os
import sys
from pathlib import Path

import numpy as np
import torch

from data_pipeline.cli import add_debug_flag, run_cli
from data_pipeline.manifest import read_manifest
from data_pipeline.read_checks import DamagedSample, DamagedShard
from launcher.config import ConfigError
from launcher.model_loading import (THRESHOLDS, CheckpointError, LoadedModel, _find_run_dir,
                                    _run_config, load_model, load_teacher, locate_checkpoint,
                                    resolve_teacher, write_thresholds)
from launcher.run_lock import RunDirLocked, RunLock
from launcher.metrics_doc import (metrics_document, report_text, split_report, write_metrics,
                                  youden_thresholds)

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
    p.add_argument("--verify", choices=("sha256", "size", "none"), default=None,
                   help="check the shards against the manifest first (default: the run config's "
                        "data.verify, else sha256)")
    p.add_argument("--on-damaged", choices=("stop", "skip"), default=None,
                   help="a damaged sample stops the evaluation, or is skipped and counted (default: "
                        "the run config's data.on_damaged, else stop)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed adds it
    add_debug_flag(p)
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
        lock = None  # rank 0 writes into the run directory (thresholds, eval/): one writer at a time
        if loaded.run_dir is not None and os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
            lock = RunLock(loaded.run_dir, "evaluate.py").acquire()
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError, RunDirLocked) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        return evaluate(args, shards, manifest, loaded, spec, teacher)
    finally:
        if lock is not None:
            lock.release()


def evaluate(args, shards, manifest, loaded: LoadedModel, spec, teacher) -> int:
    """Score the splits (every rank its part), report on rank 0."""
    from launcher.dist import barrier, init_distributed, launched_distributed, shutdown
    if launched_distributed():
        env = init_distributed()
        rank, world, device = env.rank, env.world_size, env.device
    else:  # a plain `python launcher/evaluate.py`: no process group at all
        rank, world = 0, 1
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        preds, skipped = score(args, shards, manifest, loaded, teacher, rank, world, device)
    except (DamagedShard, DamagedSample) as e:  # raised on every rank together
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        barrier()
        shutdown()
        return 2
    if rank == 0:
        out = Path(args.out) if args.out else (loaded.run_dir or loaded.model_dir) / "eval" / args.split
        report(args, loaded, spec, manifest, shards, (preds, skipped), out, world)
    barrier()
    shutdown()
    return 0


def score(args, shards, manifest, loaded: LoadedModel, teacher, rank: int, world: int, device):
    """((model, split) -> (probs, targets, sids), the damaged samples left out) on every rank,
    after the shards are checked; collective (launcher/read_faults.py)."""
    from data_pipeline.loader import build_loader
    from launcher.engine import predict
    from launcher.read_faults import agreed_loader, check_shards, cpu_group

    splits = list(dict.fromkeys([args.val_split, args.split]))
    config = loaded.config.data if loaded.config else None
    skipped = check_shards(shards, manifest, splits, args.verify or (config.verify if config else "sha256"),
                           rank, world, args.on_damaged or (config.on_damaged if config else "stop"))
    if rank == 0:
        for line in skipped.report(splits, None):
            print(line, flush=True)
    group = cpu_group()
    models = {"student": loaded.model.to(device)}
    if teacher is not None:
        models["teacher"] = teacher.to(device)
    backend = args.loader or (loaded.config.data.loader if loaded.config else "auto")

    preds = {}  # (model, split) -> (probs (n, C), targets (n, C), sids (n,)), the same on every rank
    for split in splits:
        for name, model in models.items():  # one loader at a time: DALI wants each drained in turn
            loader = agreed_loader(lambda: build_loader(
                shards, split, backend=backend, batch_size=args.batch_size,
                image_size=loaded.meta["image_size"], train=False, rank=rank, world_size=world,
                num_threads=args.num_threads, seed=0, skip=skipped.keys(split),
                device_id=device.index if device.type == "cuda" else None), group)
            preds[name, split] = predict(model.forward_logits, loader, device, manifest["multilabel"])
    return preds, skipped


def report(args, loaded: LoadedModel, spec, manifest, shards, scored, out: Path, world: int) -> dict:
    """Rank 0: thresholds on validation, metrics on the split, JSON, figures, TensorBoard, table.
    `scored` = `score`'s (predictions, skipped samples)."""
    (preds, skipped), split = scored, args.split
    roles = [m for m in ("student", "teacher") if (m, split) in preds]
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions").mkdir(exist_ok=True)
    n, listed = len(preds["student", split][0]), manifest["splits"][split]["samples"]
    if n != listed - skipped.count(split):  # engine.predict's dedupe guarantees this
        raise RuntimeError(f"scored {n} samples of split {split!r}, the manifest lists {listed}"
                           + (f" and {skipped.count(split)} were skipped" if skipped.count(split) else ""))
    thresholds = {m: choose_thresholds(preds[m, args.val_split], loaded, args.val_split, out,
                                       write=m == "student") for m in roles}
    for m in roles:
        p, t, sids = preds[m, split]
        np.savez_compressed(out / "predictions" / f"{m}_{split}.npz", sid=sids, probs=p, targets=t)
    models = {"student": {"model": loaded.meta["arch"], "checkpoint": loaded.source}}
    if "teacher" in roles:
        models["teacher"] = {"model": spec.name, "checkpoint": str(spec.checkpoint)}
    entry = split_report(manifest, split, {m: preds[m, split][:2] for m in roles}, thresholds, models,
                         args.bootstrap, args.seed)
    doc = metrics_document("launcher/evaluate.py", manifest, shards, loaded.meta.get("step"), world,
                           args.val_split, {split: entry})
    doc["thresholds_file"] = THRESHOLDS
    if skipped.scanned:
        doc["skipped_samples"] = skipped.document(list(dict.fromkeys([args.val_split, split])))

    labels = {m: f"{m} ({entry['models'][m]['model']})" for m in roles}
    figures = make_figures(preds, doc, split, labels)
    entry["figures"] = {}
    for kind, fig in figures.items():
        fig.savefig(out / f"{kind}_{split}.png", dpi=110)
        entry["figures"][kind] = f"{kind}_{split}.png"
    write_metrics(out / "metrics.json", doc)
    text = report_text(doc, split, labels)
    print(text, flush=True)
    log_tensorboard(out / "tb", entry["models"], figures, text, split, int(loaded.meta.get("step") or 0))
    print(f"wrote {out / 'metrics.json'}, figures, TensorBoard logs in {out / 'tb'}; "
          f"thresholds in {loaded.model_dir / THRESHOLDS}", flush=True)
    return doc


def choose_thresholds(val_pred, loaded: LoadedModel, val_split: str, out: Path, write: bool) -> list:
    """Youden thresholds per class on the validation predictions; the student's are written to
    `out` and next to the model (for export.py)."""
    probs, targets, _ = val_pred
    thresholds, j = youden_thresholds(probs, targets)
    if write:
        write_thresholds(out / THRESHOLDS, loaded, val_split, thresholds, j, len(probs))
        try:
            write_thresholds(loaded.model_dir / THRESHOLDS, loaded, val_split, thresholds, j, len(probs))
        except OSError as e:
            print(f"warning: cannot write thresholds next to the model ({e}); copy "
                  f"{out / THRESHOLDS} there for export.py", file=sys.stderr)
    return thresholds


def make_figures(preds, doc: dict, split: str, labels: dict) -> dict:
    from launcher.plots import reliability_figure, roc_figure
    entry = doc["splits"][split]
    summaries = entry["models"]
    curves = {labels[m]: {"probs": preds[m, split][0], "targets": preds[m, split][1],
                          "auroc": summaries[m]["auroc"]} for m in labels}
    what = "predicted probability (every class)" if doc["multilabel"] else "top-1 confidence"
    calib = {labels[m]: {"bins": summaries[m]["calibration_bins"], "ece": summaries[m]["ece"], "what": what}
             for m in labels}
    disjoint = "patient-disjoint, " if entry["patient_disjoint"] else ""
    title = f"'{split}' split ({disjoint}{entry['samples']} images)"
    return {"roc": roc_figure(curves, doc["label_names"], f"ROC per class, {title}"),
            "reliability": reliability_figure(calib, f"Reliability (15 bins), {title}")}


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


if __name__ == "__main__":
    sys.exit(run_cli(main))
