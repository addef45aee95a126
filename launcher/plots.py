"""Evaluation figures (matplotlib, Agg backend: no display on a cluster node).

`roc_figure`: one panel per class, every model's ROC curve in it (teacher and student side by side).
`reliability_figure`: one reliability diagram per model (observed frequency per confidence bin as
bars, the gap to the bin's mean confidence hatched, the bin counts below).
`attention_figure`: teacher vs student attention maps per tapped level (what the AT loss matches).
The caller saves them as PNG and hands them to TensorBoard.
"""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from rmsnet.metrics import roc_points  # noqa: E402

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")


def roc_figure(models: dict[str, dict], label_names, title: str):
    """models: name -> {"probs": (n, C), "targets": (n, C), "auroc": {class: value or None}}."""
    classes = len(label_names)
    cols = math.ceil(math.sqrt(classes))
    rows = math.ceil(classes / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for c, label in enumerate(label_names):
        ax = axes[c // cols][c % cols]
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        for (name, m), color in zip(models.items(), COLORS):
            pts = roc_points(m["probs"][:, c], m["targets"][:, c])
            value = m["auroc"].get(label)
            if pts is None:
                ax.text(0.5, 0.5, "no positives\n(or no negatives)", ha="center", va="center", fontsize=7)
                continue
            fpr, tpr, _ = pts
            ax.plot(fpr, tpr, color=color, lw=1.2, label=f"{name} {value:.3f}")
        ax.set_title(label, fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=6)
        ax.set_aspect("equal")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="lower right", title="AUROC", title_fontsize=6)
    for k in range(classes, rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.supxlabel("1 - specificity (false positive rate)", fontsize=9)
    fig.supylabel("sensitivity (true positive rate)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def reliability_figure(models: dict[str, dict], title: str):
    """models: name -> {"bins": reliability_bins(...), "ece": float, "what": str}."""
    n = len(models)
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 5.2), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    for k, ((name, m), color) in enumerate(zip(models.items(), COLORS)):
        bins = m["bins"]
        edges = np.asarray(bins["edges"])
        centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
        acc = np.array([np.nan if a is None else a for a in bins["accuracy"]])
        conf = np.array([np.nan if c is None else c for c in bins["confidence"]])
        ax = axes[0][k]
        ax.plot([0, 1], [0, 1], color="0.5", lw=0.8, ls="--", label="perfect calibration")
        ax.bar(centers, np.nan_to_num(acc), width=width, color=color, alpha=0.75, edgecolor="k",
               lw=0.4, label="observed frequency")
        gap_lo, gap_hi = np.fmin(acc, conf), np.fmax(acc, conf)
        ax.bar(centers, np.nan_to_num(gap_hi - gap_lo), bottom=np.nan_to_num(gap_lo), width=width,
               facecolor="none", edgecolor="red", hatch="///", lw=0.6, label="gap to mean confidence")
        ax.plot(conf, conf, "o", color="red", ms=2.5, label="mean confidence of the bin")
        ax.set_title(f"{name}: ECE {m['ece']:.4f}", fontsize=9)
        ax.set_ylabel("fraction positive / correct", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=6, loc="upper left")
        low = axes[1][k]
        low.bar(centers, bins["count"], width=width, color=color, alpha=0.75, edgecolor="k", lw=0.4)
        low.set_yscale("symlog")
        low.set_xlabel(m.get("what", "confidence"), fontsize=8)
        low.set_ylabel("count", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


@torch.no_grad()
def attention_figure(student, teacher, images: torch.Tensor, student_dtype, teacher_dtype):
    """Input | teacher attention per tapped level | student attention per level, one row per image.

    Attention = the channel mean of squared activations (Zagoruyko & Komodakis), the quantity the
    AT loss matches; shown at each level's own resolution.
    """
    from rmsnet.losses import attention_map

    _, s_feats = student(images.to(student_dtype))
    _, t_feats = teacher(images.to(teacher_dtype))
    levels = len(s_feats)
    fig, axes = plt.subplots(len(images), 1 + 2 * levels, figsize=(2 * (1 + 2 * levels), 2 * len(images)),
                             squeeze=False)
    for r in range(len(images)):
        axes[r, 0].imshow(images[r, 0].float().cpu(), cmap="gray")
        for j, (name, feats) in enumerate((("teacher", t_feats), ("student", s_feats))):
            for lvl, f in enumerate(feats):
                a = attention_map(f[r:r + 1].float()).view(f.shape[-2], f.shape[-1]).cpu()
                ax = axes[r, 1 + j * levels + lvl]
                ax.imshow(a, cmap="inferno")
                if r == 0:
                    ax.set_title(f"{name} L{lvl + 1}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig
