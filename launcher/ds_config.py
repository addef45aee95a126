"""What a config becomes on a given machine: the checks that need the world size or the device,
the `auto` settings resolved, and the DeepSpeed JSON, *generated* from the config (never
hand-written), so there is one source of truth; both are written into the run directory."""
from __future__ import annotations

from typing import Optional

from launcher.config import Config, ConfigError, StageConfig


def check_world(cfg: Config, world_size: int) -> None:
    """Consistency checks that need the world size (run before any process group starts)."""
    t = cfg.train
    emulate = cfg.data.emulate_world_size
    if emulate > 1 and (world_size != 1 or t.gradient_accumulation_steps != emulate):
        raise ConfigError(f"data.emulate_world_size={emulate} needs one process and "
                          f"train.gradient_accumulation_steps={emulate} (world size {world_size}, "
                          f"accumulation {t.gradient_accumulation_steps})")
    per_step = t.batch_size_per_gpu * t.gradient_accumulation_steps * world_size
    if t.global_batch_size is not None and t.global_batch_size != per_step:
        raise ConfigError(
            f"train.global_batch_size {t.global_batch_size} != batch_size_per_gpu "
            f"{t.batch_size_per_gpu} x gradient_accumulation_steps {t.gradient_accumulation_steps} x "
            f"world size {world_size} = {per_step}; "
            + (f"set train.gradient_accumulation_steps={t.global_batch_size // (t.batch_size_per_gpu * world_size)}"
               if t.global_batch_size % (t.batch_size_per_gpu * world_size) == 0
               else f"{t.global_batch_size} is not divisible by {t.batch_size_per_gpu} x {world_size}"))


# ------------------------------------------------------------------------------- DeepSpeed JSON
def check_device(cfg: Config, cuda: bool) -> None:
    """What the device must offer (run before any process group starts): fp16 is GPU-only."""
    if cuda:
        return
    for key, value in (("train.precision", cfg.train.precision), ("teacher.dtype", cfg.teacher.dtype)):
        if value == "fp16":
            raise ConfigError(f"{key}=fp16 needs a GPU (DeepSpeed has no fp16 on CPU, and this machine "
                              f"has no CUDA device): use fp32, bf16 or auto")


def resolve_switch(value: str, cuda: bool, zero_stage: int = 0) -> bool:
    """An `auto | on | off` field (train.compile, train.channels_last): auto = on for CUDA (and,
    for compile, ZeRO stage 0-2)."""
    return value == "on" or (value == "auto" and cuda and zero_stage < 3)


def resolve_precision(precision: str, cuda: bool) -> str:
    if precision != "auto":
        return precision
    import torch
    return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"


def deepspeed_config(cfg: Config, world_size: int, total_steps: int, precision: str,
                     stage: Optional[StageConfig] = None, cuda: bool = False) -> dict:
    """The DeepSpeed JSON of one stage, derived from `cfg`, the world size and the device (never
    hand-written). AdamW is torch's (`torch_adam`: no DeepSpeed op to build), with its fused kernel
    on CUDA (one kernel for the whole update, the step counter kept on the device)."""
    t = cfg.train
    stage = stage or cfg.resolved_stages()[0]
    lr = stage.lr if stage.lr is not None else t.lr
    if t.optimizer == "adamw":
        optimizer = {"type": "AdamW", "params": {"lr": lr, "weight_decay": t.weight_decay,
                                                 "betas": [0.9, 0.999], "eps": 1e-8, "torch_adam": True,
                                                 **({"fused": True} if cuda else {})}}
    else:
        optimizer = {"type": "SGD", "params": {"lr": lr, "weight_decay": t.weight_decay,
                                               "momentum": t.momentum, "nesterov": True}}
    warmup_steps = stage.warmup_steps if stage.warmup_steps is not None else t.warmup_steps
    warmup = min(warmup_steps, max(total_steps - 1, 0))
    contiguous = (world_size > 1) if t.contiguous_gradients == "auto" else t.contiguous_gradients == "on"
    return {
        "train_batch_size": t.batch_size_per_gpu * t.gradient_accumulation_steps * world_size,
        "train_micro_batch_size_per_gpu": t.batch_size_per_gpu,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "optimizer": optimizer,
        "scheduler": {"type": "WarmupCosineLR", "params": {
            "total_num_steps": max(total_steps, 1), "warmup_num_steps": warmup,
            "warmup_min_ratio": 0.0, "cos_min_ratio": t.min_lr_ratio, "warmup_type": "linear"}},
        # torch.optim.SGD is not on DeepSpeed's list of ZeRO-tested optimizers; it is plain SGD.
        "zero_allow_untested_optimizer": t.optimizer == "sgd",
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.resolved_zero_stage(),
                              "contiguous_gradients": contiguous},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 12},
        # DeepSpeed >= 0.19 casts parameters but keeps buffers in fp32 unless told otherwise, and
        # BatchNorm cannot mix bf16/fp16 weights with fp32 running statistics.
        **({"data_types": {"buffer_dtype": precision}} if precision in ("bf16", "fp16") else {}),
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
