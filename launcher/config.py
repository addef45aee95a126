"""Experiment configuration: nested dataclasses, YAML loading, `--set` overrides.

One YAML file per experiment (`launcher/configs/*.yaml`) fills `Config`; `--set section.key=value`
overrides any field (the value is parsed as YAML: `--set train.lr=3e-4`, `--set data.augment.hflip=0.5`).
Unknown keys and wrong types are errors that name the key. What a config becomes on a given
machine (world size and device checks, the `auto` settings resolved, the DeepSpeed JSON) is in
launcher/ds_config.py.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml


class ConfigError(ValueError):
    """A user's configuration mistake; the message names the key."""


ZERO_AUTO = 1
"""The ZeRO stage `train.zero_stage: auto` runs (TrainConfig.zero_stage says why)."""


@dataclass
class RunConfig:
    name: str = "run"
    """Run name; the run directory is `out_dir/name` (TensorBoard, checkpoints, resolved config)."""
    out_dir: str = "runs"
    """Parent directory of run directories."""
    seed: int = 0
    """Seed of model init, data order and augmentation (each rank derives its own stream)."""
    mode: Literal["distill", "supervised"] = "distill"
    """`distill`: teacher + mixed objective; `supervised`: task loss only, no teacher (trains the
    teacher itself, or the student-without-KD baseline)."""


@dataclass
class AugmentConfig:
    crop_scale: list[float] = field(default_factory=lambda: [0.8, 1.0])
    """Area range of the random resized crop; [1, 1] disables it."""
    hflip: float = 0.0
    """Horizontal flip probability (0 for chest X-rays: the heart's side is anatomy)."""
    rotate_degrees: float = 5.0
    brightness: float = 0.1
    contrast: float = 0.1

    def __post_init__(self):
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError("data.augment.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1")
        if not 0 <= self.hflip <= 1:
            raise ConfigError("data.augment.hflip must be a probability in [0, 1]")


@dataclass
class DataConfig:
    shards: str = ""
    """Directory with the shards and manifest.json written by `data_pipeline.build_shards`."""
    loader: Literal["auto", "dali", "torch"] = "auto"
    """`dali` (GPU decode on a GPU, CPU-only mode otherwise), `torch` fallback, or `auto`."""
    image_size: int = 224
    """Side of the square input the models see."""
    num_threads: int = 1
    """Loader threads per rank (DALI's num_threads; they come on top of torch's intra-op threads)."""
    emulate_world_size: int = 1
    """Single process only: replay the training data order of a run on this many ranks (needs
    train.gradient_accumulation_steps equal to it); for reproducing or checking a multi-GPU run."""
    verify: Literal["sha256", "size", "none"] = "sha256"
    """Before a run reads them, check each shard of its splits against the manifest: size and
    sha256 (`sha256`, every byte read once, split across ranks), size only (`size`, for datasets too
    large to hash at every start), or not at all (`none`). Damaged samples met while reading stop
    the run naming shard and sample unless `on_damaged: skip`."""
    on_damaged: Literal["stop", "skip"] = "stop"
    """A damaged sample (an image that does not decode, a label vector that is not 0/1, a member
    missing or cut off): `stop` the run with one line naming shard and sample, or `skip` it. With
    `skip`, a shard that differs from the manifest is a warning, not an error, and the samples of
    the shards that may hold damage are read and checked once before the run: with `verify:
    sha256` the shards whose sha256 (or size) differs, with `size` or `none` every shard (one CPU
    decode of the dataset, split across ranks). The damaged ones are left out by both loaders on
    every rank, counted in TensorBoard (`data/skipped/<split>`) and metrics.json, and listed in
    `skipped_samples.json` in the run directory."""
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        if self.image_size < 32:
            raise ConfigError("data.image_size must be >= 32")
        if self.emulate_world_size < 1:
            raise ConfigError("data.emulate_world_size must be >= 1")


@dataclass
class StudentConfig:
    name: str = "rmsnet_xxs"
    """timm model name (after `import rmsnet`: rmsnet_xxs, rmsnet_xs, mobilevit_xxs, or any timm model)."""
    in_chans: Optional[int] = 1
    """Input channels the network takes; 1 = grayscale natively; 3 = channel repeated."""
    feature_indices: Optional[list[int]] = None
    """Levels tapped for feature distillation (timm `forward_intermediates` indices); None = last three."""
    drop_rate: float = 0.0
    pretrained_file: str = ""
    """Local copy of the model's published (e.g. ImageNet) timm weights to start from; the head is
    re-initialised for this task and the stem adapted to in_chans. Never downloaded."""


