"""The training loop without processes: `Trainer.run_epoch` and its one save-and-stop decision on a
tiny module behind a small stand-in for a DeepSpeed engine (forward, backward, step, lr), with a
checkpointer that records what it was asked to save. What DeepSpeed itself does is covered by the
end-to-end tests (test_distill_launcher, test_kill_resume, test_resume_zero3, ...)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from data_pipeline.loader import build_loader
from data_pipeline.loader_common import batches_per_epoch
from data_pipeline.manifest import read_manifest
from launcher.checkpoints import Position, write_file_manifest
from launcher.config import load_config
from launcher.monitor import NullMonitor
from launcher.nonfinite import NonFiniteTraining
from launcher.preemption import Preempted
from launcher.trainer import Data, Run, Trainer

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "launcher" / "configs" / "demo_distill.yaml"
CLASSES = 3


class TinyTask(torch.nn.Module):
    """What the trainer needs of a DistillTask: forward to loss terms, no teacher."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(4, CLASSES)
        self.seen: list[int] = []  # sample ids of every micro-batch trained on
        self.nan_calls: set[int] = set()  # forward calls (1-based) whose loss gets a constant NaN added
        self.calls = 0

    def needs_teacher(self) -> bool:
        return False

    def needs_features(self) -> bool:
        return False

    def forward(self, images, targets, t_logits, t_feats):
        logits = self.head(images.flatten(1))
        task = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
        self.calls += 1
        if self.calls in self.nan_calls:  # the gradient stays finite: only the reported value is NaN
            task = task + torch.tensor(float("nan"))
        return {"loss": task, "task": task, "logits": logits}


class FakeEngine:
    """The DeepSpeed engine surface the loop uses: call, backward, step, train/eval, lr, grad norm."""

    def __init__(self):
        self.module = TinyTask()
        self.device = torch.device("cpu")
        self.opt = torch.optim.SGD(self.module.parameters(), lr=0.1)
        self.steps = 0
        self.skip_steps: set[int] = set()  # optimizer steps (1-based) "skipped for overflow"

    def __call__(self, images, targets, t_logits, t_feats):
        return self.module(images, targets, t_logits, t_feats)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.opt.step()
        self.opt.zero_grad()
        self.steps += 1

    def train(self):
        self.module.train()

    def eval(self):
        self.module.eval()

    def get_lr(self):
        return [0.1]

    def get_global_grad_norm(self):
        return 0.0

    def was_step_applied(self):
        return self.steps not in self.skip_steps


class RecordingCheckpointer:
    def __init__(self, run_dir: Path):
        self.saved: list[Position] = []
        self.dir = run_dir / "checkpoints"  # where the trainer looks for the last good checkpoint

    def save(self, engine, stage_name: str, pos: Position) -> None:
        self.saved.append(pos)


class StopAfter:
    """A stop request the ranks 'agree' on at the n-th question."""

    def __init__(self, n: int):
        self.n, self.asked = n, 0

    def agreed(self) -> bool:
        self.asked += 1
        return self.asked >= self.n


class CountingLoader:
    """A list of batches that counts how many were read (the loop must always drain it)."""

    def __init__(self, batches):
        self.batches, self.read = batches, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            self.read += 1
            yield dict(b)


def batches(n: int, size: int = 2):
    g = torch.Generator().manual_seed(0)
    return CountingLoader([{"image": torch.rand(size, 1, 2, 2, generator=g),
                            "label": (torch.rand(size, CLASSES, generator=g) > 0.5).float(),
                            "sid": torch.arange(i * size, (i + 1) * size)} for i in range(n)])


def make_trainer(tmp_path, *overrides, total_steps=100, accum=1, stop=None):
    cfg = load_config(CONFIG, [f"run.out_dir={tmp_path}", "train.log_every=1", *overrides])
    stages = tuple(cfg.resolved_stages())
    run = Run(cfg.run_dir, stages, steps_per_epoch=10, total_steps=total_steps, accum=accum,
              precision="fp32", student_dtype=torch.float32, teacher_dtype=None)
    env = SimpleNamespace(is_main=False, rank=0, world_size=1, device=torch.device("cpu"))
    data = Data({"label_names": ["a", "b", "c"], "multilabel": True}, lambda epoch: batches(10), None)
    trainer = Trainer(cfg, run, env, data, None, RecordingCheckpointer(cfg.run_dir), NullMonitor(), stop)
    trainer._stage = (0, stages[0], 2 * accum)
    return trainer


