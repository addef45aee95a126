"""train.compile on CPU: the compiled step gives the eager step's loss terms and weights, compiles
without graph breaks and without recompiling across epochs and validation, reports its compile time
apart, and a compiled run stopped and resumed ends bit-identical to an uninterrupted one. Marked
slow, run in CI.

`aot_eager` (TorchDynamo's capture and AOTAutograd's joint graph, run with eager kernels) checks the
capture in seconds; one test runs `inductor`, the backend a GPU run uses, whose generated CPU code
takes minutes to compile on two cores."""
from __future__ import annotations

import re

import pytest
import torch

from _launch import REPO, assert_same_student, python_cmd, run, run_signalled_at, tiny_run_args

CFG = REPO / "launcher" / "configs" / "demo_distill.yaml"
# inductor against eager over 3 optimizer steps: every loss term and the global gradient norm of
# every step within 1e-4 relative (measured: 5e-6); the weight matrices and kernels within 1e-4
# absolute (measured: 3e-6). Biases are left out: where a gradient is near zero, Adam's first steps
# move a weight by about lr whatever the gradient's size, so float noise in its sign shows as lr.
LOSS_RTOL, WEIGHT_ATOL = 1e-4, 1e-4


def _scalars(run_dir, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def _args(shards, out, teacher, *extra):
    return tiny_run_args(CFG, shards, out, teacher, "train.batch_size_per_gpu=4", "train.warmup_steps=1", *extra)


@pytest.mark.slow
def test_an_inductor_compiled_step_matches_the_eager_step_within_tolerance(cxr_shards, random_teacher, tmp_path):
    eager = run(python_cmd(*_args(cxr_shards, tmp_path / "eager", random_teacher, "train.max_steps=3",
                                  "train.compile=off")))
    assert eager.returncode == 0, eager.stdout[-2000:] + eager.stderr[-2000:]
    compiled = run(python_cmd(*_args(cxr_shards, tmp_path / "compiled", random_teacher, "train.max_steps=3",
                                     "train.compile=on", "train.channels_last=on")), timeout=900)
    assert compiled.returncode == 0, compiled.stdout[-2000:] + compiled.stderr[-2000:]
    assert "compiled (inductor), channels-last" in compiled.stdout
    assert re.search(r"compiled \(inductor\): the first step took [\d.]+ s; \d+ graphs, 0 graph breaks",
                     compiled.stdout), compiled.stdout[-2000:]
    a, b = tmp_path / "eager" / "student", tmp_path / "compiled" / "student"
    for term in ("loss", "task", "kd", "at", "sp", "grad_norm"):
        assert len(_scalars(a, f"train/{term}")) == 3, term
        assert _scalars(b, f"train/{term}") == pytest.approx(_scalars(a, f"train/{term}"), rel=LOSS_RTOL), term
    assert _scalars(b, "train/time/compile_s")[0] > 1.0
    wa = torch.load(a / "final" / "model.pt", weights_only=True)["model"]
    wb = torch.load(b / "final" / "model.pt", weights_only=True)["model"]
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa if wa[k].ndim >= 2)
    assert worst < WEIGHT_ATOL, worst


@pytest.mark.slow
def test_a_compiled_run_has_no_graph_break_nor_recompile_and_resumes_exactly(cxr_shards, random_teacher,
                                                                            tmp_path):
    from launcher.preemption import EXIT_PREEMPTED

    args = lambda out, *extra: _args(cxr_shards, out, random_teacher, "train.epochs=2",  # noqa: E731
                                     "train.keep_checkpoints=0", "train.compile=on",
                                     "train.compile_backend=aot_eager", "train.channels_last=on", *extra)
    full = run(python_cmd(*args(tmp_path / "full")))
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    assert re.search(r"compiled \(aot_eager\): the first step took [\d.]+ s; \d+ graphs, 0 graph breaks",
                     full.stdout), full.stdout[-3000:]
    assert "recompiled" not in full.stdout + full.stderr  # two epochs, a validation between them
    graphs = _scalars(tmp_path / "full" / "student", "train/compile/graphs")
    assert len(graphs) == 2 and graphs[0] == graphs[1]  # after the first step, at the stage's end

    status, out = run_signalled_at(python_cmd(*args(tmp_path / "stopped")), "[step      3/")
    assert status == EXIT_PREEMPTED, out[-3000:]
    resumed = run(python_cmd(*args(tmp_path / "stopped"), "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "compiled (aot_eager): the first step took" in resumed.stdout  # the resumed engine compiles anew
    assert_same_student(tmp_path / "full" / "student", tmp_path / "stopped" / "student")
