"""Classification metrics for multi-label (findings) and single-label (planes) tasks.

AUROC is computed per class from ranks (the Mann-Whitney U statistic, ties given half credit), which
equals `sklearn.metrics.roc_auc_score`. A class with no positives (or no negatives) in the evaluated
set has no AUROC: it is reported as None and left out of the macro mean, with a warning. (torchmetrics
returns 0.0 and averages it in; sklearn raises.)

Also here (all numpy, no torch): AUPRC as average precision (= `sklearn.metrics.average_precision_score`:
sum over distinct thresholds of (R_k - R_{k-1}) P_k, no interpolation); ROC points; thresholds by
Youden's J (max TPR - FPR, Youden 1950) and sensitivity / specificity at a threshold; a percentile
bootstrap of per-class and macro-mean AUROC; the confusion matrix of single-label tasks. Scores are
probabilities; a sample is called positive when its score is >= the threshold.
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


# ------------------------------------------------------------------ curves, AUPRC, thresholds
def _descending_groups(scores: np.ndarray, targets: np.ndarray):
    """Cumulative true / false positives at every distinct threshold, highest first.

    Returns (thresholds (k,), tps (k,), fps (k,)): calling every score >= thresholds[i] positive
    gives tps[i] true and fps[i] false positives (tied scores enter together).
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(targets).astype(bool)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each tie group
    tps = np.cumsum(y)[last]
    return s[last], tps, (last + 1) - tps


def roc_points(scores: np.ndarray, targets: np.ndarray):
    """(fpr, tpr, thresholds) at every distinct score, starting from (0, 0) with threshold +inf
    (the points of `sklearn.metrics.roc_curve(..., drop_intermediate=False)`); None when one-sided."""
    thr, tps, fps = _descending_groups(scores, targets)
    n_pos, n_neg = tps[-1], fps[-1]
    if n_pos == 0 or n_neg == 0:
        return None
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos], np.r_[np.inf, thr]


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float | None:
    """AUPRC as average precision, sum_k (R_k - R_{k-1}) P_k over distinct thresholds (highest
    first): equal to `sklearn.metrics.average_precision_score`. None when there are no positives."""
    _, tps, fps = _descending_groups(scores, targets)
    if tps[-1] == 0:
        return None
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def per_class_average_precision(scores: np.ndarray, targets: np.ndarray) -> list[float | None]:
    return [average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])]


def youden_threshold(scores: np.ndarray, targets: np.ndarray) -> tuple[float, float] | tuple[None, None]:
    """(threshold, J) maximising Youden's J = sensitivity + specificity - 1 = TPR - FPR.

    Candidates are the observed scores (the +inf "nothing positive" point is excluded, so a
    threshold is always a number); on ties in J the highest threshold wins (fewest positives).
    (None, None) when the class has no positives or no negatives.
    """
    pts = roc_points(scores, targets)
    if pts is None:
        return None, None
    fpr, tpr, thr = (a[1:] for a in pts)
    j = tpr - fpr
    i = int(np.argmax(j))  # first maximum = highest threshold
    return float(thr[i]), float(j[i])


def sensitivity_specificity(scores: np.ndarray, targets: np.ndarray,
                            threshold: float | None) -> tuple[float | None, float | None]:
    """Sensitivity TP/P and specificity TN/N with `score >= threshold` called positive; each is None
    when its denominator is empty (or when there is no threshold)."""
    if threshold is None:
        return None, None
    y = np.asarray(targets).astype(bool)
    pred = np.asarray(scores, dtype=np.float64) >= threshold
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    sens = float((pred & y).sum() / n_pos) if n_pos else None
    spec = float((~pred & ~y).sum() / n_neg) if n_neg else None
    return sens, spec


def confusion_matrix(true_class: np.ndarray, predicted_class: np.ndarray, classes: int) -> np.ndarray:
    """(classes, classes) counts: row = true class, column = predicted class."""
    m = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(m, (np.asarray(true_class), np.asarray(predicted_class)), 1)
    return m


# ------------------------------------------------------------------------------------ bootstrap
BOOTSTRAP_CHUNK = 50  # resamples drawn and scored together (memory: CHUNK x n floats)


def bootstrap_resamples(n: int, reps: int, seed: int):
    """Index arrays (k, n) of resamples with replacement, in chunks; fixed by (n, reps, seed)."""
    rng = np.random.default_rng(seed)
    for start in range(0, reps, BOOTSTRAP_CHUNK):
        yield rng.integers(0, n, size=(min(BOOTSTRAP_CHUNK, reps - start), n))


def bootstrap_auroc_replicates(scores: np.ndarray, targets: np.ndarray, reps: int = 1000,
                               seed: int = 0) -> np.ndarray:
    """Per-class AUROC of `reps` resamples of the rows (with replacement): (reps, C), NaN where a
    resample lacks positives or negatives of a class. Scored exactly by `weighted_auroc`."""
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.shape[0]
    ranked = RankedScores(scores, targets)
    out = np.full((reps, scores.shape[1]), np.nan)
    row = 0
    for idx in bootstrap_resamples(n, reps, seed):
        k = idx.shape[0]
        out[row:row + k] = ranked.weighted_auroc(resample_counts(idx, n))
        row += k
    return out


