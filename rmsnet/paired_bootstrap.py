"""Paired comparison of two training recipes over seeds and test patients.

A claim "recipe A beats recipe B" has two sources of noise: which test patients happened to be in
the test set, and which seed (initialisation, data order, augmentation) each run drew. This
bootstrap resamples both, and keeps the comparison paired:

* the runs are paired by seed (A and B with seed s saw the same data order and initial draw where
  the recipes allow), and both arms are scored on the *same* resample of patients;
* a patient is the resampling unit (images of one patient are correlated: resampling images would
  understate the spread), so one replicate draws P patients with replacement from the P test
  patients and weights every image by how often its patient was drawn;
* the seeds are resampled too: one replicate draws S seeds with replacement from the S paired seeds.

Replicate r: diff_r = mean over the drawn seeds s of [meanAUROC(A_s, w_r) - meanAUROC(B_s, w_r)],
where meanAUROC is the macro mean over the classes that have positives and negatives in that
resample (as `rmsnet.metrics.replicate_means`). The point estimate is the mean over seeds of the
difference on the full test set; the interval is the percentile interval of the replicates
(Efron & Tibshirani 1993, ch. 13; cluster bootstrap: Field & Welsh 2007).

Random draws, in this order per chunk of `rmsnet.metrics.BOOTSTRAP_CHUNK` replicates from
`numpy.random.default_rng(seed)`: patient indices (k, P), then seed indices (k, S). A test repeats
the computation by hand from the same draws.
"""
from __future__ import annotations

import numpy as np

from rmsnet.metrics import BOOTSTRAP_CHUNK, RankedScores, percentile_interval, replicate_means


def patient_index(patients) -> tuple[np.ndarray, int]:
    """Per-sample patient ids -> (per-sample index 0..P-1, P)."""
    _, inverse = np.unique(np.asarray(patients), return_inverse=True)
    return inverse.reshape(-1), int(inverse.max()) + 1 if len(inverse) else 0


def _mean_auroc(ranked: RankedScores, counts: np.ndarray) -> np.ndarray:
    return replicate_means(ranked.weighted_auroc(counts))


def paired_difference(scores_a: list[np.ndarray], scores_b: list[np.ndarray], targets: np.ndarray,
                      patients, reps: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """A minus B in mean AUROC, over paired seeds and resampled patients.

    scores_a[s], scores_b[s]: (n, C) probabilities of seed s's run of each arm, rows in the same
    sample order as `targets` (n, C) and `patients` (n,).
    """
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError(f"paired seeds needed: arm A has {len(scores_a)} runs, arm B {len(scores_b)}")
    targets = np.asarray(targets)
    for s in list(scores_a) + list(scores_b):
        if np.shape(s) != targets.shape:
            raise ValueError(f"scores of shape {np.shape(s)} do not match targets {targets.shape}")
    p_idx, n_patients = patient_index(patients)
    n, n_seeds = len(targets), len(scores_a)
    ranked = [(RankedScores(a, targets), RankedScores(b, targets)) for a, b in zip(scores_a, scores_b)]
    full = np.ones((1, n))
    per_seed = [float(_mean_auroc(ra, full)[0] - _mean_auroc(rb, full)[0]) for ra, rb in ranked]

    rng = np.random.default_rng(seed)
    diffs = np.empty(reps)
    row = 0
    while row < reps:
        k = min(BOOTSTRAP_CHUNK, reps - row)
        drawn_patients = rng.integers(0, n_patients, size=(k, n_patients))
        drawn_seeds = rng.integers(0, n_seeds, size=(k, n_seeds))
        per_patient = np.zeros((k, n_patients))
        np.add.at(per_patient, (np.arange(k)[:, None], drawn_patients), 1.0)
        counts = per_patient[:, p_idx]  # (k, n): each image weighted by its patient's draws
        d = np.stack([_mean_auroc(ra, counts) - _mean_auroc(rb, counts) for ra, rb in ranked], 1)  # (k, S)
        diffs[row:row + k] = np.take_along_axis(d, drawn_seeds, 1).mean(1)
        row += k
    valid = diffs[~np.isnan(diffs)]
    return {"difference": float(np.mean(per_seed)), "ci95": percentile_interval(diffs, level),
            "per_seed": per_seed, "p_not_above_zero": float((valid <= 0).mean()) if len(valid) else None,
            "reps": int(reps), "seed": int(seed), "level": level, "seeds": n_seeds,
            "patients": n_patients, "samples": n,
            "method": "paired bootstrap over test patients (clusters) and seeds"}
