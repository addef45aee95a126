"""launcher.config: YAML + `--set` into nested dataclasses; every user mistake is a ConfigError that
names the key; the DeepSpeed JSON is derived from the config (one source of truth)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from launcher.config import ConfigError, dump_yaml, load_config
from launcher.ds_config import deepspeed_config

CONFIGS = Path(__file__).resolve().parents[1] / "launcher" / "configs"
TEACHER, DISTILL = CONFIGS / "demo_teacher.yaml", CONFIGS / "demo_distill.yaml"


# ------------------------------------------------------------------------------ loading
def test_demo_teacher_config_loads_as_supervised_resnet18():
    cfg = load_config(TEACHER)
    assert cfg.run.mode == "supervised"
    assert cfg.student.name == "resnet18" and cfg.student.in_chans == 3
    assert cfg.data.image_size == 64 and cfg.data.augment.crop_scale == [0.85, 1.0]
    assert cfg.train.lr == pytest.approx(2e-3) and cfg.train.zero_stage == "auto"
    assert cfg.train.resolved_zero_stage() == 1


def test_demo_distill_config_loads_with_teacher_checkpoint_and_mixed_objective():
    cfg = load_config(DISTILL)
    assert cfg.run.mode == "distill"
    assert cfg.student.name == "rmsnet_xxs" and cfg.student.in_chans == 1
    assert cfg.teacher.name == "resnet18" and cfg.teacher.checkpoint.endswith("model.pt")
    assert cfg.loss.at_weight > 0 and cfg.loss.sp_weight > 0 and cfg.loss.kd_weight > 0
    assert isinstance(cfg.loss.at_weight, float)  # YAML ints/floats become the annotated type


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_survives_a_dump_and_reload(path, tmp_path):
    cfg = load_config(path)
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(dump_yaml(cfg))
    assert load_config(dumped) == cfg


# ------------------------------------------------------------------------------ unknown keys
@pytest.mark.parametrize("override,key", [
    ("trian.epochs=3", "trian"),
    ("train.lrr=0.1", "train.lrr"),
    ("data.augment.flip=0.5", "data.augment.flip"),
])
def test_unknown_key_in_override_raises_config_error_naming_it(override, key):
    with pytest.raises(ConfigError, match=rf"unknown config key\(s\) {key}\b"):
        load_config(DISTILL, [override])


def test_unknown_key_in_yaml_file_raises_config_error_naming_it(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(DISTILL.read_text().replace("  warmup_steps: 30", "  warmup_step: 30"))
    with pytest.raises(ConfigError, match=r"train\.warmup_step\b") as e:
        load_config(path)
    assert "warmup_steps" in str(e.value)  # the valid keys are listed, so the typo is obvious


# ------------------------------------------------------------------------------ wrong types
@pytest.mark.parametrize("override,key", [
    ("train.epochs=abc", "train.epochs"),
    ("train.epochs=2.5", "train.epochs"),
    ("train.lr=true", "train.lr"),
    ("train.lr=fast", "train.lr"),
    ("data.image_size=[64]", "data.image_size"),
    ("data.augment.crop_scale=0.5", "data.augment.crop_scale"),
    ("data.augment.crop_scale=[0.5, x]", "data.augment.crop_scale[1]"),
    ("student.in_chans=one", "student.in_chans"),
    ("run.name=[a, b]", "run.name"),
    ("data=3", "data"),
])
def test_wrong_type_raises_config_error_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(DISTILL, [override])
    assert str(e.value).startswith(f"{key}:"), str(e.value)


# ------------------------------------------------------------------------------ overrides
def test_set_overrides_a_nested_value_and_keeps_its_siblings():
    cfg = load_config(DISTILL, ["data.augment.hflip=0.5"])
    assert cfg.data.augment.hflip == 0.5
    assert cfg.data.augment.crop_scale == [0.85, 1.0] and cfg.data.augment.rotate_degrees == 5.0
    assert load_config(DISTILL).data.augment.hflip == 0.0


def test_later_overrides_win_and_values_are_parsed_as_yaml():
    cfg = load_config(DISTILL, ["train.epochs=3", "train.epochs=4", "loss.focal_alpha=null",
                                "student.feature_indices=[1, 2, 3]", "data.shards=/tmp/x=y"])
    assert cfg.train.epochs == 4
    assert cfg.loss.focal_alpha is None
    assert cfg.student.feature_indices == [1, 2, 3]
    assert cfg.data.shards == "/tmp/x=y"  # only the first '=' separates key and value


@pytest.mark.parametrize("text,value", [("3e-4", 3e-4), ("3.0e-4", 3e-4), ("1E-3", 1e-3), ("2", 2.0)])
def test_float_fields_accept_exponent_notation_as_documented(text, value):
    """The module docstring promises `--set train.lr=3e-4`; YAML 1.1 reads '3e-4' as a string."""
    cfg = load_config(DISTILL, [f"train.lr={text}"])
    assert cfg.train.lr == pytest.approx(value) and isinstance(cfg.train.lr, float)


def test_override_without_equals_sign_is_refused():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(DISTILL, ["train.epochs"])


def test_override_through_a_scalar_is_refused_naming_it():
    with pytest.raises(ConfigError, match="not a section"):
        load_config(DISTILL, ["train.epochs.max=3"])


# ------------------------------------------------------------------------------ Literal fields
@pytest.mark.parametrize("override,key", [
    ("train.precision=fp8", "train.precision"),
    ("data.loader=gpu", "data.loader"),
    ("run.mode=teach", "run.mode"),
    ("teacher.dtype=int8", "teacher.dtype"),
    ("train.optimizer=adam", "train.optimizer"),
])
def test_literal_field_rejects_a_value_outside_its_choices(override, key):
    with pytest.raises(ConfigError, match=r"must be one of \[") as e:
        load_config(DISTILL, [override])
    assert str(e.value).startswith(f"{key}:")


# ------------------------------------------------------------------------------ range checks
@pytest.mark.parametrize("override,key", [
    ("train.zero_stage=5", "train.zero_stage"),
    ("train.epochs=0", "train.epochs"),
    ("train.batch_size_per_gpu=0", "train.batch_size_per_gpu"),
    ("train.lr=0", "train.lr"),
    ("data.image_size=16", "data.image_size"),
    ("data.augment.hflip=1.5", "data.augment.hflip"),
    ("data.augment.crop_scale=[0.9, 0.5]", "data.augment.crop_scale"),
    ("loss.temperature=0", "loss.temperature"),
    ("loss.kd_weight=-1", "loss.kd_weight"),
])
def test_out_of_range_value_raises_config_error_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(DISTILL, [override])


def test_distill_mode_requires_a_teacher_checkpoint():
    with pytest.raises(ConfigError, match="teacher.checkpoint"):
        load_config(DISTILL, ["teacher.checkpoint="])


def test_missing_or_invalid_config_file_is_a_config_error_naming_it(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_string_field_keeps_the_text_the_user_typed():
    assert load_config(DISTILL, ["run.name=0.10"]).run.name == "0.10"


def test_nan_learning_rate_is_refused():
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_config(DISTILL, ["train.lr=.nan"])


# ------------------------------------------------------------------------------ DeepSpeed JSON
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_deepspeed_config_is_derived_from_the_config(precision):
    cfg = load_config(DISTILL, ["train.batch_size_per_gpu=8", "train.gradient_accumulation_steps=3",
                                "train.zero_stage=1", "train.warmup_steps=30"])
    ds = deepspeed_config(cfg, world_size=2, total_steps=100, precision=precision)
    json.dumps(ds)  # it is written beside the run as JSON
    assert ds["train_batch_size"] == 8 * 3 * 2
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == 1
    assert ds["scheduler"]["type"] == "WarmupCosineLR"
    params = ds["scheduler"]["params"]
    assert params["total_num_steps"] == 100 and params["warmup_num_steps"] == 30
    assert params["cos_min_ratio"] == cfg.train.min_lr_ratio
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == pytest.approx(cfg.train.lr)
    assert ds["gradient_clipping"] == cfg.train.grad_clip
    assert ds["bf16"]["enabled"] is (precision == "bf16")
    assert ds["fp16"]["enabled"] is (precision == "fp16")
    # BatchNorm's running statistics follow the weights into bf16/fp16 (DeepSpeed would keep them fp32).
    assert ds.get("data_types", {}).get("buffer_dtype") == (None if precision == "fp32" else precision)


@pytest.mark.parametrize("setting, world, expected", [
    ("auto", 1, False), ("auto", 2, True), ("on", 1, True), ("off", 4, False)])
def test_contiguous_gradients_follow_the_world_size_unless_set(setting, world, expected):
    cfg = load_config(DISTILL, [f"train.contiguous_gradients={setting}"])
    ds = deepspeed_config(cfg, world_size=world, total_steps=10, precision="fp32")
    assert ds["zero_optimization"]["contiguous_gradients"] is expected


def test_contiguous_gradients_rejects_other_values():
    with pytest.raises(ConfigError, match="train.contiguous_gradients"):
        load_config(DISTILL, ["train.contiguous_gradients=maybe"])


def test_deepspeed_warmup_is_kept_shorter_than_a_short_run():
    cfg = load_config(DISTILL, ["train.warmup_steps=30"])
    params = deepspeed_config(cfg, world_size=1, total_steps=10, precision="fp32")["scheduler"]["params"]
    assert params["total_num_steps"] == 10 and params["warmup_num_steps"] < 10


def test_deepspeed_sgd_optimizer_carries_momentum():
    cfg = load_config(DISTILL, ["train.optimizer=sgd", "train.momentum=0.8"])
    opt = deepspeed_config(cfg, world_size=4, total_steps=50, precision="fp32")["optimizer"]
    assert opt["type"] == "SGD" and opt["params"]["momentum"] == 0.8


def test_deepspeed_adamw_is_torchs_fused_kernel_on_cuda_only():
    cfg = load_config(DISTILL)
    gpu = deepspeed_config(cfg, world_size=1, total_steps=10, precision="bf16", cuda=True)["optimizer"]["params"]
    cpu = deepspeed_config(cfg, world_size=1, total_steps=10, precision="fp32")["optimizer"]["params"]
    assert gpu["torch_adam"] and gpu["fused"] is True
    assert cpu["torch_adam"] and "fused" not in cpu


@pytest.mark.parametrize("value, stage", [("auto", 1), ("0", 0), ("1", 1), ("2", 2), ("3", 3)])
def test_zero_stage_auto_is_stage_1_and_numbers_pass_through(value, stage):
    cfg = load_config(DISTILL, [f"train.zero_stage={value}"])
    assert cfg.train.resolved_zero_stage() == stage
    assert deepspeed_config(cfg, world_size=2, total_steps=10, precision="fp32")["zero_optimization"]["stage"] == stage


@pytest.mark.parametrize("value", ["true", "4", "two", "1.0"])
def test_zero_stage_refuses_anything_else_naming_the_key(value):
    with pytest.raises(ConfigError, match="train.zero_stage"):
        load_config(DISTILL, [f"train.zero_stage={value}"])


# ------------------------------------------------------------------ values that cannot train
@pytest.mark.parametrize("assignment, key", [
    ("loss.focal_gamma=nan", "loss.focal_gamma"), ("train.lr=inf", "train.lr"),
    ("train.weight_decay=-inf", "train.weight_decay"), ("loss.focal_alpha=.nan", "loss.focal_alpha"),
    ("data.augment.crop_scale=[0.5, .inf]", "data.augment.crop_scale[1]")])
def test_a_non_finite_number_in_any_float_field_is_refused_naming_the_key(assignment, key):
    with pytest.raises(ConfigError) as e:
        load_config(DISTILL, [assignment])
    assert str(e.value).startswith(f"{key}: must be a finite number")


def test_a_non_finite_number_in_the_yaml_file_is_refused_too(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("loss:\n  temperature: .inf\n")
    with pytest.raises(ConfigError, match=r"^loss\.temperature: must be a finite number, got inf$"):
        load_config(cfg)


def test_a_per_rank_batch_of_one_is_refused_before_anything_starts():
    with pytest.raises(ConfigError, match=r"train\.batch_size_per_gpu must be >= 2: BatchNorm"):
        load_config(DISTILL, ["train.batch_size_per_gpu=1"])


def test_a_key_written_twice_names_the_key_and_both_lines(tmp_path):
    cfg = tmp_path / "twice.yaml"
    cfg.write_text("run:\n  name: a\ntrain:\n  lr: 1.0e-3\n  epochs: 3\ndata:\n  image_size: 64\n"
                   "train:\n  epochs: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert str(e.value) == (f"{cfg}: key train appears twice, on lines 3 and 8 (YAML would keep only the "
                            f"second); merge them")


def test_a_nested_or_stage_key_written_twice_is_refused_with_its_path(tmp_path):
    cfg = tmp_path / "nested.yaml"
    cfg.write_text("train:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"key train\.lr appears twice, on lines 2 and 3"):
        load_config(cfg)
    cfg.write_text("stages:\n  - name: hint\n    epochs: 1\n  - name: kd\n    loss: {kd_weight: 1, kd_weight: 2}\n")
    with pytest.raises(ConfigError, match=r"key stages\[1\]\.loss\.kd_weight appears twice, on lines 5 and 5"):
        load_config(cfg)
