"""launcher/evaluate.py and the metrics behind it.

Agreement with scikit-learn (AUROC, AUPRC, ROC points, Youden thresholds), hand-computed cases
(Youden, sensitivity/specificity, ECE), the bootstrap (exact per resample, deterministic in its
seed, interval around the point estimate), the CLI on a hand-made model.pt, and -- slow, through
the real `deepspeed` launcher -- a tiny 2-rank ZeRO-2 run whose DeepSpeed checkpoint, consolidated
with DeepSpeed's own tool, predicts exactly what final/model.pt predicts, and a 2-rank evaluation
equal to the single-process one on a split that does not divide evenly into ranks x batch.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from _launch import REPO, free_port, run
from launcher import evaluate
from launcher.metrics_doc import model_result, read_metrics, split_semantics
from launcher.model_loading import CheckpointError, load_model, locate_checkpoint, write_thresholds
from rmsnet import metrics as M
from rmsnet.calibration import expected_calibration_error, reliability_bins
from rmsnet.teachers import create_tapped_model

DISTILL_CFG = REPO / "launcher" / "configs" / "demo_distill.yaml"
EVALUATE = REPO / "launcher" / "evaluate.py"


def _scores(seed: int, n: int = 400, classes: int = 5, decimals: int = 2):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, classes)) < rng.uniform(0.05, 0.5, classes)).astype(np.int64)
    scores = np.round(np.clip(0.25 * targets + 0.75 * rng.random((n, classes)), 0, 1), decimals)
    return scores, targets


# ------------------------------------------------------------------- agreement with scikit-learn
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decimals", [1, 6], ids=["heavy-ties", "few-ties"])
def test_auroc_and_auprc_equal_sklearn_per_class(seed, decimals):
    scores, targets = _scores(seed, decimals=decimals)
    auroc, ap = M.per_class_auroc(scores, targets), M.per_class_average_precision(scores, targets)
    for c in range(targets.shape[1]):
        assert auroc[c] == pytest.approx(roc_auc_score(targets[:, c], scores[:, c]), abs=1e-12)
        assert ap[c] == pytest.approx(average_precision_score(targets[:, c], scores[:, c]), abs=1e-12)


def test_roc_points_equal_sklearn_roc_curve_without_dropping_points():
    scores, targets = _scores(1, decimals=1)
    fpr, tpr, thr = M.roc_points(scores[:, 0], targets[:, 0])
    s_fpr, s_tpr, s_thr = roc_curve(targets[:, 0], scores[:, 0], drop_intermediate=False)
    np.testing.assert_allclose(fpr, s_fpr)
    np.testing.assert_allclose(tpr, s_tpr)
    np.testing.assert_allclose(thr[1:], s_thr[1:])  # sklearn's first threshold is inf too (>= 1.3)
    assert np.isinf(thr[0])


def test_average_precision_without_positives_is_none_and_without_negatives_is_one():
    assert M.average_precision(np.linspace(0, 1, 6), np.zeros(6)) is None
    assert M.average_precision(np.linspace(0, 1, 6), np.ones(6)) == 1.0


# ------------------------------------------------------------------------- thresholds by Youden
def test_youden_threshold_on_a_hand_made_case_prefers_the_higher_of_tied_thresholds():
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9])
    labels = np.array([0, 0, 1, 0, 1, 1, 0, 1])
    # J = TPR - FPR at >= 0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1:
    #     .25, 0, .25, .5, .25, .5, .25, 0  -> maximum .5 at 0.6 and at 0.3; the higher one wins
    threshold, j = M.youden_threshold(scores, labels)
    assert threshold == 0.6 and j == pytest.approx(0.5)
    assert M.sensitivity_specificity(scores, labels, threshold) == (0.75, 0.75)
    fpr, tpr, thr = roc_curve(labels, scores, drop_intermediate=False)
    assert threshold == thr[np.argmax(tpr - fpr)]  # sklearn's curve, first maximum


def test_youden_threshold_is_none_for_a_one_sided_class_and_sensitivity_needs_positives():
    assert M.youden_threshold(np.linspace(0, 1, 5), np.zeros(5)) == (None, None)
    assert M.sensitivity_specificity(np.array([0.2, 0.9]), np.array([0, 0]), 0.5) == (None, 0.5)
    assert M.sensitivity_specificity(np.array([0.2, 0.9]), np.array([0, 1]), None) == (None, None)


# ----------------------------------------------------------------------------------- calibration
def test_ece_multilabel_over_every_class_probability_hand_computed():
    probs = np.array([[0.05, 0.95], [0.15, 0.55]])
    targets = np.array([[0, 1], [1, 1]])
    # four predictions, each alone in its bin: |0-.05| + |1-.95| + |1-.15| + |1-.55| = 1.4, / 4
    ece, bins = expected_calibration_error(probs, targets, multilabel=True)
    assert ece == pytest.approx(0.35)
    assert sum(bins["count"]) == 4 and len(bins["count"]) == 15


def test_ece_single_label_on_top1_confidence_hand_computed():
    probs = np.array([[0.70, 0.20, 0.10],   # top-1 class 0, correct, bin 10 (0.667, 0.733]
                      [0.72, 0.18, 0.10],   # top-1 class 0, wrong,   bin 10
                      [0.30, 0.60, 0.10],   # top-1 class 1, wrong,   bin 8  (0.533, 0.6]
                      [0.10, 0.12, 0.78],   # top-1 class 2, correct, bin 11 (0.733, 0.8]
                      [0.50, 0.40, 0.10]])  # top-1 class 0, correct, bin 7  (0.467, 0.533]
    labels = np.eye(3)[[0, 1, 0, 2, 0]]
    expected = (2 * abs(0.5 - 0.71) + abs(0 - 0.6) + abs(1 - 0.78) + abs(1 - 0.5)) / 5
    ece, bins = expected_calibration_error(probs, labels, multilabel=False)
    assert ece == pytest.approx(expected)
    assert bins["count"][10] == 2 and bins["accuracy"][10] == 0.5
    assert bins["confidence"][10] == pytest.approx(0.71)


def test_reliability_bins_put_zero_in_the_first_bin_and_one_in_the_last():
    bins = reliability_bins(np.array([0.0, 1.0, 0.5]), np.array([0.0, 1.0, 1.0]))
    assert bins["count"][0] == 1 and bins["count"][14] == 1 and bins["count"][7] == 1
    with pytest.raises(ValueError, match="probabilities"):
        reliability_bins(np.array([1.5]), np.array([1.0]))


# ------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_replicates_equal_sklearn_on_the_same_resamples():
    scores, targets = _scores(2, n=120, decimals=1)
    reps = M.bootstrap_auroc_replicates(scores, targets, reps=60, seed=5)
    idx = np.concatenate(list(M.bootstrap_resamples(len(scores), 60, 5)))
    for r in (0, 17, 59):
        s, t = scores[idx[r]], targets[idx[r]]
        for c in range(targets.shape[1]):
            if 0 < t[:, c].sum() < len(t):
                assert reps[r, c] == pytest.approx(roc_auc_score(t[:, c], s[:, c]), abs=1e-12)
            else:
                assert np.isnan(reps[r, c])


def test_bootstrap_interval_contains_the_point_estimate_and_is_deterministic_in_its_seed():
    scores, targets = _scores(3)
    point = M.macro_mean(M.per_class_auroc(scores, targets))
    a = M.bootstrap_auroc(scores, targets, reps=300, seed=11)
    b = M.bootstrap_auroc(scores, targets, reps=300, seed=11)
    c = M.bootstrap_auroc(scores, targets, reps=300, seed=12)
    lo, hi = a["mean_auroc_ci95"]
    assert lo < point < hi and hi - lo < 0.2
    assert a == b and a["mean_auroc_ci95"] != c["mean_auroc_ci95"]
    for value, (lo_c, hi_c) in zip(M.per_class_auroc(scores, targets), a["auroc_ci95"]):
        assert lo_c <= value <= hi_c


def test_bootstrap_skips_a_class_missing_from_a_resample_for_that_resample_only():
    rng = np.random.default_rng(0)
    targets = np.zeros((40, 2), dtype=int)
    targets[:20, 0] = 1
    targets[3, 1] = 1  # one positive: absent from about a third of the resamples
    scores = rng.random((40, 2))
    reps = M.bootstrap_auroc_replicates(scores, targets, reps=200, seed=0)
    missing = np.isnan(reps[:, 1])
    assert 0.2 < missing.mean() < 0.5 and not np.isnan(reps[:, 0]).any()
    means = M.replicate_means(reps)
    np.testing.assert_allclose(means[missing], reps[missing, 0])  # mean of the classes present


# ----------------------------------------------------------------------- split semantics, errors
def test_split_semantics_is_patient_disjoint_for_built_shards_but_not_for_csv_without_patients(cxr_shards):
    manifest = json.loads((cxr_shards / "manifest.json").read_text())
    sem = split_semantics(manifest, "test")
    assert sem["patient_disjoint"] is True and "patients" in sem["basis"]
    csv = dict(manifest, dataset="csv", dataset_options={"patient_column": None})
    assert split_semantics(csv, "test")["patient_disjoint"] is False


def test_a_path_that_is_no_checkpoint_fails_with_one_clear_message(tmp_path, cxr_shards):
    with pytest.raises(CheckpointError, match="not a run directory"):
        locate_checkpoint(tmp_path)
    proc = subprocess.run([sys.executable, str(EVALUATE), "--checkpoint", str(tmp_path / "nope"),
                           "--shards", str(cxr_shards)], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 2 and "nope" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ the CLI on a hand-made model
@pytest.fixture(scope="module")
def handmade_run(tmp_path_factory, cxr_shards) -> dict:
    """A model.pt in the project's format (random rmsnet_xxs) and a random resnet18 teacher."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("handmade")
    manifest = json.loads((cxr_shards / "manifest.json").read_text())
    names = manifest["label_names"]
    student = create_tapped_model("rmsnet_xxs", len(names))
    meta = {"arch": "rmsnet_xxs", "num_classes": len(names), "in_chans": 1,
            "feature_indices": student.feature_indices, "image_size": 48, "label_names": names,
            "multilabel": True, "step": 7, "mode": "distill"}
    (d / "final").mkdir()
    torch.save({"model": student.model.state_dict(), "adapters": {}, "meta": meta}, d / "final" / "model.pt")
    teacher = create_tapped_model("resnet18", len(names), in_chans=3)
    torch.save({"model": teacher.model.state_dict(), "meta": {"arch": "resnet18"}}, d / "teacher.pt")
    return {"dir": d, "model": d / "final" / "model.pt", "teacher": d / "teacher.pt", "manifest": manifest}


