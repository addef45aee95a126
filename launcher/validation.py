"""Evaluation during and after training: scores, best-checkpoint tracking, early stopping.

Every evaluation is distributed and scores each sample exactly once (`engine.predict` drops the
padded duplicates by sample id), so the numbers equal a single-process pass over the same shards.
The best student by validation mean AUROC is exported to `best/model.pt` (with the epoch and
score in its metadata and in `best/score.json`, which a resumed run reads back).
"""
from __future__ import annotations

import json
import os
from pathlib import Path


from launcher.checkpoints import export_student
from launcher.engine import predict
from rmsnet.metrics import classification_summary


def evaluate_split(forward_logits, loader, device, manifest, dtype, scores: dict | None = None) -> dict:
    """Per-class AUROC & co. of one split, every sample scored exactly once, on every rank;
    `scores`, when given, receives the probs, targets and sample ids (sid) it was computed from."""
    probs, targets, sids = predict(lambda x: forward_logits(x.to(dtype)), loader, device,
                                   manifest["multilabel"])
    if scores is not None:
        scores.update(probs=probs, targets=targets, sid=sids)
    return classification_summary(probs, targets, manifest["label_names"], manifest["multilabel"])


def save_predictions(path: Path, scores: dict) -> None:
    """One model's scores on one split (sid, probs, targets), atomically: what sweeps compare."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part.npz")
    np.savez_compressed(tmp, sid=scores["sid"], probs=scores["probs"], targets=scores["targets"])
    os.replace(tmp, path)


class BestTracker:
    """Keeps the best validation mean AUROC, exports that student, counts epochs without gain."""

    def __init__(self, run_dir: Path, patience: int, is_main: bool):
        self.dir, self.patience, self.is_main = Path(run_dir) / "best", patience, is_main
        score = self.dir / "score.json"
        state = json.loads(score.read_text()) if score.is_file() else {}
        self.best = state.get("mean_auroc")
        self.bad_epochs = state.get("bad_epochs", 0)

    def update(self, engine, score: float | None, meta: dict) -> bool:
        """Record one validation score; returns True when training should stop early."""
        if score is not None and (self.best is None or score > self.best):
            self.best, self.bad_epochs = score, 0
            export_student(engine, self.dir / "model.pt", {**meta, "val_mean_auroc": score}, self.is_main)
        else:
            self.bad_epochs += 1
        if self.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / "score.json.part"
            tmp.write_text(json.dumps({"mean_auroc": self.best, "bad_epochs": self.bad_epochs,
                                       **{k: meta[k] for k in ("stage", "epoch", "step") if k in meta}}))
            os.replace(tmp, self.dir / "score.json")
        return self.patience > 0 and self.bad_epochs >= self.patience