@dataclass
class TeacherConfig:
    name: str = "resnet18"
    """timm model name of the teacher."""
    checkpoint: str = ""
    """Local weight file (safetensors, torch state dict, or a `model.pt` this project wrote)."""
    in_chans: Optional[int] = None
    """None = 3 for a non-RMS-Net model (grayscale is repeated inside the wrapper)."""
    feature_indices: Optional[list[int]] = None
    """Teacher levels, paired in order with `student.feature_indices`."""
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """Inference dtype (DeepSpeed's default is fp16); auto = bf16 on GPU, fp32 on CPU."""


@dataclass
class LossConfig:
    """L = task_weight*FL + kd_weight*KD + at_weight*AT + sp_weight*SP + hint_weight*HINT."""
    task_weight: float = 1.0
    focal_alpha: Optional[float] = 0.25
    """Focal alpha (None disables class weighting)."""
    focal_gamma: float = 2.0
    kd_weight: float = 1.0
    temperature: float = 4.0
    at_weight: float = 0.0
    """Attention transfer weight (the paper's beta: 1000)."""
    sp_weight: float = 0.0
    """Similarity-preserving weight (the paper's beta: 3000)."""
    sp_global_batch: bool = False
    """Similarity over the global batch: gather every rank's feature maps so the b x b matrices span
    world*b samples, as single-process training on the global batch would (gradients are summed
    back over ranks). Costs one all-gather per tapped level per step and world x the feature memory
    for SP. Off, each rank's SP only compares the samples of its own micro-batch: a weaker signal
    that changes with the number of GPUs."""
    hint_weight: float = 0.0
    """Stage-1 attended hidden-feature regression (needs adapters; trained with the student)."""

    def __post_init__(self):
        if not self.temperature > 0:  # written so that NaN fails too
            raise ConfigError("loss.temperature must be > 0")
        for k in ("task_weight", "kd_weight", "at_weight", "sp_weight", "hint_weight"):
            if not getattr(self, k) >= 0:
                raise ConfigError(f"loss.{k} must be >= 0")


