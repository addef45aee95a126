"""RMS-Net: MobileViT with residual shrinkage units, registered with timm.

RMS-Net (Lai, Li, Nie, Bai, Zhao, Optoelectronics-Laser 35(9), 2024) is MobileViT-XXS plus an
optimised residual shrinkage module that filters the background noise of X-rays (0.96 M params,
0.27 G multiply-adds). This file builds it from timm's own MobileViT configuration
(`timm.models.mobilevit.model_cfgs`, a ByobNet config) by inserting `ResidualShrinkageUnit`s
(rmsnet/shrinkage.py) into it, so every MobileViT block, the stem, the head and timm's model contract
(`forward_features`, `forward_head`, `forward`, `forward_intermediates`, `reset_classifier`, ...) come
from timm unchanged. After `import rmsnet`:

    timm.create_model("rmsnet_xxs", num_classes=14)              # 1 input channel by default
    timm.create_model("rmsnet_xs", num_classes=6, in_chans=1)    # wider variant
    timm.create_model("mobilevit_xxs", num_classes=14, in_chans=1)  # ablation baseline, plain timm

Where the shrinkage units go, and why
-------------------------------------
One unit after every inverted-residual block of the two convolutional stages, i.e. before the first
MobileViT (transformer) block: after stage 0 (16 ch at 1/2 resolution) and after each of the three
blocks of stage 1 (24 ch at 1/4). Four units in rmsnet_xxs.

* Noise is still *local* there. Detector grain, speckle, burnt-in text and collimator edges are
  small, isolated responses in the high-resolution feature maps, separable from anatomy by magnitude
  -- exactly what a soft threshold removes. From stage 2 on, every MobileViT block mixes all patches
  with global self-attention, so background left in the features is spread into every token and can
  no longer be cut out by thresholding; and each MobileViT block's fusion conv re-reads its (local)
  input, so cleaning that input cleans both of its paths.
* The stage-1 blocks end in a linear bottleneck (no activation, by design). The soft threshold is the
  sign-preserving non-linearity that can denoise such signed features without a ReLU's information
  loss, and a threshold after each block lets the network clean progressively, as DRSN stacks units.
* The paper's budget says the same thing. Over plain MobileViT-XXS (0.955 M, 0.251 G with one input
  channel) RMS-Net adds about +5 k parameters but +10-20 M MACs: cheap in weights, expensive in
  pixels, which is only possible at 112x112 and 56x56 (at 28x28 and below a useful unit costs
  parameters and hardly any MACs).
* The distillation taps (stage 2, 3, 4 outputs) are therefore plain MobileViT outputs computed from
  denoised inputs; stage indices and feature shapes are the same as mobilevit_xxs, so the baseline
  and RMS-Net are tapped and compared identically.

Measured (python -m rmsnet.summary, 14 classes, 224x224, in_chans=1):

    model           params      MACs       note
    mobilevit_xxs   955,230     0.2515 G   ablation baseline (plain timm)
    rmsnet_xxs      959,950     0.2640 G   paper: 0.96 M, 0.27 G (+0.0 %, -2.2 %)
    rmsnet_xs     1,952,450     0.7414 G   mobilevit_xs: 1,937,950, 0.6992 G
"""
from __future__ import annotations

from dataclasses import replace
from typing import List, Optional, Tuple, Union

import torch
from timm.models import register_model
from timm.models._builder import build_model_with_cfg
from timm.models._registry import generate_default_cfgs
from timm.models.byobnet import ByobNet, ByoBlockCfg, ByoModelCfg, expand_blocks_cfg, register_block
from timm.models.mobilevit import model_cfgs as mobilevit_cfgs

from .shrinkage import ResidualShrinkageUnit

__all__ = ["RMSNet", "rmsnet_xxs", "rmsnet_xs", "SHRINKAGE_STAGES"]

SHRINKAGE_BLOCK = "residual_shrinkage"
SHRINKAGE_STAGES = (0, 1)  # the convolutional stages before the first MobileViT block (see docstring)


