"""The paired bootstrap over test patients and seeds (rmsnet/paired_bootstrap.py), against a hand
computation from the same random draws, and its invariants."""
from __future__ import annotations

import numpy as np
import pytest

from rmsnet import metrics as M
from rmsnet.paired_bootstrap import paired_difference


def _data(n=40, classes=3, seeds=2, seed=0):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, classes)) < 0.35).astype(np.float32)
    targets[0], targets[1] = 1, 0  # every class has both labels on the full set
    patients = rng.integers(0, 12, size=n).astype(str)
    noisy = lambda s: np.clip(targets * s + rng.normal(0, 0.5, targets.shape), -3, 3)
    a = [1 / (1 + np.exp(-noisy(1.0))) for _ in range(seeds)]
    b = [1 / (1 + np.exp(-noisy(0.4))) for _ in range(seeds)]
    return a, b, targets, patients


def _hand(a, b, targets, patients, reps, seed):
    """The definition, one replicate at a time: repeat each drawn patient's images, score with
    `metrics.auroc`, macro-mean over the classes with both labels, average over the drawn seeds."""
    ids = np.unique(patients)
    rows_of = {p: np.flatnonzero(patients == p) for p in ids}
    rng = np.random.default_rng(seed)
    diffs = []
    while len(diffs) < reps:
        k = min(M.BOOTSTRAP_CHUNK, reps - len(diffs))
        drawn_p = rng.integers(0, len(ids), size=(k, len(ids)))
        drawn_s = rng.integers(0, len(a), size=(k, len(a)))
        for r in range(k):
            rows = np.concatenate([rows_of[ids[i]] for i in drawn_p[r]])
            t = targets[rows]
            def mean_auc(scores):
                vals = [M.auroc(scores[rows, c], t[:, c]) for c in range(t.shape[1])]
                vals = [v for v in vals if v is not None]
                return np.mean(vals) if vals else np.nan
            diffs.append(np.mean([mean_auc(a[s]) - mean_auc(b[s]) for s in drawn_s[r]]))
    return np.array(diffs)


def test_paired_bootstrap_equals_hand_computation_from_the_same_draws():
    a, b, targets, patients = _data()
    reps = 120  # more than one chunk
    res = paired_difference(a, b, targets, patients, reps=reps, seed=3)
    hand = _hand(a, b, targets, patients, reps, seed=3)
    lo, hi = np.percentile(hand[~np.isnan(hand)], [2.5, 97.5])
    assert res["ci95"] == pytest.approx([lo, hi], abs=1e-12)
    full = [M.macro_mean(M.per_class_auroc(x, targets)) - M.macro_mean(M.per_class_auroc(y, targets))
            for x, y in zip(a, b)]
    assert res["per_seed"] == pytest.approx(full, abs=1e-12)
    assert res["difference"] == pytest.approx(np.mean(full), abs=1e-12)
    assert res["p_not_above_zero"] == pytest.approx((hand <= 0).mean())
    assert (res["patients"], res["seeds"], res["samples"]) == (len(np.unique(patients)), 2, 40)


def test_identical_arms_differ_by_exactly_zero():
    a, _, targets, patients = _data()
    res = paired_difference(a, [x.copy() for x in a], targets, patients, reps=100, seed=0)
    assert res["difference"] == 0 and res["ci95"] == [0.0, 0.0]


def test_a_clearly_better_arm_has_an_interval_above_zero():
    a, b, targets, patients = _data(n=200, seeds=3)
    res = paired_difference(a, b, targets, patients, reps=300, seed=0)
    assert res["ci95"][0] > 0 and res["difference"] > 0.1


def test_resampling_patients_not_images_widens_the_interval_for_clustered_data():
    """Images of one patient share their errors: a per-image bootstrap would understate the spread."""
    rng = np.random.default_rng(1)
    n_pat, per = 30, 8
    patients = np.repeat(np.arange(n_pat), per).astype(str)
    targets = np.repeat(rng.random((n_pat, 1)) < 0.5, per, 0).astype(np.float32)
    effect = np.repeat(rng.normal(0, 1, (n_pat, 1)), per, 0)  # A's advantage varies by patient
    base = targets + rng.normal(0, 0.3, targets.shape)
    a, b = [base + 0.3 * effect], [base - 0.3 * effect]
    clustered = paired_difference(a, b, targets, patients, reps=400, seed=0)["ci95"]
    per_image = paired_difference(a, b, targets, np.arange(len(targets)).astype(str), reps=400, seed=0)["ci95"]
    assert clustered[1] - clustered[0] > 1.5 * (per_image[1] - per_image[0])


def test_unpaired_or_misshaped_inputs_are_refused():
    a, b, targets, patients = _data()
    with pytest.raises(ValueError, match="paired seeds"):
        paired_difference(a, b[:1], targets, patients)
    with pytest.raises(ValueError, match="do not match"):
        paired_difference([x[:-1] for x in a], b, targets, patients)


def test_weighted_auroc_with_unit_weights_is_auroc():
    a, _, targets, _ = _data()
    ranked = M.RankedScores(a[0], targets)
    got = ranked.weighted_auroc(np.ones((1, len(targets))))[0]
    assert got == pytest.approx(M.per_class_auroc(a[0], targets), abs=1e-12)
