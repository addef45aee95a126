"""rmsnet.summary: parameter and MAC counts, tapped shapes, and the command line."""
import json
import os
import subprocess
import sys

import pytest
import torch

import rmsnet  # noqa: F401
from rmsnet.summary import count_macs, main, model_summary
from rmsnet.teachers import create_tapped_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_count_macs_equals_hand_count_for_one_conv_and_one_linear():
    conv = torch.nn.Conv2d(1, 4, 3, padding=1, bias=False)
    assert count_macs(conv, 8, 1) == 4 * 1 * 9 * 8 * 8  # out_ch * in_ch * k^2 * pixels
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 5 * 5, 3))
    assert count_macs(mlp, 5, 2) == 50 * 3


def test_model_summary_reports_params_macs_and_tap_shapes_of_a_student():
    student = create_tapped_model("rmsnet_xxs", 14)
    summary = model_summary(student, 64, 1)
    assert summary["model"] == "rmsnet_xxs" and summary["num_classes"] == 14
    assert summary["params"] == sum(p.numel() for p in student.model.parameters())
    assert summary["macs"] == count_macs(student.model, 64, 1) > 0
    assert summary["feature_indices"] == [2, 3, 4]
    assert [(f["channels"], f["height"]) for f in summary["features"]] == [(48, 8), (64, 4), (80, 2)]


def test_model_summary_accepts_a_plain_timm_model_and_custom_taps():
    import timm
    model = timm.create_model("resnet18", num_classes=6)
    summary = model_summary(model, 64, 3, feature_indices=[1, 2])
    assert [f["channels"] for f in summary["features"]] == [64, 128]
    with pytest.raises(ValueError, match="in_chans=1"):
        model_summary(model, 64, 1)


def test_summary_without_json_prints_a_readable_table(capsys):
    assert main(["--model", "rmsnet_xxs", "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "multiply-add" in out and "48  8 x 8" in out


def test_summary_cli_rejects_unknown_model_with_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--model", "no_such_net"])
    assert exc.value.code == 2 and "no_such_net" in capsys.readouterr().err


@pytest.mark.parametrize("args,in_chans", [
    (["--model", "rmsnet_xxs", "--num-classes", "14", "--image-size", "224", "--in-chans", "1"], 1),
    (["--model", "resnet18", "--num-classes", "14", "--image-size", "64", "--in-chans", "3"], 3),
])
def test_summary_module_json_output_parses_for_student_and_teacher(args, in_chans):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "rmsnet.summary", *args, "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["in_chans"] == in_chans and summary["num_classes"] == 14
    assert len(summary["features"]) == 3 and summary["params"] > 0 and summary["macs"] > 0
    if summary["model"] == "rmsnet_xxs":
        assert 931_200 <= summary["params"] <= 988_800 and 0.2565e9 <= summary["macs"] <= 0.2835e9