class _ShrinkageBlock(ResidualShrinkageUnit):
    """ResidualShrinkageUnit with the constructor signature ByobNet uses for every block."""

    def __init__(self, in_chs: int, out_chs: Optional[int] = None, stride: int = 1, layers=None,
                 drop_path_rate: float = 0.0, reduction: int = 4, **kwargs):  # eats the other byob args
        if (out_chs or in_chs) != in_chs or stride != 1:
            raise ValueError(f"a shrinkage unit keeps its shape: got {in_chs}->{out_chs} channels, stride {stride}")
        act_layer = layers.act if layers is not None else torch.nn.SiLU
        super().__init__(in_chs, reduction=reduction, act_layer=act_layer, drop_path_rate=drop_path_rate)


register_block(SHRINKAGE_BLOCK, _ShrinkageBlock)


def with_shrinkage(cfg: ByoModelCfg, stages=SHRINKAGE_STAGES, reduction: int = 4) -> ByoModelCfg:
    """Copy of a timm ByobNet config with a shrinkage unit after every block of `stages`.

    Blocks are expanded (d=3 becomes three d=1 entries) so a unit can follow each one; the first
    block of a stage keeps the stage stride, the units are stride 1 and as wide as their block.
    """
    blocks = []
    for idx, stage in enumerate(cfg.blocks):
        if idx not in stages:
            blocks.append(stage)
            continue
        new_stage = []
        for block in expand_blocks_cfg(stage):
            new_stage += [block, ByoBlockCfg(type=SHRINKAGE_BLOCK, d=1, c=block.c, s=1,
                                             block_kwargs=dict(reduction=reduction))]
        blocks.append(tuple(new_stage))
    return replace(cfg, blocks=tuple(blocks))


model_cfgs = dict(
    rmsnet_xxs=with_shrinkage(mobilevit_cfgs["mobilevit_xxs"]),
    rmsnet_xs=with_shrinkage(mobilevit_cfgs["mobilevit_xs"]),
)


class RMSNet(ByobNet):
    """timm ByobNet whose `forward_intermediates` defaults to what distillation taps.

    Defaults differ from timm's in two ways, both so that `forward_intermediates(x)` alone returns
    the student's distillation levels: `indices=3` (the last three stages: 48x32^2, 64x16^2, 80x8^2
    for rmsnet_xxs at 256 input) and `exclude_final_conv=True` (timm's MobileViT otherwise returns
    the 320-channel output of the final 1x1 conv as the last level, not the last stage). The final
    features returned next to the intermediates still include the final conv, so
    `forward_head(final)` equals `forward(x)`.
    """

    def forward_intermediates(
            self,
            x: torch.Tensor,  # (b, in_chans, h, w)
            indices: Optional[Union[int, List[int]]] = 3,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
            exclude_final_conv: bool = True,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        return super().forward_intermediates(
            x, indices=indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
            intermediates_only=intermediates_only, exclude_final_conv=exclude_final_conv)


def _cfg(**kwargs):
    # No weights exist to download: the student is trained here, by distillation. Grayscale input,
    # normalised like the project's 1-channel default (mean 0.5, std 0.25), 14 ChestX-ray14 labels.
    return {
        "url": "", "num_classes": 14, "input_size": (1, 224, 224), "pool_size": (7, 7),
        "crop_pct": 1.0, "interpolation": "bilinear", "mean": (0.5,), "std": (0.25,),
        "first_conv": "stem.conv", "classifier": "head.fc", "fixed_input_size": False,
        **kwargs,
    }


default_cfgs = generate_default_cfgs({"rmsnet_xxs": _cfg(), "rmsnet_xs": _cfg()})


def _create_rmsnet(variant: str, pretrained: bool = False, **kwargs) -> RMSNet:
    return build_model_with_cfg(
        RMSNet, variant, pretrained, model_cfg=model_cfgs[variant],
        feature_cfg=dict(flatten_sequential=True), **kwargs)


@register_model
def rmsnet_xxs(pretrained: bool = False, **kwargs) -> RMSNet:
    """RMS-Net on MobileViT-XXS: the paper's ~0.96 M parameter student."""
    return _create_rmsnet("rmsnet_xxs", pretrained=pretrained, **kwargs)


@register_model
def rmsnet_xs(pretrained: bool = False, **kwargs) -> RMSNet:
    """RMS-Net on MobileViT-XS (about 2x wider): for when the XXS budget is too tight."""
    return _create_rmsnet("rmsnet_xs", pretrained=pretrained, **kwargs)
