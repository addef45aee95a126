"""ResNet teachers for small inputs, registered with timm (`timm.create_model("resnet18_s2")`).

A ResNet's stem (7x7 conv stride 2, then 3x3 max-pool stride 2) divides the side by 4 before the
first residual block. At the 224-1024 px of real chest X-rays that leaves 56-256 px maps; at the
64 px the CPU demo trains at it leaves 16x16, and findings whose signature is a texture a few
pixels in period (atelectasis' plate-like stripes, infiltrates' speckle) are averaged away before
any residual block can see them: the demo's ResNet-18 teacher lost those findings to the much
smaller student, whose stem divides by 2 only. The usual adaptation of ResNets to small images
(He et al. 2016, sec. 4.2 on CIFAR; most CIFAR ResNets since) keeps the stem's resolution:
here the max-pool is dropped, so the stages run at 1/2, 1/4, 1/8, 1/16 of the input.

`resnet18_s2` keeps ResNet-18's depth (2-2-2-2 basic blocks) at half its width (32-64-128-256
channels, 2.8 M parameters): the same multiply-adds per image as ResNet-18 at 4x fewer pixels per
map, so the demo's teacher costs what it did. Weights are timm ResNet's, so a checkpoint of it
loads and every timm feature tap (forward_intermediates) works unchanged.
"""
from __future__ import annotations

from timm.models import register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn


def _no_stem_pool(model: ResNet) -> ResNet:
    model.maxpool = nn.Identity()
    for info in model.feature_info[1:]:  # the stages' strides halve
        info["reduction"] //= 2
    return model


@register_model
def resnet18_s2(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18 at half width without the stem max-pool, for inputs of about 64 px."""
    if pretrained:
        raise ValueError("resnet18_s2 has no published weights (train it; see launcher/configs/demo_teacher.yaml)")
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm's factory adds them
        kwargs.pop(k, None)
    kwargs.setdefault("channels", (32, 64, 128, 256))
    kwargs.setdefault("stem_width", 32)
    return _no_stem_pool(ResNet(BasicBlock, (2, 2, 2, 2), **kwargs))