def test_an_epoch_takes_one_optimizer_step_per_batch_and_returns_the_epoch_end(tmp_path):
    trainer, engine, loader = make_trainer(tmp_path), FakeEngine(), batches(10)
    pos = trainer.run_epoch(engine, loader, Position(0, 3, 20))
    assert pos == Position(0, 3, 30, 0) and engine.steps == 10 and loader.read == 10
    assert trainer.ckpt.saved == []  # no interval set; the epoch end is saved by run_stage


def test_gradient_accumulation_counts_optimizer_steps_not_batches(tmp_path):
    trainer = make_trainer(tmp_path, "train.gradient_accumulation_steps=2", accum=2)
    pos = trainer.run_epoch(FakeEngine(), batches(10), Position())
    assert pos.step == 5


def test_checkpoints_every_n_steps_inside_the_epoch_with_the_batches_consumed(tmp_path):
    trainer = make_trainer(tmp_path, "train.checkpoint_every_steps=3")
    trainer.run_epoch(FakeEngine(), batches(10), Position(0, 1, 10))
    # steps 12 and 15 and 18 fall inside the epoch; its last step (20) is the epoch end's save
    assert trainer.ckpt.saved == [Position(0, 1, 12, 2), Position(0, 1, 15, 5), Position(0, 1, 18, 8)]


def test_a_mid_epoch_resume_skips_the_consumed_batches_but_still_drains_the_loader(tmp_path):
    trainer, engine, loader = make_trainer(tmp_path, "train.log_sample_ids=true"), FakeEngine(), batches(10)
    from launcher.checkpoints import SampleLog
    trainer.sample_log = SampleLog(tmp_path, 0, 4)
    pos = trainer.run_epoch(engine, loader, Position(0, 0, 4, 4))
    assert pos == Position(0, 0, 10) and engine.steps == 6 and loader.read == 10
    lines = (tmp_path / "sample_ids" / "rank0.txt").read_text().split("\n")
    assert lines[0].split() == ["5", "8", "9"]  # step 5 trained on batch 4 (sids 8, 9)


def test_the_last_step_of_the_run_ends_the_epoch_early(tmp_path):
    trainer, engine, loader = make_trainer(tmp_path, "train.checkpoint_every_steps=1", total_steps=7), \
        FakeEngine(), batches(10)
    pos = trainer.run_epoch(engine, loader, Position())
    assert pos.step == 7 and engine.steps == 7 and loader.read == 10
    assert [p.step for p in trainer.ckpt.saved] == [1, 2, 3, 4, 5, 6]  # not the last: the caller's


def test_a_stop_request_checkpoints_at_that_step_and_raises_preempted_once(tmp_path):
    trainer = make_trainer(tmp_path, stop=StopAfter(3))
    engine = FakeEngine()
    with pytest.raises(Preempted, match=r"stopped on request at step 3$"):
        trainer.run_epoch(engine, batches(10), Position())
    assert trainer.ckpt.saved == [Position(0, 0, 3, 3)] and engine.steps == 3


def test_a_stop_request_on_a_checkpoint_step_saves_once(tmp_path):
    trainer = make_trainer(tmp_path, "train.checkpoint_every_steps=2", stop=StopAfter(2))
    with pytest.raises(Preempted):
        trainer.run_epoch(FakeEngine(), batches(10), Position())
    assert trainer.ckpt.saved == [Position(0, 0, 2, 2)]


def test_at_an_epoch_end_the_checkpoint_is_written_then_the_stop_is_honoured(tmp_path):
    trainer = make_trainer(tmp_path, stop=StopAfter(1))
    with pytest.raises(Preempted, match="after epoch 2 of stage main"):
        trainer._after_step(FakeEngine(), Position(0, 2, 20), epoch_end=True)
    assert trainer.ckpt.saved == [Position(0, 2, 20)]
    quiet = make_trainer(tmp_path, stop=StopAfter(99))
    quiet._after_step(FakeEngine(), Position(0, 2, 20), epoch_end=True)
    assert quiet.ckpt.saved == [Position(0, 2, 20)]


