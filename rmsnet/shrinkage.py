"""Residual shrinkage unit: learned, per-channel soft thresholding of a residual branch.

Where the idea comes from
-------------------------
Zhao, Zhong, Fu, Tang, Pecht, "Deep Residual Shrinkage Networks for Fault Diagnosis", IEEE Trans.
Industrial Informatics 16(7), 2020 (DRSN-CW, the channel-wise variant). Soft thresholding is the
classical wavelet-denoising non-linearity (Donoho 1995): coefficients whose magnitude is below a
threshold tau are treated as noise and set to zero, the rest are shrunk towards zero by tau. DRSN
learns tau per channel *and per sample* from the features themselves:

    r   = residual branch(x)                              (b, c, h, w)
    a   = GAP(|r|)                                        (b, c)      mean magnitude per channel
    s   = sigmoid(FC(ReLU(BN(FC(a)))))                    (b, c)      in (0, 1)
    tau = s * a                                           (b, c)      positive, never above the mean
    y   = sign(r) * max(|r| - tau, 0)                     (b, c, h, w)
    out = x + y                                           identity shortcut

Because tau is a fraction of the channel's own mean magnitude it adapts to each image: a noisy
X-ray (grainy detector, burnt-in text, collimator edges) gets a higher threshold than a clean one.
RMS-Net (Lai et al. 2024) uses this unit, "optimised", to filter the background noise of X-rays.

What was changed for MobileViT, and why
---------------------------------------
* The original branch is two full 3x3 convolutions (BN-ReLU-conv, twice: 18 c^2 MACs per pixel).
  Here it is one depthwise-separable convolution, conv_dw 3x3 -> BN -> SiLU -> conv_pw 1x1 -> BN,
  i.e. 9c + c^2 MACs per pixel (5.8x cheaper at c=16, 6.5x at c=24). The depthwise conv gives the
  unit its spatial context (is this pixel part of a structure or isolated speckle?); the pointwise
  conv mixes channels so that noise spread over several channels can be gathered into channels the
  per-channel threshold then suppresses -- the job the full convs did in DRSN. This is what lets
  RMS-Net place units at 112x112 and 56x56 and still land on the paper's 0.96 M / 0.27 G budget.
* Post-norm (conv-BN-act) order and SiLU, as in MobileViT's own blocks, instead of DRSN's
  pre-activation ReLU, so the unit sits in a timm ByobNet stage like any other block.
* The threshold MLP squeezes c -> max(8, c // 4) like squeeze-excitation in mobile networks,
  rather than DRSN's c -> c; at these widths it costs a few hundred parameters either way.
* The last BN is *not* zero-initialised (timm zero-inits the last norm of residual blocks): with
  r == 0 the threshold is 0 and d soft_threshold / d r = sign(0) = 0, so the branch would receive no
  gradient and stay dead forever. Starting with gamma = 1, s ~ 0.5 and tau ~ half the mean
  magnitude, which is a mild denoiser from step one.
* Soft thresholding is sign-preserving. MobileViT's inverted-residual blocks end in a *linear*
  bottleneck on purpose (a ReLU there destroys information, Sandler et al. 2018); a shrinkage unit
  right after them removes small responses without discarding the negative half.

The threshold MLP contains a BatchNorm1d on (b, hidden): in training mode it needs a batch of at
least two samples per device, like any BN on pooled vectors.
"""
from __future__ import annotations

import torch
from torch import nn
from timm.layers import DropPath


def soft_threshold(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Soft thresholding `sign(x) * max(|x| - tau, 0)` with a threshold per channel.

    x: (b, c, h, w); tau: anything broadcastable to x with tau >= 0, normally (b, c, 1, 1).
    For a fixed scalar tau this is exactly `torch.nn.functional.softshrink(x, tau)`; written out
    here because softshrink only accepts a Python float, not a learned tensor threshold.
    """
    return torch.sign(x) * torch.relu(x.abs() - tau)  # (b, c, h, w)


class ChannelThreshold(nn.Module):
    """Per-sample, per-channel threshold tau = sigmoid(MLP(GAP(|r|))) * GAP(|r|) (DRSN-CW)."""

    def __init__(self, channels: int, reduction: int = 4, min_hidden: int = 8):
        super().__init__()
        hidden = max(min_hidden, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        a = r.abs().mean(dim=(2, 3))  # (b, c): mean magnitude, the scale the threshold lives on
        s = torch.sigmoid(self.fc2(self.act(self.bn(self.fc1(a)))))  # (b, c) in (0, 1)
        return (s * a)[:, :, None, None]  # (b, c, 1, 1): tau never exceeds the channel mean


class ResidualShrinkageUnit(nn.Module):
    """Light residual shrinkage building unit: `x + soft_threshold(branch(x), tau(branch(x)))`.

    Input and output are (b, channels, h, w); the unit never changes shape, so it can be dropped
    between any two blocks of equal width. See the module docstring for the derivation.
    """

    def __init__(
            self,
            channels: int,
            reduction: int = 4,
            kernel_size: int = 3,
            act_layer: type[nn.Module] = nn.SiLU,
            drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.conv_dw = nn.Conv2d(
            channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=False)
        self.bn_dw = nn.BatchNorm2d(channels)
        self.act = act_layer()
        self.conv_pw = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn_pw = nn.BatchNorm2d(channels)
        self.threshold = ChannelThreshold(channels, reduction=reduction)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def init_weights(self, zero_init_last: bool = False) -> None:
        """Called by timm's ByobNet init. Deliberately ignores `zero_init_last`: a zero branch
        has a zero threshold and zero gradient through the soft threshold, so it would never
        learn (module docstring). The last BN keeps gamma = 1."""
        nn.init.ones_(self.bn_pw.weight)
        nn.init.zeros_(self.bn_pw.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x  # (b, c, h, w)
        r = self.bn_dw(self.conv_dw(x))  # (b, c, h, w): spatial context per channel
        r = self.bn_pw(self.conv_pw(self.act(r)))  # (b, c, h, w): channel mixing
        tau = self.threshold(r)  # (b, c, 1, 1)
        y = soft_threshold(r, tau)  # (b, c, h, w)
        return shortcut + self.drop_path(y)
