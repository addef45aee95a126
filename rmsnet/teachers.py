"""One wrapper for teacher and student: a timm model, its own input handling, multi-level taps.

Distillation compares the two networks level by level (attention transfer, similarity preserving,
the stage-1 hint), so both must be tapped the same way and both must see the same images in their
own input convention. `TappedModel` owns that: it takes grayscale images in [0, 1], repeats the
channel for a 3-channel teacher, applies the wrapped model's own mean/std, and returns the logits
and the feature maps at `feature_indices` from one forward pass (timm's `forward_intermediates`).

Teachers are loaded only from local files (no hub access is assumed on a cluster node): safetensors
or a torch state dict read with `weights_only=True`, bare or under "model" (this project's
checkpoints), "state_dict" or "module" (DeepSpeed), with "module." prefixes stripped. Loading is
strict: a checkpoint that does not fit raises one `CheckpointMismatchError` naming the file and
counting missing / unexpected keys and shape mismatches. A silent partial load would make a
randomly initialised teacher look like a trained one.

`create_teacher` = `create_tapped_model` + `freeze`: eval mode, no gradients, and `.train()` keeps it
in eval, because the student's training loop calls `.train()` on everything it owns.
"""
from __future__ import annotations

import inspect
import os
import types
import warnings
from typing import Mapping, Sequence

import timm
import torch
from torch import nn

__all__ = ["TappedModel", "CheckpointMismatchError", "create_tapped_model", "create_teacher",
           "describe_unreadable", "freeze", "load_checkpoint", "read_state_dict"]

