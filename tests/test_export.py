"""launcher/export.py: ONNX that matches PyTorch, metadata and sidecar, a report with every field.

A hand-made model.pt (random rmsnet_xxs at 48 px, thresholds written as evaluate.py writes them)
keeps these fast; the slow test exports the tiny 2-rank run of test_evaluate.py from its DeepSpeed
checkpoint.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from launcher import export
from launcher.model_loading import load_model, write_thresholds
from rmsnet.summary import count_macs
from rmsnet.teachers import create_tapped_model

SIZE = 48
TPUT = f"throughput_ips_batch{export.THROUGHPUT_BATCH}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, cxr_shards):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("export_model")
    names = json.loads((cxr_shards / "manifest.json").read_text())["label_names"]
    student = create_tapped_model("rmsnet_xxs", len(names))
    meta = {"arch": "rmsnet_xxs", "num_classes": len(names), "in_chans": 1,
            "feature_indices": student.feature_indices, "image_size": SIZE, "label_names": names,
            "multilabel": True, "step": 3, "mode": "distill"}
    torch.save({"model": student.model.state_dict(), "adapters": {}, "meta": meta}, d / "model.pt")
    loaded = load_model(d / "model.pt")
    thresholds = [round(0.1 + 0.05 * c, 2) for c in range(len(names))]
    write_thresholds(d / "thresholds.json", loaded, "val", thresholds, [0.3] * len(names), 4)
    teacher = create_tapped_model("resnet18", len(names), in_chans=3)
    torch.save({"model": teacher.model.state_dict(), "meta": {"arch": "resnet18"}}, d / "teacher.pt")
    return d


@pytest.fixture(scope="module")
def exported(model_dir, cxr_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("export_out")
    rc = export.main(["--checkpoint", str(model_dir / "model.pt"), "--out", str(out),
                      "--shards", str(cxr_shards), "--teacher", str(model_dir / "teacher.pt"),
                      "--threads", "1,2", "--repeats", "2", "--throughput-repeats", "1",
                      "--real-samples", "16"])
    return rc, out


def test_onnx_matches_pytorch_on_new_random_inputs_at_several_batch_sizes(exported, model_dir):
    rc, out = exported
    assert rc == 0
    student = load_model(model_dir / "model.pt").model
    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [1, SIZE, SIZE]
    assert isinstance(session.get_inputs()[0].shape[0], str)  # dynamic batch
    for b in (1, 3, 32):
        x = torch.rand(b, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(b))
        with torch.inference_mode():
            ref = student.forward_logits(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == (b, 14)
        assert np.abs(got - ref).max() <= 1e-4


def test_onnx_metadata_and_sidecar_carry_label_names_and_the_evaluated_thresholds(exported, model_dir):
    _, out = exported
    props = {p.key: p.value for p in onnx.load(str(out / "student.onnx")).metadata_props}
    thresholds = json.loads((model_dir / "thresholds.json").read_text())
    sidecar = json.loads((out / "student.json").read_text())
    assert json.loads(props["label_names"]) == thresholds["label_names"] == sidecar["label_names"]
    assert json.loads(props["thresholds"]) == thresholds["thresholds"] == sidecar["thresholds"]
    assert json.loads(props["multilabel"]) is True and "sigmoid" in props["postprocess"]
    assert sidecar["input"]["shape"] == ["batch", 1, SIZE, SIZE] and sidecar["input"]["range"] == [0.0, 1.0]
    check = sidecar["check"]
    assert check["passed"] and check["max_abs_diff"] <= check["tolerance_max_abs_logit_diff"] == 1e-4
    assert set(check["random"]) == {"batch_1", "batch_7"} and check["real"]  # real images were checked
    teacher_sidecar = json.loads((out / "teacher.json").read_text())
    assert teacher_sidecar["arch"] == "resnet18" and teacher_sidecar["thresholds"] is None


def test_deploy_report_has_every_field_for_student_teacher_and_the_savings(exported, model_dir):
    _, out = exported
    report = json.loads((out / "deploy_report.json").read_text())
    assert report["image_size"] == SIZE and report["threads"] == [1, 2] and report["statistic"] == "median"
    assert {"cpu", "logical_cpus", "torch", "onnxruntime"} <= set(report["host"])
    student = load_model(model_dir / "model.pt").model
    s = report["models"]["student"]
    assert s["params"] == sum(p.numel() for p in student.model.parameters())
    assert s["macs"] == count_macs(student.model, SIZE, 1)
    assert s["onnx_bytes"] == (out / "student.onnx").stat().st_size
    for role in ("student", "teacher"):
        m = report["models"][role]
        for key in ("latency_ms_batch1", TPUT):
            for runtime in ("pytorch", "onnxruntime"):
                assert set(m[key][runtime]) == {"1", "2"} and all(v > 0 for v in m[key][runtime].values())
    sv = report["savings"]
    t = report["models"]["teacher"]
    assert sv["params_ratio"] == pytest.approx(t["params"] / s["params"]) and sv["params_ratio"] > 5
    assert sv["macs_ratio"] == pytest.approx(t["macs"] / s["macs"])
    assert sv["onnx_size_ratio"] == pytest.approx(t["onnx_bytes"] / s["onnx_bytes"])
    assert sv["latency_speedup_batch1"]["onnxruntime"]["1"] == pytest.approx(
        t["latency_ms_batch1"]["onnxruntime"]["1"] / s["latency_ms_batch1"]["onnxruntime"]["1"])
    assert sv[f"throughput_ratio_batch{export.THROUGHPUT_BATCH}"]["pytorch"]["2"] == pytest.approx(
        s[TPUT]["pytorch"]["2"] / t[TPUT]["pytorch"]["2"])

    md = (out / "deploy_report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1  # every row has every column
    for label in ("parameters", "MACs at 48x48", "ONNX file", "latency, batch 1, 1 thread",
                  "latency, batch 1, 2 threads", "throughput, batch 32", "ONNX Runtime", "teacher / student"):
        assert label in md, label


def test_export_without_thresholds_warns_and_without_teacher_has_no_savings(model_dir, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.pt").write_bytes((model_dir / "model.pt").read_bytes())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / export.INT8_FILE).write_bytes(b"an earlier export's INT8 model")
    rc = export.main(["--checkpoint", str(tmp_path / "m"), "--out", str(tmp_path / "out"), "--no-teacher",
                      "--threads", "1", "--repeats", "1", "--throughput-repeats", "1"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "thresholds.json" in err and "exported without thresholds" in err
    # an INT8 file left by an earlier export belongs to other weights: an export without --int8 removes it
    assert not (tmp_path / "out" / export.INT8_FILE).exists() and "no --int8 this time" in err
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "out" / "student.onnx")).metadata_props}
    assert json.loads(props["thresholds"]) is None
    report = json.loads((tmp_path / "out" / "deploy_report.json").read_text())
    assert "savings" not in report and list(report["models"]) == ["student"]


def test_a_model_with_non_finite_weights_is_neither_exported_nor_evaluated(model_dir, cxr_shards, tmp_path, capsys):
    from launcher import evaluate
    (tmp_path / "m").mkdir()
    saved = torch.load(model_dir / "model.pt", weights_only=True)
    name = next(k for k, v in saved["model"].items() if v.is_floating_point() and v.numel() > 4)
    saved["model"][name] = saved["model"][name].clone().view(-1).index_fill(0, torch.tensor([3]), float("nan")) \
        .view_as(saved["model"][name])
    torch.save(saved, tmp_path / "m" / "model.pt")
    said = f"{tmp_path / 'm' / 'model.pt'}: 1 of the model's tensors hold NaN/inf (first: {name}): it trained into " \
           f"non-finite values and is neither evaluated nor exported"
    assert export.main(["--checkpoint", str(tmp_path / "m"), "--out", str(tmp_path / "out")]) == 2
    assert said in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert evaluate.main(["--checkpoint", str(tmp_path / "m" / "model.pt"), "--shards", str(cxr_shards),
                          "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err and not (tmp_path / "eval").exists()


def test_thresholds_of_other_weights_are_refused(model_dir, tmp_path, capsys):
    (tmp_path / "m").mkdir()
    saved = torch.load(model_dir / "model.pt", weights_only=True)
    saved["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in saved["model"].items()}
    torch.save(saved, tmp_path / "m" / "model.pt")
    (tmp_path / "m" / "thresholds.json").write_text((model_dir / "thresholds.json").read_text())
    rc = export.main(["--checkpoint", str(tmp_path / "m"), "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "chosen for other weights" in capsys.readouterr().err


@pytest.mark.slow
def test_export_of_a_real_runs_deepspeed_checkpoint_matches_pytorch(tmp_path_factory, cxr_shards, tmp_path):
    from test_evaluate import tiny_run
    run_dir = tiny_run(tmp_path_factory.getbasetemp() / "tiny_runs", cxr_shards, 2)
    rc = export.main(["--checkpoint", str(run_dir / "checkpoints"), "--out", str(tmp_path), "--shards",
                      str(cxr_shards), "--threads", "1", "--repeats", "2", "--throughput-repeats", "1"])
    assert rc == 0
    report = json.loads((tmp_path / "deploy_report.json").read_text())
    assert set(report["models"]) == {"student", "teacher"}  # the run's config names its teacher
    assert all(m["check"]["passed"] for m in report["models"].values())
