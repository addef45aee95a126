"""rmsnet.metrics against scikit-learn: per-class AUROC (ties included), missing classes reported as
None and left out of the mean with a warning, accuracy for single-label tasks, the text table."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score

from rmsnet.metrics import auroc, classification_summary, format_auroc_table, macro_mean, per_class_auroc


def _multilabel(seed: int, n: int = 300, classes: int = 6):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, classes)) < rng.uniform(0.05, 0.5, classes)).astype(np.int64)
    # informative scores, rounded to one decimal so that many of them tie
    scores = np.round(np.clip(0.3 * targets + rng.random((n, classes)) * 0.7, 0, 1), 1)
    return scores, targets


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_sklearn_per_class_with_many_ties(seed):
    scores, targets = _multilabel(seed)
    assert len(np.unique(scores)) <= 11  # heavy ties
    ours = per_class_auroc(scores, targets)
    for c in range(targets.shape[1]):
        assert ours[c] == pytest.approx(roc_auc_score(targets[:, c], scores[:, c]), abs=1e-12)


def test_auroc_of_constant_perfect_and_reversed_scores():
    y = np.array([0, 1, 0, 1, 1, 0])
    assert auroc(np.zeros(6), y) == 0.5  # every pair tied: half credit
    assert auroc(y * 2.0 + 1.0, y) == 1.0
    assert auroc(-y.astype(float), y) == 0.0
    assert auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True])) == \
        pytest.approx(roc_auc_score([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]))


@pytest.mark.parametrize("column", [np.zeros(8, int), np.ones(8, int)], ids=["no-positives", "no-negatives"])
def test_auroc_of_a_one_sided_class_is_none(column):
    assert auroc(np.linspace(0, 1, 8), column) is None


def test_class_without_positives_is_missing_and_left_out_of_the_macro_mean_with_a_warning():
    scores, targets = _multilabel(7, classes=4)
    targets[:, 2] = 0
    names = ["Atelectasis", "Cardiomegaly", "Hernia", "Mass"]
    per_class = per_class_auroc(scores, targets)
    assert per_class[2] is None
    with pytest.warns(UserWarning, match="Hernia"):
        mean = macro_mean(per_class, names)
    expected = np.mean([roc_auc_score(targets[:, c], scores[:, c]) for c in (0, 1, 3)])
    assert mean == pytest.approx(expected)


def test_macro_mean_warns_only_when_a_class_is_missing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert macro_mean([0.5, 1.0]) == pytest.approx(0.75)
    with pytest.warns(UserWarning, match=r"\['0', '1'\]"):
        assert macro_mean([None, None]) is None


def test_classification_summary_single_label_gives_accuracy_and_one_vs_rest_auroc():
    rng = np.random.default_rng(3)
    n, classes = 120, 6
    y = rng.integers(0, classes, n)
    y[:classes] = np.arange(classes)  # every class present
    targets = np.eye(classes, dtype=np.int64)[y]
    logits = rng.normal(size=(n, classes)) + 1.5 * targets
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    names = ["Fetal abdomen", "Fetal brain", "Fetal femur", "Fetal thorax", "Maternal cervix", "Other"]

    out = classification_summary(probs, targets, names, multilabel=False)
    assert out["samples"] == n
    assert out["accuracy"] == pytest.approx(accuracy_score(y, probs.argmax(1)))
    for c, name in enumerate(names):
        assert out["auroc"][name] == pytest.approx(roc_auc_score(targets[:, c], probs[:, c]))
    assert out["mean_auroc"] == pytest.approx(np.mean(list(out["auroc"].values())))
    assert out["positives"] == dict(zip(names, np.bincount(y, minlength=classes).tolist()))


def test_classification_summary_multilabel_has_no_accuracy_and_reports_missing_classes():
    scores, targets = _multilabel(1, classes=3)
    targets[:, 1] = 0
    names = ["Effusion", "Hernia", "Nodule"]
    with pytest.warns(UserWarning, match="Hernia"):
        out = classification_summary(scores, targets, names, multilabel=True)
    assert "accuracy" not in out
    assert out["auroc"]["Hernia"] is None and out["positives"]["Hernia"] == 0
    assert out["mean_auroc"] == pytest.approx(np.mean([out["auroc"]["Effusion"], out["auroc"]["Nodule"]]))


def test_format_auroc_table_prints_missing_for_a_class_without_auroc():
    names = ["Effusion", "Hernia"]
    columns = {"teacher": {"auroc": {"Effusion": 0.8123, "Hernia": None}, "mean_auroc": 0.8123},
               "a_long_student_column_name": {"auroc": {"Effusion": 0.75, "Hernia": None},
                                              "mean_auroc": None}}
    table = format_auroc_table(columns, names)
    lines = table.splitlines()
    assert len(lines) == 1 + len(names) + 1  # header, one row per class, mean
    assert "teacher" in lines[0] and "a_long_student_column_name" in lines[0]
    assert lines[1].split() == ["Effusion", "0.812", "0.750"]
    assert lines[2].split() == ["Hernia", "missing", "missing"]
    assert lines[3].split() == ["mean", "AUROC", "0.812", "-"]
    assert len({len(line) for line in lines}) == 1  # columns line up