def test_evaluate_cli_writes_metrics_figures_tensorboard_and_thresholds(handmade_run, cxr_shards, tmp_path,
                                                                      capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "eval"
    with pytest.warns(UserWarning, match="AUROC undefined for"):  # classes without test positives
        rc = evaluate.main(["--checkpoint", str(handmade_run["model"]), "--shards", str(cxr_shards),
                            "--out", str(out), "--teacher", str(handmade_run["teacher"]),
                            "--bootstrap", "200", "--batch-size", "5"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "student (rmsnet_xxs)" in printed and "teacher (resnet18)" in printed and "95% CI" in printed

    doc = read_metrics(out / "metrics.json")
    m = doc["splits"]["test"]
    manifest = handmade_run["manifest"]
    names = manifest["label_names"]
    assert list(doc["splits"]) == ["test"] and m["patient_disjoint"] is True
    assert doc["thresholds"]["chosen_on"] == "val" and doc["written_by"] == "launcher/evaluate.py"
    assert m["samples"] == manifest["splits"]["test"]["samples"]
    positives = manifest["splits"]["test"]["positives"]
    for who in ("student", "teacher"):
        s = m["models"][who]
        pred = np.load(out / "predictions" / f"{who}_test.npz")
        assert len(np.unique(pred["sid"])) == len(pred["sid"]) == m["samples"]  # each sample once
        for c, name in enumerate(names):
            if positives[name] == 0:
                assert s["auroc"][name] is None and s["auprc"][name] is None and name in s["missing_classes"]
                assert s["sensitivity"][name] is None
            else:
                y, p = pred["targets"][:, c], pred["probs"][:, c]
                assert s["auroc"][name] == pytest.approx(roc_auc_score(y, p))
                assert s["auprc"][name] == pytest.approx(average_precision_score(y, p))
        present = [v for v in s["auroc"].values() if v is not None]
        assert s["mean_auroc"] == pytest.approx(np.mean(present))
        lo, hi = s["mean_auroc_ci95"]
        assert lo <= s["mean_auroc"] <= hi and s["bootstrap"]["reps"] == 200
        assert 0 <= s["ece"] <= 1 and set(s) >= {"specificity", "thresholds", "calibration_bins"}
    assert "student_minus_teacher" in m

    thresholds = json.loads((handmade_run["dir"] / "final" / "thresholds.json").read_text())
    assert thresholds == json.loads((out / "thresholds.json").read_text())
    assert thresholds["chosen_on"]["split"] == "val" and list(thresholds["thresholds"]) == names
    for kind in ("roc", "reliability"):
        assert (out / f"{kind}_test.png").stat().st_size > 10_000

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert "eval/student/test/mean_auroc" in acc.Tags()["scalars"]
    assert "eval/teacher/test/ece" in acc.Tags()["scalars"]
    assert {"eval/test/roc", "eval/test/reliability"} <= set(acc.Tags()["images"])


def test_single_label_task_reports_accuracy_and_confusion_matrix(us_shards, tmp_path):
    torch.manual_seed(1)
    manifest = json.loads((us_shards / "manifest.json").read_text())
    names = manifest["label_names"]
    student = create_tapped_model("rmsnet_xxs", len(names))
    meta = {"arch": "rmsnet_xxs", "num_classes": len(names), "in_chans": 1, "feature_indices": None,
            "image_size": 48, "label_names": names, "multilabel": False, "step": 0, "mode": "distill"}
    torch.save({"model": student.model.state_dict(), "adapters": {}, "meta": meta}, tmp_path / "model.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = evaluate.main(["--checkpoint", str(tmp_path / "model.pt"), "--shards", str(us_shards),
                            "--out", str(tmp_path / "eval"), "--bootstrap", "50"])
    assert rc == 0
    s = model_result(read_metrics(tmp_path / "eval" / "metrics.json"), "student", "test")
    pred = np.load(tmp_path / "eval" / "predictions" / "student_test.npz")
    cm = np.array(s["confusion_matrix"]["counts"])
    assert cm.sum() == len(pred["sid"]) and cm.shape == (len(names), len(names))
    assert s["accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert s["accuracy"] == pytest.approx((pred["probs"].argmax(1) == pred["targets"].argmax(1)).mean())
    assert "top-1" in s["ece_over"]


# ----------------------------------------------------------- a real tiny run (slow, 2 CPU ranks)
def deepspeed_script(ranks: int, script: Path, *args) -> list[str]:
    exe = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    return [exe, "--num_gpus", str(ranks), "--master_port", str(free_port()), str(script), *args]


def tiny_run(base: Path, shards: Path, zero_stage: int = 2) -> Path:
    """A 2-rank DeepSpeed run (2 steps, 48 px) with a random resnet18 teacher; made once per
    session and stage (a done-marker lets test_export.py reuse it)."""
    run_dir = base / f"zero{zero_stage}" / "student"
    if (run_dir / "final" / "model.pt").is_file() and (base / f"zero{zero_stage}.done").is_file():
        return run_dir
    teacher = base / "teacher.pt"
    if not teacher.is_file():
        torch.manual_seed(0)
        model = create_tapped_model("resnet18", 14, in_chans=3)
        base.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.model.state_dict(), "meta": {"arch": "resnet18"}}, teacher)
    distill = REPO / "launcher" / "distill.py"
    proc = run(deepspeed_script(2, distill, "--config", str(DISTILL_CFG), "--set", f"data.shards={shards}",
                                "--set", f"run.out_dir={base / f'zero{zero_stage}'}",
                                "--set", f"teacher.checkpoint={teacher}", "--set", "data.image_size=48",
                                "--set", "train.batch_size_per_gpu=4", "--set", "train.max_steps=2",
                                "--set", "train.log_every=1", "--set", "train.warmup_steps=1",
                                "--set", f"train.zero_stage={zero_stage}"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (base / f"zero{zero_stage}.done").write_text("ok")
    return run_dir


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory, cxr_shards) -> Path:
    return tiny_run(tmp_path_factory.getbasetemp() / "tiny_runs", cxr_shards, 2)


@torch.inference_mode()
def _same_predictions(a, b, size: int = 48):
    x = torch.rand(6, 1, size, size, generator=torch.Generator().manual_seed(0))
    return torch.equal(a.model.forward_logits(x), b.model.forward_logits(x))


@pytest.mark.slow
def test_zero2_checkpoint_consolidated_by_deepspeed_predicts_like_final_model(zero2_run, cxr_shards):
    final = load_model(zero2_run)
    kind, ckpt_dir, tag = locate_checkpoint(zero2_run / "checkpoints")
    assert kind == "deepspeed" and tag == (ckpt_dir / "latest").read_text().strip()
    consolidated = load_model(zero2_run / "checkpoints")
    assert "zero_to_fp32" in consolidated.source
    assert final.meta["label_names"] == consolidated.meta["label_names"]
    a, b = final.model.state_dict(), consolidated.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _same_predictions(final, consolidated)


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [3, 0])
def test_zero3_and_zero0_checkpoints_load_into_the_student(tmp_path_factory, cxr_shards, zero_stage):
    run_dir = tiny_run(tmp_path_factory.getbasetemp() / "tiny_runs", cxr_shards, zero_stage)
    final, consolidated = load_model(run_dir), load_model(run_dir / "checkpoints")
    a, b = final.model.state_dict(), consolidated.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    assert _same_predictions(final, consolidated)


@pytest.mark.slow
def test_two_rank_evaluation_equals_single_process_on_an_uneven_split(zero2_run, cxr_shards, tmp_path):
    n = json.loads((cxr_shards / "manifest.json").read_text())["splits"]["test"]["samples"]
    batch = 3
    assert n % (2 * batch) != 0  # the last batches are padded on both ranks
    common = ["--checkpoint", str(zero2_run), "--shards", str(cxr_shards), "--batch-size", str(batch),
              "--bootstrap", "100"]
    two = run(deepspeed_script(2, EVALUATE, *common, "--out", str(tmp_path / "two")))
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = run([sys.executable, str(EVALUATE), *common, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]

    d1, d2 = (read_metrics(tmp_path / d / "metrics.json") for d in ("one", "two"))
    assert d2["world_size"] == 2 and d1["world_size"] == 1
    m1, m2 = d1["splits"]["test"]["models"], d2["splits"]["test"]["models"]
    assert d1["splits"]["test"]["samples"] == d2["splits"]["test"]["samples"] == n
    for who in ("student", "teacher"):
        p1, p2 = (np.load(tmp_path / d / "predictions" / f"{who}_test.npz") for d in ("one", "two"))
        np.testing.assert_array_equal(p1["sid"], p2["sid"])
        np.testing.assert_array_equal(p1["targets"], p2["targets"])
        np.testing.assert_allclose(p1["probs"], p2["probs"], rtol=0, atol=1e-6)
        for key in ("auroc", "auprc", "sensitivity", "specificity"):
            for name, v in m1[who][key].items():
                expected = None if v is None else pytest.approx(v, abs=1e-9)
                assert m2[who][key][name] == expected, (who, key, name)
        assert m2[who]["mean_auroc_ci95"] == pytest.approx(m1[who]["mean_auroc_ci95"], abs=1e-9)
        assert m2[who]["ece"] == pytest.approx(m1[who]["ece"], abs=1e-6)


@pytest.mark.slow
def test_evaluating_the_deepspeed_checkpoint_gives_the_final_models_numbers(zero2_run, cxr_shards, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, ckpt in (("final", zero2_run), ("ds", zero2_run / "checkpoints")):
            assert evaluate.main(["--checkpoint", str(ckpt), "--shards", str(cxr_shards), "--no-teacher",
                                  "--bootstrap", "50", "--out", str(tmp_path / name)]) == 0
    a, b = (model_result(read_metrics(tmp_path / d / "metrics.json"), "student", "test") for d in ("final", "ds"))
    assert a["auroc"] == b["auroc"] and a["mean_auroc_ci95"] == b["mean_auroc_ci95"]
    tag = (zero2_run / "checkpoints" / "latest").read_text().strip()
    assert (zero2_run / "checkpoints" / tag / "thresholds.json").is_file()  # next to that model
    assert (zero2_run / "final" / "thresholds.json").is_file()


def test_thresholds_file_records_the_model_fingerprint(handmade_run, tmp_path):
    loaded = load_model(handmade_run["model"])
    path = tmp_path / "thresholds.json"
    write_thresholds(path, loaded, "val", [0.5] * 14, [0.1] * 14, 4)
    doc = json.loads(path.read_text())
    assert doc["fingerprint"] == loaded.fingerprint and doc["chosen_on"] == {"split": "val", "samples": 4}
