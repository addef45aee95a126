"""Classification metrics for multi-label (findings) and single-label (planes) tasks.

AUROC is computed per class from ranks (the Mann-Whitney U statistic, ties given half credit), which
equals `sklearn.metrics.roc_auc_score`. A class with no positives (or no negatives) in the evaluated
set has no AUROC: it is reported as None and left out of the macro mean, with a warning. (torchmetrics
returns 0.0 and averages it in; sklearn raises.)
"""
from __future__ import annotations

import warnings

import numpy as np


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties averaged (like scipy.stats.rankdata(method='average'))."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(sorted_x)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(x)]])
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0  # mean of ranks s+1 .. e
    return ranks


def auroc(scores: np.ndarray, targets: np.ndarray) -> float | None:
    """Area under the ROC curve of one class; None when only one class is present."""
    targets = np.asarray(targets).astype(bool)
    n_pos, n_neg = int(targets.sum()), int((~targets).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[targets].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def per_class_auroc(scores: np.ndarray, targets: np.ndarray) -> list[float | None]:
    """scores, targets: (n, C). One-vs-rest for single-label tasks."""
    return [auroc(scores[:, c], targets[:, c]) for c in range(scores.shape[1])]


def macro_mean(values, label_names=None, what: str = "AUROC") -> float | None:
    present = [v for v in values if v is not None]
    missing = [label_names[i] if label_names else str(i) for i, v in enumerate(values) if v is None]
    if missing:
        warnings.warn(f"{what} undefined for {missing} (no positives or no negatives in the evaluated "
                      f"set): reported as missing and left out of the mean", stacklevel=2)
    return float(np.mean(present)) if present else None


def classification_summary(probs: np.ndarray, targets: np.ndarray, label_names, multilabel: bool) -> dict:
    """Per-class AUROC, its macro mean, and accuracy for single-label tasks."""
    per_class = per_class_auroc(probs, targets)
    out = {"samples": int(probs.shape[0]),
           "auroc": dict(zip(label_names, per_class)),
           "mean_auroc": macro_mean(per_class, list(label_names)),
           "positives": dict(zip(label_names, targets.sum(0).astype(int).tolist()))}
    if not multilabel:
        out["accuracy"] = float((probs.argmax(1) == targets.argmax(1)).mean())
    return out


def format_auroc_table(columns: dict[str, dict], label_names) -> str:
    """A text table: one row per class, one column per model (e.g. teacher, student)."""
    names = list(columns)
    width = max(len(n) for n in label_names) + 2
    col = max(12, max(len(n) for n in names) + 2)
    lines = [f"{'class':<{width}}" + "".join(f"{n:>{col}}" for n in names)]
    for label in label_names:
        cells = [columns[n]["auroc"].get(label) for n in names]
        lines.append(f"{label:<{width}}" + "".join(f"{'missing' if v is None else f'{v:.3f}':>{col}}"
                                                   for v in cells))
    means = [columns[n]["mean_auroc"] for n in names]
    lines.append(f"{'mean AUROC':<{width}}" + "".join(f"{'-' if v is None else f'{v:.3f}':>{col}}"
                                                      for v in means))
    return "\n".join(lines)