def resample_counts(idx: np.ndarray, n: int) -> np.ndarray:
    """(k, n) index arrays of resamples -> (k, n) float counts: how often each row was drawn."""
    k = idx.shape[0]
    offsets = (idx + n * np.arange(k)[:, None]).ravel()
    return np.bincount(offsets, minlength=k * n).reshape(k, n).astype(np.float64)


class RankedScores:
    """Scores sorted once per class, for exact AUROC under many weightings of the rows.

    A resample is a count w_i per original sample; with the scores sorted once per class,
    AUROC = sum_g P_g (N_below_g + N_g / 2) / (P N) over tie groups g of weighted positives P_g and
    negatives N_g (ties get half credit, as `auroc`), without re-sorting. Vectorised over a chunk
    of weightings.
    """

    def __init__(self, scores: np.ndarray, targets: np.ndarray):
        scores = np.asarray(scores, dtype=np.float64)
        targets = np.asarray(targets).astype(bool)
        self.classes = scores.shape[1]
        self.prepared = []
        for c in range(self.classes):
            order = np.argsort(scores[:, c], kind="mergesort")
            starts = np.r_[0, np.flatnonzero(np.diff(scores[order, c])) + 1]  # tie groups, ascending
            self.prepared.append((order, targets[order, c], starts))

    def weighted_auroc(self, counts: np.ndarray) -> np.ndarray:
        """counts (k, n) -> per-class AUROC (k, C); NaN where a weighting has no positives or no
        negatives of a class."""
        out = np.full((counts.shape[0], self.classes), np.nan)
        for c, (order, pos_mask, starts) in enumerate(self.prepared):
            w = counts[:, order]  # (k, n) in ascending score order
            pos = np.add.reduceat(w * pos_mask, starts, axis=1)  # (k, groups)
            neg = np.add.reduceat(w * ~pos_mask, starts, axis=1)
            below = np.cumsum(neg, axis=1) - neg
            p_tot, n_tot = pos.sum(1), neg.sum(1)
            ok = (p_tot > 0) & (n_tot > 0)
            u = (pos * (below + 0.5 * neg)).sum(1)
            out[:, c] = np.where(ok, u / np.where(ok, p_tot * n_tot, 1.0), np.nan)
        return out


def replicate_means(replicates: np.ndarray) -> np.ndarray:
    """Macro mean of each resample over the classes it has (NaN when it has none)."""
    present = ~np.isnan(replicates)
    counts = present.sum(1)
    sums = np.where(present, replicates, 0.0).sum(1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> list[float] | None:
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return None
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def bootstrap_auroc(scores: np.ndarray, targets: np.ndarray, reps: int = 1000, seed: int = 0,
                    level: float = 0.95) -> dict:
    """Percentile bootstrap intervals of per-class AUROC and of their macro mean.

    Samples are resampled with replacement (seeded: the same seed gives the same intervals); a
    class without both labels in a resample is skipped for that resample, and the resample's mean
    is taken over the classes it has.
    """
    return summarise_bootstrap(bootstrap_auroc_replicates(scores, targets, reps, seed), seed, level)


def summarise_bootstrap(replicates: np.ndarray, seed: int, level: float = 0.95) -> dict:
    """Intervals from `bootstrap_auroc_replicates` output (see `bootstrap_auroc`)."""
    means = replicate_means(replicates)
    return {"mean_auroc_ci95": percentile_interval(means, level),
            "auroc_ci95": [percentile_interval(replicates[:, c], level) for c in range(replicates.shape[1])],
            "reps": int(replicates.shape[0]), "reps_used": int((~np.isnan(means)).sum()),
            "seed": int(seed), "level": level, "method": "percentile bootstrap over samples"}


# ---------------------------------------------------------------------------------- text tables
def _cell(v, width: int) -> str:
    return f"{'-' if v is None else f'{v:.3f}':>{width}}"


def format_metrics_table(columns: dict[str, dict], label_names) -> str:
    """Per-class AUROC, AUPRC, sensitivity and specificity, one block of four columns per model.

    columns: name -> a summary with dicts `auroc`, `auprc`, `sensitivity`, `specificity` keyed by
    class name and `mean_auroc` / `mean_auprc`. Missing values print as '-'.
    """
    names = list(columns)
    width = max(12, max(len(n) for n in label_names) + 2)
    fields = (("auroc", "AUROC"), ("auprc", "AUPRC"), ("sensitivity", "sens"), ("specificity", "spec"))
    block = 8 * len(fields) + 3
    head1 = f"{'':<{width}}" + "".join(f"{n[:block - 3]:^{block - 3}} | " for n in names)
    head2 = f"{'class':<{width}}" + "".join("".join(f"{t:>8}" for _, t in fields) + " | " for _ in names)
    lines = [head1.rstrip(" |"), head2.rstrip(" |")]
    for label in label_names:
        lines.append((f"{label:<{width}}" + "".join(
            "".join(_cell(columns[n].get(k, {}).get(label), 8) for k, _ in fields) + " | "
            for n in names)).rstrip(" |"))
    lines.append((f"{'macro mean':<{width}}" + "".join(
        _cell(columns[n].get("mean_auroc"), 8) + _cell(columns[n].get("mean_auprc"), 8) + " " * 16 + " | "
        for n in names)).rstrip(" |"))
    return "\n".join(lines)
