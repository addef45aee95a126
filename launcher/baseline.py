"""Pixel baseline: logistic regression on downsampled raw pixels.

    python launcher/baseline.py --shards demo_runs/data/cxr_shards --pixels 16

The floor any CNN must clear. On the synthetic stand-ins it shows the task is not trivial: the
findings are textures and shapes at varying positions, which a linear model on a 16x16 thumbnail
cannot find, while the teacher and the student can. Trains on the train split, reports per-class
AUROC on the test split (one-vs-rest for single-label tasks), and writes JSON with `--out`.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data_pipeline.cli import add_debug_flag, run_cli
from data_pipeline.manifest import read_manifest
from data_pipeline.torch_loader import ShardSamples
from rmsnet.metrics import classification_summary, format_auroc_table


def thumbnails(shards, split: str, pixels: int):
    ds = ShardSamples(shards, split, read_manifest(shards)["image"]["size"], augment=None)
    xs, ys = [], []
    for i in range(len(ds)):
        s = ds[i]
        xs.append(F.adaptive_avg_pool2d(s["image"], pixels).flatten())  # area downsampling
        ys.append(s["label"])
    return torch.stack(xs).numpy(), torch.stack(ys).numpy()


def pixel_logistic_regression(shards, pixels: int = 16, test_split: str = "test") -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    manifest = read_manifest(shards)
    x_tr, y_tr = thumbnails(shards, "train", pixels)
    x_te, y_te = thumbnails(shards, test_split, pixels)
    scaler = StandardScaler().fit(x_tr)
    x_tr, x_te = scaler.transform(x_tr), scaler.transform(x_te)
    probs = np.zeros_like(y_te, dtype=np.float64)
    for c in range(y_tr.shape[1]):  # one independent classifier per class (one-vs-rest)
        if y_tr[:, c].min() == y_tr[:, c].max():
            probs[:, c] = y_tr[0, c]
            continue
        clf = LogisticRegression(C=0.1, max_iter=2000).fit(x_tr, y_tr[:, c])
        probs[:, c] = clf.predict_proba(x_te)[:, 1]
    return classification_summary(probs, y_te, manifest["label_names"], manifest["multilabel"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True)
    p.add_argument("--pixels", type=int, default=16, help="thumbnail side")
    p.add_argument("--split", default="test")
    p.add_argument("--out", type=Path, help="write the metrics JSON here")
    add_debug_flag(p)
    a = p.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = pixel_logistic_regression(a.shards, a.pixels, a.split)
    names = read_manifest(a.shards)["label_names"]
    print(f"logistic regression on {a.pixels}x{a.pixels} pixels, '{a.split}' split:")
    print(format_auroc_table({"pixel-LR": result}, names))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