@dataclass
class StageConfig:
    """One stage of a multi-stage recipe (e.g. stage-1 `hint` pre-training, then `kd`)."""
    name: str = "main"
    """Used in checkpoint tags and TensorBoard (`stage/<name>`)."""
    epochs: int = 1
    loss: LossConfig = field(default_factory=LossConfig)
    """The objective of this stage (all weights explicit: nothing is inherited from `loss`)."""
    lr: Optional[float] = None
    """Peak learning rate of this stage (None = train.lr); each stage has its own warmup + cosine."""
    warmup_steps: Optional[int] = None
    """None = train.warmup_steps."""

    def __post_init__(self):
        if self.epochs < 1:
            raise ConfigError(f"stages[{self.name}].epochs must be >= 1")
        if not self.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"stage name {self.name!r} must be alphanumeric (with - or _)")


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size_per_gpu: int = 32
    """Micro-batch per rank (DeepSpeed's train_micro_batch_size_per_gpu)."""
    gradient_accumulation_steps: int = 1
    global_batch_size: Optional[int] = None
    """Optional check: must equal batch_size_per_gpu x gradient_accumulation_steps x world size
    (so a config written for 8 GPUs fails loudly on 4 instead of silently halving the batch)."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    """SGD only."""
    warmup_steps: int = 100
    min_lr_ratio: float = 0.01
    """Cosine schedule ends at lr * min_lr_ratio."""
    grad_clip: float = 1.0
    """Max global gradient norm (0 disables)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto = bf16 on a GPU that supports it, fp32 on CPU."""
    zero_stage: Literal["auto", 0, 1, 2, 3] = "auto"
    """DeepSpeed ZeRO stage. auto = 1 (ZERO_AUTO): the optimizer state partitioned across ranks, the
    gradients reduced once after the backward. Measured side by side (bench/README.md, "ZeRO stage"):
    the fastest of 0, 1, 2 on an H200 and level with the best on CPU; stage 2's per-parameter
    gradient hooks cost time, and stage 0 in bf16 checks each gradient tensor for overflow with a
    host sync of its own. Stages 2 and 3 partition gradients and weights, which only pays for a
    student far larger than RMS-Net. A run started under ZeRO-2 (the default before auto) resumes
    under ZeRO-1: both keep one flat optimizer state."""
    contiguous_gradients: Literal["auto", "on", "off"] = "auto"
    """ZeRO's contiguous gradient buffer. auto = off in a world of one process (the per-parameter
    copy into the bucket costs ~3 % of a step there and saves nothing; bench/README.md), DeepSpeed's
    default (on) with several ranks, where it avoids fragmentation while gradients are reduced."""
    compile: Literal["auto", "on", "off"] = "auto"
    """Compile the student with its objective (DeepSpeed's `engine.compile()`, torch.compile
    underneath) and the frozen teacher (torch.compile). auto = on for CUDA, off on CPU: at the
    demo's sizes on 2 cores (bench/README.md) the compiled step ran 5 to 22 % faster, but its
    first step took 140 s of compilation per rank, more than a demo-sized run saves. ZeRO stage 0-2
    only. The first step's time, compilation included, is logged apart (`train/time/compile_s`),
    with the graph and graph-break counts (`train/compile/*`); a recompilation is warned about."""
    compile_backend: str = "inductor"
    """torch.compile backend when compiling (`aot_eager` traces without generating code: a quick
    check that the step compiles without graph breaks)."""
    channels_last: Literal["auto", "on", "off"] = "auto"
    """Channels-last memory format (NHWC, what tensor cores want) for the images, hence every
    activation of both networks, and the teacher's weights. The student's weights stay as ZeRO
    keeps them (its flat buffers, and the broadcast at start-up, need contiguous tensors): the
    convolutions take the input's layout. auto = on for CUDA, off on CPU."""
    log_every: int = 10
    """Optimizer steps between TensorBoard scalar writes (the only steps that call .item())."""
    max_steps: int = 0
    """Stop after this many optimizer steps in total (0 = run all epochs); for smoke tests."""
    keep_checkpoints: int = 2
    """Epoch checkpoints kept (newest first); 0 keeps all. The best student is kept apart."""
    checkpoint_every_steps: int = 0
    """Also checkpoint inside epochs every this many optimizer steps (0 = at epoch ends only);
    a resumed run skips the batches already consumed, so it continues exactly."""
    log_sample_ids: bool = False
    """Write the sample ids of every step to <run>/sample_ids/rank<r>.txt (audits data order)."""
    max_bad_steps: int = 10
    """Consecutive optimizer steps with a NaN/inf loss term (or skipped for fp16 overflow) after
    which the run stops with an error (launcher/nonfinite.py); fp16's loss-scale warm-up (from
    2^12) skips fewer. Whatever the count, nothing with NaN/inf weights is saved or exported."""
    early_stopping_patience: int = 0
    """Stop after this many validated epochs without a gain in validation mean AUROC (0 = off)."""
    grad_shares_every: int = 0
    """Every this many optimizer steps, log each loss term's gradient norm over the student's
    parameters and its share of their sum (`train/grad_share/<term>`): which term drives the
    update. One extra backward pass per term on those steps; 0 = off. ZeRO stage 0-2 only."""

    def resolved_zero_stage(self) -> int:
        return ZERO_AUTO if self.zero_stage == "auto" else self.zero_stage

    def __post_init__(self):
        if not (self.zero_stage == "auto" or (type(self.zero_stage) is int and self.zero_stage in (0, 1, 2, 3))):
            raise ConfigError(f"train.zero_stage must be auto, 0, 1, 2 or 3, got {self.zero_stage}")
        for k in ("epochs", "batch_size_per_gpu", "gradient_accumulation_steps", "log_every"):
            if getattr(self, k) < 1:
                raise ConfigError(f"train.{k} must be >= 1")
        if self.batch_size_per_gpu < 2:
            raise ConfigError("train.batch_size_per_gpu must be >= 2: BatchNorm cannot train on one sample "
                              "per rank (every training batch is full: the loaders pad the last one); for a "
                              "small memory budget raise train.gradient_accumulation_steps instead")
        if not self.lr > 0:  # NaN fails too
            raise ConfigError("train.lr must be > 0")
        for k in ("weight_decay", "grad_clip", "min_lr_ratio", "momentum"):
            if not getattr(self, k) >= 0:
                raise ConfigError(f"train.{k} must be >= 0")
        if self.max_bad_steps < 0:
            raise ConfigError("train.max_bad_steps must be >= 0")
        if self.grad_shares_every < 0:
            raise ConfigError("train.grad_shares_every must be >= 0")
        if self.grad_shares_every and self.resolved_zero_stage() == 3:
            raise ConfigError("train.grad_shares_every needs whole parameters on every rank: ZeRO stage "
                              "0-2 (stage 3 partitions them)")
        if self.compile == "on" and self.resolved_zero_stage() == 3:
            raise ConfigError("train.compile=on works with ZeRO stage 0-2: stage 3 gathers and releases "
                              "parameters in hooks around every module, which break the compiled graph; "
                              "use train.zero_stage 0, 1 or 2 (a 1 M-parameter student gains nothing "
                              "from partitioning its weights)")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stages: list[StageConfig] = field(default_factory=list)
    """Optional multi-stage recipe; empty = one stage with `loss` for `train.epochs` epochs."""

    def __post_init__(self):
        if self.run.mode == "distill" and not self.teacher.checkpoint:
            raise ConfigError("teacher.checkpoint is required when run.mode is distill")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stage names must be unique, got {names}")

    def resolved_stages(self) -> list[StageConfig]:
        """The stages to run, with lr/warmup filled in; supervised mode keeps the task loss only."""
        stages = self.stages or [StageConfig("main", self.train.epochs, self.loss)]
        out = []
        for s in stages:
            loss = s.loss
            if self.run.mode == "supervised":
                loss = dataclasses.replace(loss, kd_weight=0.0, at_weight=0.0, sp_weight=0.0,
                                           hint_weight=0.0)
            out.append(dataclasses.replace(
                s, loss=loss, lr=self.train.lr if s.lr is None else s.lr,
                warmup_steps=self.train.warmup_steps if s.warmup_steps is None else s.warmup_steps))
        return out

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name


