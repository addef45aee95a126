"""Distillation and task losses as pure functions of tensors.

Every function here takes tensors (and, for the hint loss, the adapter callables) and returns a
scalar loss; none keeps state and none touches ``torch.distributed``. Weights such as beta = 1000
for attention transfer or beta = 3000 for similarity preserving are applied by the caller
(``rmsnet/objective.py``), not here.

Conventions shared by all functions:

* Teacher tensors are detached: the teacher is a constant target, so no gradient ever flows into it.
* Half-precision inputs (fp16 / bf16, as produced under DeepSpeed mixed precision) are upcast to
  float32 before any exp/log/normalisation; float32 and float64 inputs are used as they are.
* Feature arguments are sequences of ``(b, c, h, w)`` maps, one per level; a single tensor is
  accepted as a one-level list. Student and teacher levels are paired in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "focal_loss",
    "kd_loss",
    "attention_map",
    "attention_transfer_loss",
    "similarity_preserving_loss",
    "hint_loss",
    "make_hint_adapters",
]

_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------- helpers


def _upcast(x: Tensor) -> Tensor:
    """Half precision loses too much in exp/log/normalise: compute those in float32."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss  # "none"; validated by the caller


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _as_levels(feats: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [feats] if isinstance(feats, Tensor) else list(feats)


def _paired_levels(
    name: str,
    student_feats: Tensor | Sequence[Tensor],
    teacher_feats: Tensor | Sequence[Tensor],
    upcast: bool = True,
) -> list[tuple[Tensor, Tensor]]:
    """Pair student and teacher levels, failing with a message that names the loss and the level."""
    s_levels, t_levels = _as_levels(student_feats), _as_levels(teacher_feats)
    if len(s_levels) != len(t_levels):
        raise ValueError(
            f"{name}: got {len(s_levels)} student levels but {len(t_levels)} teacher levels; "
            "they are paired one to one"
        )
    if not s_levels:
        raise ValueError(f"{name}: no feature levels given")
    pairs = []
    for i, (fs, ft) in enumerate(zip(s_levels, t_levels)):
        if fs.shape[0] != ft.shape[0]:
            raise ValueError(
                f"{name}: level {i} batch sizes differ (student {fs.shape[0]}, teacher {ft.shape[0]})"
            )
        ft = ft.detach()
        pairs.append((_upcast(fs), _upcast(ft)) if upcast else (fs, ft))
    return pairs


def _pool_to_common_size(name: str, i: int, fs: Tensor, ft: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool whichever map is larger down to the smaller spatial size.

    A ResNet teacher at 224 gives 28/14/7 maps while a MobileViT student at 256 gives 32/16/8, so
    the two sides of a level rarely match; pooling the larger keeps information from every pixel
    (interpolating the smaller up would invent it).
    """
    if fs.dim() != 4 or ft.dim() != 4:
        raise ValueError(
            f"{name}: level {i} expects (b, c, h, w) maps, got student {tuple(fs.shape)} "
            f"and teacher {tuple(ft.shape)}"
        )
    size = (min(fs.shape[2], ft.shape[2]), min(fs.shape[3], ft.shape[3]))
    if tuple(fs.shape[2:]) != size:
        fs = F.adaptive_avg_pool2d(fs, size)  # (b, c_s, h, w)
    if tuple(ft.shape[2:]) != size:
        ft = F.adaptive_avg_pool2d(ft, size)  # (b, c_t, h, w)
    return fs, ft


# --------------------------------------------------------------------------- focal loss


def focal_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    alpha: float | Sequence[float] | Tensor | None = 0.25,
    gamma: float = 2.0,
    multilabel: bool = True,
    reduction: str = "mean",
) -> Tensor:
    r"""Focal loss (Lin, Goyal, Girshick, He, Dollár, "Focal Loss for Dense Object Detection", ICCV 2017).

    ``FL(p_t) = -alpha_t * (1 - p_t)^gamma * log(p_t)``

    Multi-label (``multilabel=True``, sigmoid form): every element of ``logits`` (b, C) is an
    independent binary problem with ``p = sigmoid(logit)`` and float ``targets`` (b, C) in {0, 1}:
    ``p_t = p*y + (1-p)*(1-y)``, ``alpha_t = alpha*y + (1-alpha)*(1-y)``. ``log p_t`` is taken as
    ``-BCE_with_logits`` so large logits stay finite. The values equal
    ``torchvision.ops.sigmoid_focal_loss``; ``reduction="mean"`` averages over all b*C elements as
    torchvision does. ``alpha`` may be a scalar in [0, 1], a per-class tensor/list of length C (class
    c's positives weighted ``alpha_c``, its negatives ``1 - alpha_c``), or ``None`` / a negative number
    to disable the weighting (torchvision's ``alpha=-1``).

    Single-label (``multilabel=False``, softmax form): ``p_t`` is the softmax probability of the true
    class; ``targets`` are int class indices (b,) or one-hot rows (b, C). ``alpha`` is a per-class
    weight vector (``alpha_t = alpha[y]``), a scalar (a constant factor on every sample, as in kornia's
    ``focal_loss``), or ``None`` / negative for no weighting. ``reduction="mean"`` averages over the b
    samples (not over the weights, unlike ``F.cross_entropy(weight=...)``). With ``gamma=0`` and no
    alpha it is exactly the cross-entropy.

    Returns a scalar for "mean"/"sum"; for "none" a tensor of shape (b, C) (multi-label) or (b,).
    """
    _check_reduction(reduction)
    if gamma < 0:
        raise ValueError(f"focal_loss: gamma must be >= 0, got {gamma}")
    logits = _upcast(logits)
    if logits.dim() != 2:
        raise ValueError(f"focal_loss: logits must be (b, C), got shape {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    alpha_vec = _alpha_tensor(alpha, num_classes, logits)

    if multilabel:
        if targets.shape != logits.shape:
            raise ValueError(
                f"focal_loss: multi-label targets must have the logits' shape {tuple(logits.shape)}, "
                f"got {tuple(targets.shape)}"
            )
        y = targets.to(logits.dtype)  # (b, C)
        ce = F.binary_cross_entropy_with_logits(logits, y, reduction="none")  # (b, C) = -log p_t
        p = torch.sigmoid(logits)
        p_t = p * y + (1 - p) * (1 - y)
        loss = ce * (1 - p_t) ** gamma
        if alpha_vec is not None:
            loss = (alpha_vec * y + (1 - alpha_vec) * (1 - y)) * loss
        return _reduce(loss, reduction)

    log_p = F.log_softmax(logits, dim=1)  # (b, C)
    one_hot = targets.shape == logits.shape
    if one_hot:
        y = targets.to(logits.dtype)  # (b, C)
        log_p_t = (y * log_p).sum(1)  # (b,)
    elif targets.dim() == 1 and targets.shape[0] == logits.shape[0] and not targets.is_floating_point():
        idx = targets.long()  # (b,)
        log_p_t = log_p.gather(1, idx[:, None]).squeeze(1)  # (b,)
    else:
        raise ValueError(
            f"focal_loss: single-label targets must be integer class indices ({logits.shape[0]},) or "
            f"one-hot {tuple(logits.shape)}, got {targets.dtype} {tuple(targets.shape)}"
        )
    if alpha_vec is None:
        alpha_t = None
    elif alpha_vec.dim() == 0:
        alpha_t = alpha_vec  # a scalar alpha is a constant factor in the softmax form
    else:
        alpha_t = (y * alpha_vec).sum(1) if one_hot else alpha_vec[idx]  # (b,)
    p_t = log_p_t.exp()
    loss = -((1 - p_t) ** gamma) * log_p_t  # (b,)
    if alpha_t is not None:
        loss = alpha_t * loss
    return _reduce(loss, reduction)


def _alpha_tensor(
    alpha: float | Sequence[float] | Tensor | None, num_classes: int, like: Tensor
) -> Tensor | None:
    """``None`` when weighting is disabled, else a scalar or (C,) tensor on ``like``'s device/dtype."""
    if alpha is None:
        return None
    if isinstance(alpha, (int, float)):
        if alpha < 0:
            return None
        if alpha > 1:
            raise ValueError(f"focal_loss: scalar alpha must be in [0, 1] (or negative/None), got {alpha}")
        # A fill on the device, not a host-to-device copy (which synchronises on a GPU every step).
        return torch.full((), float(alpha), dtype=like.dtype, device=like.device)
    vec = torch.as_tensor(alpha, dtype=like.dtype, device=like.device).flatten()
    if vec.numel() == 1:
        return _alpha_tensor(float(vec.item()), num_classes, like)
    if vec.numel() != num_classes:
        raise ValueError(
            f"focal_loss: per-class alpha has {vec.numel()} entries but there are {num_classes} classes"
        )
    return vec


# --------------------------------------------------------------------------- logit KD


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 4.0,
    multilabel: bool = True,
) -> Tensor:
    r"""Logit distillation (Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015).

    Single-label (``multilabel=False``): ``T^2 * KL(softmax(t/T) || softmax(s/T))``, summed over classes
    and averaged over the batch, i.e.
    ``F.kl_div(log_softmax(s/T), softmax(t/T), reduction="batchmean") * T^2``. The T^2 factor keeps
    the gradient scale independent of T (Hinton et al., sec. 2).

    Multi-label (``multilabel=True``): softmax KD is wrong here because it forces the C probabilities
    to sum to 1. Each class is instead an independent Bernoulli with ``p = sigmoid(z/T)``::

        T^2 * mean_{n,c} [ p_t log(p_t/p_s) + (1-p_t) log((1-p_t)/(1-p_s)) ]

    computed from logits with ``logsigmoid`` (``log p = logsigmoid(z/T)``, ``log(1-p) =
    logsigmoid(-z/T)``) so saturated logits stay finite. It is exactly zero when the student equals the
    teacher and equals ``T^2 * (BCE_with_logits(s/T, p_t) - H(p_t))`` (mean reduction), H the teacher's
    Bernoulli entropy, so its gradient w.r.t. the student is that of the BCE.

    ``teacher_logits`` are detached. Both inputs are (b, C); the result is a scalar.
    """
    if temperature <= 0:
        raise ValueError(f"kd_loss: temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"kd_loss: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    s = _upcast(student_logits) / temperature  # (b, C)
    t = _upcast(teacher_logits.detach()) / temperature  # (b, C)

    if multilabel:
        log_ps, log_1m_ps = F.logsigmoid(s), F.logsigmoid(-s)
        log_pt, log_1m_pt = F.logsigmoid(t), F.logsigmoid(-t)
        p_t = log_pt.exp()
        kl = p_t * (log_pt - log_ps) + (1 - p_t) * (log_1m_pt - log_1m_ps)  # (b, C)
        return kl.mean() * temperature**2

    # log_target=True avoids 0 * log(0) when a teacher probability underflows.
    kl = F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), reduction="batchmean", log_target=True)
    return kl * temperature**2


# --------------------------------------------------------------------------- attention transfer


def attention_map(feat: Tensor, p: int = 2) -> Tensor:
    r"""Spatial attention map of Zagoruyko & Komodakis (ICLR 2017), as in the authors' code.

    ``at(F) = normalize(mean_c(F^p).flatten(1))``: channel mean of the p-th power, flattened to
    (b, h*w) and L2-normalised per sample (``F.normalize``), so maps with different channel counts
    are comparable.
    """
    feat = _upcast(feat)
    return F.normalize(feat.pow(p).mean(1).flatten(1), dim=1)  # (b, h*w)


def attention_transfer_loss(
    student_feats: Tensor | Sequence[Tensor],
    teacher_feats: Tensor | Sequence[Tensor],
    *,
    p: int = 2,
) -> Tensor:
    r"""Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017).

    In the form of the authors' code (``at_loss`` in github.com/szagoruyko/attention-transfer)::

        at(F) = normalize(mean_c(F^p).flatten(1))
        L_AT  = sum_levels mean((at(F_s) - at(F_t))^2)

    The mean runs over the b * h*w entries. Channel counts may differ between student and teacher;
    when the spatial sizes differ, the larger feature map itself (not its attention map) is
    adaptive-average-pooled to the smaller size first. The paper's weight beta = 1000 is applied by
    the caller. Teacher features are detached.
    """
    total = None
    for i, (fs, ft) in enumerate(_paired_levels("attention_transfer_loss", student_feats, teacher_feats)):
        fs, ft = _pool_to_common_size("attention_transfer_loss", i, fs, ft)
        level = (attention_map(fs, p) - attention_map(ft, p)).pow(2).mean()
        total = level if total is None else total + level
    return total


# --------------------------------------------------------------------------- similarity preserving


def similarity_preserving_loss(
    student_feats: Tensor | Sequence[Tensor],
    teacher_feats: Tensor | Sequence[Tensor],
) -> Tensor:
    r"""Similarity-preserving KD (Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019).

    Per level, with b the batch size::

        Q = F.reshape(b, -1);  G = Q Q^T            (b, b)
        G~[i, :] = G[i, :] / ||G[i, :]||_2          (row-wise L2 normalisation, paper eq. 2-3)
        L_SP = sum_levels ||G~_s - G~_t||_F^2 / b^2

    Only the (b, b) similarity matrices are compared, so channels and resolution may differ freely.
    Note: torchdistill's ``SPKDLoss`` calls ``normalize(G, 1)``, whose second positional argument is
    ``p``: it L1-normalises the rows, which is not the paper's formula; this function uses L2.

    The function works on whatever batch it is given; to use a global batch, gather the features
    across ranks before calling it. The paper's weight beta = 3000 is applied by the caller.
    Teacher features are detached.
    """
    total = None
    for fs, ft in _paired_levels("similarity_preserving_loss", student_feats, teacher_feats):
        b = fs.shape[0]
        g_s = F.normalize(fs.reshape(b, -1) @ fs.reshape(b, -1).T, p=2, dim=1)  # (b, b)
        g_t = F.normalize(ft.reshape(b, -1) @ ft.reshape(b, -1).T, p=2, dim=1)  # (b, b)
        level = (g_s - g_t).pow(2).sum() / (b * b)
        total = level if total is None else total + level
    return total


# --------------------------------------------------------------------------- stage-1 hint


def _hint_attention(feat: Tensor, p: int) -> Tensor:
    """Spatial weight map ``mean_c(|F|^p)`` rescaled to mean 1 per sample, shape (b, 1, h, w)."""
    h, w = feat.shape[2], feat.shape[3]
    a = feat.abs().pow(p).mean(1, keepdim=True)  # (b, 1, h, w)
    # An all-zero map (dead activations) would divide by zero; it then stays all-zero.
    denom = a.sum(dim=(2, 3), keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    return a / denom * (h * w)


def hint_loss(
    student_feats: Tensor | Sequence[Tensor],
    teacher_feats: Tensor | Sequence[Tensor],
    adapters: Sequence[Callable[[Tensor], Tensor]],
    *,
    p: int = 2,
) -> Tensor:
    r"""Stage-1 attended hidden-feature regression (Zhang, Zhou, Zhang, "Two-stage knowledge
    distillation for fetal ultrasound standard plane recognition", CAAI Trans. Intelligent Systems
    17(1):181-191, 2022, doi 10.11992/tis.202105007).

    The paper applies attention to both networks' hidden features and has the student reproduce the
    teacher's attended features, which gives it prior weights before stage-2 logit KD. It does not fix
    the attention's form; this implementation uses, per level::

        a(F) = mean_c(|F|^p), rescaled per sample so that sum_{h,w} a = h*w    (b, 1, h, w), mean 1
        A(F) = a(F) * F                                                       (b, c, h, w)
        L_hint = sum_levels mean((adapter(A(F_s)) - A(F_t))^2)

    A mean-1 weight map (rather than a softmax) keeps A(F) on the scale of F, so the regression target
    does not shrink with the number of pixels. When sizes differ, the larger raw feature map is
    adaptive-average-pooled to the smaller size before the attention and before the adapter.
    ``adapters[i]`` maps student channels to teacher channels at level i (see ``make_hint_adapters``).
    Teacher features are detached.
    """
    # Not upcast here: the adapter runs in the student's dtype (bf16 under DeepSpeed); only the
    # attention and the squared error are computed in float32.
    pairs = _paired_levels("hint_loss", student_feats, teacher_feats, upcast=False)
    if len(adapters) != len(pairs):
        raise ValueError(f"hint_loss: {len(adapters)} adapters given for {len(pairs)} feature levels")
    total = None
    for i, ((fs, ft), adapter) in enumerate(zip(pairs, adapters)):
        fs, ft = _pool_to_common_size("hint_loss", i, fs, ft)
        fs32, ft32 = _upcast(fs), _upcast(ft)
        attended_s = (_hint_attention(fs32, p) * fs32).to(fs.dtype)  # (b, c_s, h, w)
        pred = adapter(attended_s)  # (b, c_t, h, w)
        target = _hint_attention(ft32, p) * ft32  # (b, c_t, h, w)
        if pred.shape != target.shape:
            raise ValueError(
                f"hint_loss: level {i} adapter output {tuple(pred.shape)} does not match the teacher's "
                f"attended features {tuple(target.shape)}"
            )
        level = F.mse_loss(_upcast(pred), target)
        total = level if total is None else total + level
    return total


def make_hint_adapters(student_channels: Sequence[int], teacher_channels: Sequence[int]) -> nn.ModuleList:
    """One 1x1 ``Conv2d`` (no bias) per level, mapping student channels to teacher channels.

    Weights use Kaiming-normal initialisation with the linear gain (std = 1/sqrt(c_in)), so the
    adapter initially preserves the variance of its (non-rectified) input. These modules are trained
    with the student in stage 1 and are discarded afterwards.
    """
    if len(student_channels) != len(teacher_channels):
        raise ValueError(
            f"make_hint_adapters: {len(student_channels)} student levels but "
            f"{len(teacher_channels)} teacher levels"
        )
    adapters = nn.ModuleList()
    for c_s, c_t in zip(student_channels, teacher_channels):
        conv = nn.Conv2d(int(c_s), int(c_t), kernel_size=1, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="linear")
        adapters.append(conv)
    return adapters