@pytest.mark.parametrize("samples, world, batch", [(10, 1, 4), (10, 3, 4), (7, 2, 2), (100, 8, 5)])
def test_batches_per_epoch_pads_every_rank_to_the_longest_range(samples, world, batch):
    longest = -(-samples // world)
    assert batches_per_epoch(samples, world, batch) == -(-longest // batch)


@pytest.mark.parametrize("world, batch", [(1, 8), (2, 5), (3, 4)])
def test_the_run_plan_counts_the_steps_the_loaders_yield(cxr_shards, tmp_path, world, batch):
    """Steps per epoch from the manifest equal len(loader) of the DALI loader of every rank."""
    cfg = load_config(CONFIG, [f"data.shards={cxr_shards}", f"run.out_dir={tmp_path}",
                               f"train.batch_size_per_gpu={batch}", "data.loader=dali"])
    manifest = read_manifest(cxr_shards)
    run = Run.plan(cfg, manifest, world, cuda=False)
    for rank in range(world):
        loader = build_loader(cxr_shards, "train", backend="dali", batch_size=batch, image_size=32,
                              train=True, rank=rank, world_size=world)
        assert len(loader) == run.steps_per_epoch, (rank, world, batch)
        for _ in loader:  # DALI wants a drained pipeline
            pass


# ------------------------------------------------------------------------ non-finite training
def test_a_nan_loss_on_more_than_max_bad_steps_consecutive_steps_stops_naming_the_terms(tmp_path):
    trainer, engine = make_trainer(tmp_path, "train.max_bad_steps=2"), FakeEngine()
    engine.module.nan_calls = {4, 5, 6, 7, 8}
    with pytest.raises(NonFiniteTraining) as e:
        trainer.run_epoch(engine, batches(10), Position())
    assert str(e.value).startswith("training went non-finite: 'loss' was NaN/inf and 'task' was NaN/inf on 3 "
                                   "consecutive optimizer steps (up to step 6; train.max_bad_steps is 2); "
                                   "stopped before logging step 6, and nothing was saved from these weights; "
                                   "last good checkpoint: none (the run had saved none)")
    assert engine.steps == 6


def test_a_streak_no_longer_than_max_bad_steps_passes_and_the_count_restarts(tmp_path):
    trainer, engine = make_trainer(tmp_path, "train.max_bad_steps=2"), FakeEngine()
    engine.module.nan_calls = {2, 3, 6, 7}  # two streaks of 2
    assert trainer.run_epoch(engine, batches(10), Position()).step == 10


def test_a_streak_between_two_logging_steps_is_still_seen(tmp_path):
    trainer, engine = make_trainer(tmp_path, "train.max_bad_steps=1", "train.log_every=5"), FakeEngine()
    engine.module.nan_calls = {2, 3}  # ends before the check at step 5
    with pytest.raises(NonFiniteTraining, match=r"on 2 consecutive optimizer steps \(up to step 3;"):
        trainer.run_epoch(engine, batches(10), Position())


def test_steps_skipped_for_overflow_count_as_bad_steps(tmp_path):
    trainer, engine = make_trainer(tmp_path, "train.max_bad_steps=3"), FakeEngine()
    engine.skip_steps = {5, 6, 7, 8}
    with pytest.raises(NonFiniteTraining, match=r"an optimizer step skipped for overflow on 4 consecutive"):
        trainer.run_epoch(engine, batches(10), Position())


def test_weights_holding_nan_are_never_checkpointed_and_the_last_good_checkpoint_is_named(tmp_path):
    trainer, engine = make_trainer(tmp_path), FakeEngine()
    ckpt = trainer.ckpt.dir
    (ckpt / "main-e0000-s00000010").mkdir(parents=True)
    (ckpt / "main-e0000-s00000010" / "mp_rank_00_model_states.pt").write_bytes(b"states")
    write_file_manifest(ckpt / "main-e0000-s00000010")  # complete: the newest good one
    (ckpt / "main-e0000-s00000015").mkdir()  # a save that did not finish
    with torch.no_grad():
        engine.module.head.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteTraining, match=r"the student's weights hold NaN/inf; stopped before "
                                                r"checkpointing step 20, .* last good checkpoint: main-e0000-s00000010\."):
        trainer._after_step(engine, Position(0, 1, 20), epoch_end=True)
    assert trainer.ckpt.saved == []
