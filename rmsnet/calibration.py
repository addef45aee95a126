"""Calibration: expected calibration error and the bins of a reliability diagram.

ECE (Naeini et al. 2015; Guo et al., "On Calibration of Modern Neural Networks", ICML 2017): split
the confidences into M equal-width bins B_m of [0, 1] and take

    ECE = sum_m |B_m| / n * | acc(B_m) - conf(B_m) |

with acc the fraction of correct outcomes and conf the mean confidence in the bin. Bin m is
(m/M, (m+1)/M], except that the first bin also takes 0 (Guo et al.'s convention). M = 15 here.

What is a "confidence" and a "correct outcome" depends on the task:
* multi-label (independent sigmoids): every class probability of every sample is one prediction of
  "this finding is present"; the outcome is the label (n * C predictions in all);
* single-label (softmax): the top-1 probability, and whether the top-1 class is the label.
"""
from __future__ import annotations

import numpy as np

__all__ = ["calibration_inputs", "reliability_bins", "expected_calibration_error"]

N_BINS = 15


def calibration_inputs(probs: np.ndarray, targets: np.ndarray, multilabel: bool):
    """(confidence, outcome) as flat float arrays, as described in the module docstring."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets)
    if multilabel:
        return probs.ravel(), (targets > 0.5).astype(np.float64).ravel()
    top = probs.argmax(1)
    return probs.max(1), (top == targets.argmax(1)).astype(np.float64)


def reliability_bins(confidence: np.ndarray, outcome: np.ndarray, n_bins: int = N_BINS) -> dict:
    """Per bin: edges, sample count, mean confidence and accuracy (None in an empty bin)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    outcome = np.asarray(outcome, dtype=np.float64)
    if confidence.shape != outcome.shape:
        raise ValueError(f"confidence {confidence.shape} and outcome {outcome.shape} differ in shape")
    if confidence.size and (confidence.min() < 0 or confidence.max() > 1):
        raise ValueError("confidences must lie in [0, 1] (probabilities, not logits)")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # number of inner edges strictly below the value: bin m = (e_m, e_{m+1}], with 0 in bin 0
    which = np.searchsorted(edges[1:-1], confidence, side="left")
    counts = np.bincount(which, minlength=n_bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(which, weights=outcome, minlength=n_bins)
    nonempty = counts > 0
    mean_conf = np.where(nonempty, conf_sum / np.maximum(counts, 1), np.nan)
    accuracy = np.where(nonempty, acc_sum / np.maximum(counts, 1), np.nan)
    return {"edges": edges.tolist(), "count": counts.astype(int).tolist(),
            "confidence": [None if np.isnan(v) else float(v) for v in mean_conf],
            "accuracy": [None if np.isnan(v) else float(v) for v in accuracy]}


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, multilabel: bool,
                               n_bins: int = N_BINS) -> tuple[float, dict]:
    """(ECE, reliability bins) of a model's probabilities on a labelled set."""
    confidence, outcome = calibration_inputs(probs, targets, multilabel)
    bins = reliability_bins(confidence, outcome, n_bins)
    n = max(len(confidence), 1)
    ece = sum(c / n * abs(a - m) for c, a, m in zip(bins["count"], bins["accuracy"], bins["confidence"])
              if c > 0)
    return float(ece), bins