GRAY_MEAN, GRAY_STD = (0.5,), (0.25,)  # 1-channel default: maps [0, 1] to [-2, 2]
_WRAPPER_KEYS = ("model", "state_dict", "module")  # where checkpoints keep the weights
_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel / DeepSpeed, torch.compile


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not fit the model; nothing was loaded."""

    def __init__(self, path: str, missing: list, unexpected: list, shape_mismatches: list, arch: str = ""):
        self.path, self.missing, self.unexpected = path, missing, unexpected
        self.shape_mismatches = shape_mismatches
        parts = [f"checkpoint {path} does not match model {arch or '?'}: {len(missing)} missing keys, "
                 f"{len(unexpected)} unexpected keys, {len(shape_mismatches)} shape mismatches"]
        if missing:
            parts.append(f"missing e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected e.g. {unexpected[:3]}")
        for key, got, want in shape_mismatches[:3]:
            parts.append(f"{key}: checkpoint {list(got)} vs model {list(want)}")
        super().__init__("; ".join(parts))


def _input_channels(model: nn.Module) -> int:
    if hasattr(model, "in_chans"):  # every timm model records it
        return int(model.in_chans)
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError(f"cannot tell how many input channels {type(model).__name__} takes")
    return conv.in_channels


def _num_levels(model: nn.Module) -> int:
    info = getattr(model, "feature_info", None)
    if not hasattr(model, "forward_intermediates") or not info:
        raise ValueError(f"{type(model).__name__} has no timm forward_intermediates/feature_info to tap")
    return len(info)


def resolve_feature_indices(model: nn.Module, indices: Sequence[int] | None) -> list[int]:
    """None -> the last three levels (the last three stages for CNNs and RMS-Net, the last three
    blocks for a ViT); negative indices count from the end, as in timm."""
    n = _num_levels(model)
    if indices is None:
        return list(range(max(0, n - 3), n))
    resolved = [i + n if i < 0 else i for i in indices]
    bad = [i for i, r in zip(indices, resolved) if not 0 <= r < n]
    if bad:
        raise ValueError(f"feature indices {bad} out of range for {type(model).__name__} with {n} levels")
    return resolved


class TappedModel(nn.Module):
    """A timm model + its own input handling + multi-level feature taps.

    forward(x): x (b, 1 or 3, h, w) in [0, 1] -> (logits (b, num_classes), [(b, c_i, h_i, w_i), ...]),
    logits identical to `model(normalise(x))`, all from one forward pass.
    """

    def __init__(self, model: nn.Module, feature_indices: Sequence[int] | None, mean, std):
        super().__init__()
        self.model = model
        self.in_chans = _input_channels(model)
        self.feature_indices = resolve_feature_indices(model, feature_indices)
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)  # (1, c, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        for what, t in (("mean", mean_t), ("std", std_t)):
            if t.shape[1] not in (1, self.in_chans):
                raise ValueError(f"{what} has {t.shape[1]} values, the model takes {self.in_chans} channels")
        if (std_t <= 0).any():
            raise ValueError(f"std must be positive, got {std}")
        # Not persistent: normalisation is configuration, and checkpoints hold only model weights.
        # Cloned: a view of the 1-d tensor would keep an fp32 base after DeepSpeed's bf16/fp16
        # engines swap the buffer's data, which torch.compile's tracing refuses.
        self.register_buffer("mean", mean_t.clone(), persistent=False)
        self.register_buffer("std", std_t.clone(), persistent=False)
        params = inspect.signature(model.forward_intermediates).parameters
        # MobileViT's last level would otherwise be its final 1x1 conv, not the last stage.
        self._tap_kwargs = {"exclude_final_conv": True} if "exclude_final_conv" in params else {}

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 1 or 3, h, w) in [0, 1] -> the wrapped model's input (b, in_chans, h, w)."""
        if x.dim() != 4:
            raise ValueError(f"expected images (b, c, h, w), got shape {tuple(x.shape)}")
        c = x.shape[1]
        if c != self.in_chans:
            if c == 1:
                x = x.repeat(1, self.in_chans, 1, 1)  # (b, 3, h, w): grayscale for an RGB teacher
            elif self.in_chans == 1:
                x = x.mean(dim=1, keepdim=True)  # (b, 1, h, w): an RGB-saved grayscale image
            else:
                raise ValueError(f"model takes {self.in_chans} channels, got images with {c}")
        # Normalise in fp32, then feed the model its parameters' dtype: DeepSpeed's bf16/fp16
        # training engine casts parameters but not these buffers, its inference engine both.
        x = (x.float() - self.mean.float()) / self.std.float()
        return x.to(next(self.model.parameters()).dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.normalise(x)  # (b, in_chans, h, w)
        final, feats = self.model.forward_intermediates(
            x, indices=self.feature_indices, intermediates_only=False, **self._tap_kwargs)
        return self.model.forward_head(final), feats  # (b, classes), [(b, c_i, h_i, w_i)]

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalise(x))  # (b, classes)

    @torch.no_grad()
    def feature_shapes(self, image_size: int) -> list[tuple[int, int, int]]:
        """(c, h, w) per tap for square inputs of `image_size`, from one dry run in eval mode
        (eval so BatchNorm statistics of a training student are not touched)."""
        was_training = self.model.training
        self.model.eval()
        try:
            x = torch.zeros(1, self.in_chans, image_size, image_size, device=self.mean.device)
            _, feats = self(x)
        finally:
            self.model.train(was_training)
        return [tuple(f.shape[1:]) for f in feats]

    def feature_channels(self, image_size: int) -> list[int]:
        return [c for c, _, _ in self.feature_shapes(image_size)]


