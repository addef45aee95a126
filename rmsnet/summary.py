"""Parameters, multiply-adds and tapped feature shapes of any student or teacher.

    python -m rmsnet.summary --model rmsnet_xxs --num-classes 14 --image-size 224 --in-chans 1 --json
    python -m rmsnet.summary --model resnet18 --num-classes 14 --image-size 224 --in-chans 3

The paper reports RMS-Net as 0.96 M parameters and 0.27 G "FLOPs" that are really multiply-adds.
MACs here are counted by `torch.utils.flop_counter.FlopCounterMode` on one image (convolutions,
matmuls, attention) and halved: FlopCounterMode counts a multiply-add as two FLOPs. Element-wise
work (norms, activations, the soft threshold) is not counted, as in the papers' tables.

The tapped levels are those `TappedModel` gives distillation (default: the last three stages), so
the shapes printed for a student and a teacher are exactly what the feature losses will compare.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .teachers import TappedModel, create_tapped_model

__all__ = ["model_summary", "count_macs", "main"]


@torch.no_grad()
def count_macs(model: nn.Module, image_size: int, in_chans: int) -> int:
    """Multiply-adds of one forward pass on one (in_chans, image_size, image_size) image."""
    was_training = model.training
    model.eval()  # BatchNorm in train mode would update running statistics on a dummy image
    try:
        x = torch.zeros(1, in_chans, image_size, image_size, device=next(model.parameters()).device)
        counter = FlopCounterMode(display=False)
        with counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def model_summary(model: nn.Module, image_size: int, in_chans: int,
                  feature_indices: Sequence[int] | None = None) -> dict:
    """Size, cost and tap shapes of a timm model or a TappedModel as a JSON-ready dict.

    A plain timm model is wrapped (identity normalisation) only to reuse TappedModel's taps.
    Counts are for the wrapped timm model: the wrapper's normalisation costs no parameters.
    """
    if isinstance(model, TappedModel):
        tapped = model
        if feature_indices is not None:
            tapped = TappedModel(model.model, feature_indices, model.mean.flatten().tolist(),
                                 model.std.flatten().tolist())
    else:
        tapped = TappedModel(model, feature_indices, (0.0,), (1.0,))
    if in_chans != tapped.in_chans:
        raise ValueError(f"in_chans={in_chans} but the model takes {tapped.in_chans} input channels")
    net = tapped.model
    params = sum(p.numel() for p in net.parameters())
    macs = count_macs(net, image_size, tapped.in_chans)
    shapes = tapped.feature_shapes(image_size)
    cfg = getattr(net, "pretrained_cfg", None) or {}
    return {
        "model": cfg.get("architecture") or type(net).__name__,
        "num_classes": int(getattr(net, "num_classes", 0)),
        "image_size": int(image_size),
        "in_chans": int(in_chans),
        "params": int(params),
        "params_m": round(params / 1e6, 4),
        "macs": int(macs),
        "macs_g": round(macs / 1e9, 4),
        "feature_indices": list(tapped.feature_indices),
        "features": [{"index": i, "channels": c, "height": h, "width": w}
                     for i, (c, h, w) in zip(tapped.feature_indices, shapes)],
    }


def format_table(summary: dict) -> str:
    """Human-readable version of `model_summary`'s dict."""
    lines = [
        f"model        {summary['model']}",
        f"input        {summary['in_chans']} x {summary['image_size']} x {summary['image_size']}, "
        f"{summary['num_classes']} classes",
        f"parameters   {summary['params']:,} ({summary['params_m']:.3f} M)",
        f"multiply-add {summary['macs']:,} ({summary['macs_g']:.4f} G)",
        "tapped levels",
        "  index  channels  height x width",
    ]
    for f in summary["features"]:
        lines.append(f"  {f['index']:>5}  {f['channels']:>8}  {f['height']} x {f['width']}")
    return "\n".join(lines)


def _parse_indices(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--feature-indices wants integers like 2,3,4, got {text!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rmsnet.summary", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="any timm model name, e.g. rmsnet_xxs, resnet18")
    parser.add_argument("--num-classes", type=int, default=14)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--in-chans", type=int, default=None,
                        help="input channels (default: 1 for rmsnet_*, 3 for other models)")
    parser.add_argument("--feature-indices", type=_parse_indices, default=None,
                        help="comma-separated tap indices (default: the last three levels)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    try:
        model = create_tapped_model(args.model, args.num_classes, in_chans=args.in_chans,
                                    feature_indices=args.feature_indices)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    summary = model_summary(model, args.image_size, model.in_chans)
    print(json.dumps(summary) if args.json else format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