# ------------------------------------------------------------------------------------ loading
class _Override(str):
    """A `--set` value: the text as typed, plus its YAML reading (`parsed`). String fields take the
    text (so `run.name=0.10` stays '0.10'), every other field the YAML value."""

    def __new__(cls, text: str):
        self = super().__new__(cls, text)
        self.parsed = yaml.safe_load(text) if text.strip() else ""
        return self


def _convert(tp, value, key: str):
    """Check/convert one YAML value to the annotated type, naming `key` on failure."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(value, _Override):
        wants_text = tp is str or (origin in (typing.Union, types.UnionType) and str in args)
        scalar = value.parsed is not None and not isinstance(value.parsed, (list, dict))
        value = str(value) if wants_text and scalar else value.parsed
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, key)
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(args):  # YAML 1.1 reads on/off as booleans
            value = "on" if value else "off"
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `5e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # .nan, .inf in YAML; nan, inf in --set
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
                          f"valid keys{' of ' + prefix if prefix else ''}: {', '.join(sorted(names))}")
    kwargs = {k: _convert(hints[k], v, f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def apply_override(data: dict, assignment: str) -> None:
    """Apply one `a.b.c=value` (value parsed as YAML) to a nested dict."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {p} is not a section")
    node[parts[-1]] = _Override(raw)


def refuse_duplicate_keys(node, path: Path, prefix: str = "") -> None:
    """A key written twice in one mapping is an error naming it and both lines: YAML readers keep
    the last one, which silently drops everything the first block set."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            refuse_duplicate_keys(item, path, f"{prefix}[{i}]")
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict = {}
    for key, value in node.value:
        name = key.value if isinstance(key, yaml.ScalarNode) else str(key.value)
        full = f"{prefix}.{name}" if prefix else name
        if name in seen:
            raise ConfigError(f"{path}: key {full} appears twice, on lines {seen[name] + 1} and "
                              f"{key.start_mark.line + 1} (YAML would keep only the second); merge them")
        seen[name] = key.start_mark.line
        refuse_duplicate_keys(value, path, full)


def load_config(path=None, overrides=()) -> Config:
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found")
        text = p.read_text()
        try:
            refuse_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), p)
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: top level must be a mapping")
    for o in overrides:
        apply_override(data, o)
    try:
        return _build(Config, data)
    except TypeError as e:  # a dataclass refusing its arguments
        raise ConfigError(str(e)) from None


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