def _stay_in_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode, no gradients, and `.train()` -- on it, a parent or any submodule -- leaves it in eval."""
    module.eval()
    module.requires_grad_(False)
    for m in module.modules():  # every submodule, so wrapping or reaching into it cannot undo this
        m.train = types.MethodType(_stay_in_eval, m)  # instance attribute shadows nn.Module.train
    return module


def describe_unreadable(path: str | os.PathLike, error: BaseException) -> str:
    """Why a checkpoint file could not be read, in words a user can act on: what the file is
    (empty, text, a damaged torch.save archive, ...), its size, and the reader's own error."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        return f"cannot read checkpoint {path}: {e.strerror or e}"
    first = (str(error).strip().splitlines() or [""])[0]  # torch's own messages run to many lines
    why = f"{type(error).__name__}: {first[:157] + '...' if len(first) > 160 else first}"
    if size == 0:
        what = "an empty file"
    elif head.startswith(b"PK\x03\x04"):
        what = f"a torch.save zip archive of {size} bytes that cannot be read: damaged or cut short"
    elif head[:1] == b"\x80":
        what = f"a pickle of {size} bytes that torch cannot read (damaged, or not a state dict)"
    elif len(head) > 8 and head[8:9] == b"{" and path.endswith(".safetensors"):
        what = f"a safetensors file of {size} bytes that cannot be read: damaged or cut short"
    else:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
            what = f"a text file ({size} bytes, starting {text[:32]!r}), not a checkpoint"
        else:
            what = f"not a checkpoint: neither a torch.save file nor safetensors ({size} bytes)"
    return f"checkpoint {path} is {what} ({why})"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a local checkpoint file, unwrapped and with wrapper prefixes stripped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            obj = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with arbitrary objects, ...
        raise ValueError(describe_unreadable(path, e)) from e
    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"checkpoint {path} holds no state dict (a mapping of names to tensors)")
    state = dict(obj)
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Strictly load a local checkpoint into `model` (a timm model or a TappedModel)."""
    if isinstance(model, TappedModel):
        model = model.model
    state = read_state_dict(path)
    expected = model.state_dict()
    if expected and not any(k.startswith("model.") for k in expected) and \
            all(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items()}  # a whole TappedModel was saved
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        arch = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
        raise CheckpointMismatchError(os.fspath(path), missing, unexpected, shapes, arch)
    model.load_state_dict(state, strict=True)


def create_tapped_model(name: str, num_classes: int, *, in_chans: int | None = None,
                        feature_indices: Sequence[int] | None = None, checkpoint: str | None = None,
                        mean=None, std=None, pretrained_file: str | None = None,
                        **timm_kwargs) -> TappedModel:
    """Build timm model `name` (never downloading weights), load `checkpoint` if given, wrap it.

    checkpoint: this exact architecture's weights, loaded strictly (a resumed or trained model).
    pretrained_file: a local copy of the model's published (e.g. ImageNet) weights, loaded by timm's
    own pretrained loader, which re-initialises a classifier of another class count and adapts the
    stem to `in_chans`: fine-tuning a teacher from ImageNet weights without any hub access.

    in_chans None: 1 for rmsnet_* (grayscale-native students), 3 for everything else.
    mean/std None: (0.5,)/(0.25,) for 1-channel models, else the model's timm pretrained_cfg values.
    """
    if timm_kwargs.pop("pretrained", False):
        raise ValueError("pretrained=True would download weights; pass checkpoint=<local file> instead")
    if in_chans is None:
        in_chans = 1 if name.startswith("rmsnet_") else 3
    if name.startswith("rmsnet_"):
        import rmsnet.model  # noqa: F401  registers the variants with timm
    if pretrained_file:
        if not os.path.isfile(pretrained_file):
            raise FileNotFoundError(f"pretrained weights {pretrained_file}: file not found")
        timm_kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(pretrained_file)})
    else:
        timm_kwargs["pretrained"] = False
    try:
        model = timm.create_model(name, num_classes=num_classes, in_chans=in_chans, **timm_kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"unknown timm model name {name!r}") from e
        raise
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    if mean is None or std is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if in_chans == 1:
            default_mean, default_std = GRAY_MEAN, GRAY_STD
        else:
            default_mean = cfg.get("mean") or timm.data.IMAGENET_DEFAULT_MEAN
            default_std = cfg.get("std") or timm.data.IMAGENET_DEFAULT_STD
        mean = default_mean if mean is None else mean
        std = default_std if std is None else std
    return TappedModel(model, feature_indices, mean, std)


def create_teacher(name: str, num_classes: int, *, checkpoint: str | None,
                   feature_indices: Sequence[int] | None = None, **kw) -> TappedModel:
    """A frozen TappedModel; without a checkpoint its weights are random (tests, demos only)."""
    if checkpoint is None:
        warnings.warn(f"teacher {name} has no checkpoint: its weights are random", stacklevel=2)
    teacher = create_tapped_model(name, num_classes, feature_indices=feature_indices,
                                  checkpoint=checkpoint, **kw)
    return freeze(teacher)
