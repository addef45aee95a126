"""Grad-CAM overlays for `launcher/predict.py --heatmaps DIR`: where the student looked.

predict.py runs the ONNX file; the gradients come from the PyTorch model the export was made from
(the checkpoint recorded in the ONNX metadata as `source_checkpoint`, a `model.pt` beside the
ONNX file, or --heatmap-weights), loaded by `launcher/model_loading.py`. Its probabilities on the
same inputs must equal ONNX Runtime's within PROB_TOLERANCE before anything is drawn; otherwise the
weights are not the export's and no heatmaps are written. For an INT8 export (export.py --int8)
the weights are those of the fp32 file it was quantized from: that file, beside it and with the
fingerprint the INT8 file records, is run too and the check is made against it (the INT8 model's
own probabilities differ from the fp32 ones by design). Every problem (no torch, no weights,
other weights, an architecture without a convolutional feature map) is one warning line, and
prediction goes on without heatmaps.

The layer is the model's `forward_features` output, the last convolutional feature map, which the
head global-average-pools and classifies (timm's contract: `forward_head(forward_features(x))` is
`model(x)`). For rmsnet_xxs that is the output of `final_conv` (1x1 conv 80 -> 320, BN, SiLU) after
the last MobileViT stage: 320 channels at 1/32 of the input side (2x2 at 64 px, 4x4 at 128 px,
8x8 at 256 px), so the map is coarse by construction. Grad-CAM (Selvaraju et al. 2017): for class
c, `relu(sum_k a_k A_k)` with `a_k` the spatial mean of d logit_c / d A_k. The gradient of a logit
with respect to A depends only on the layers after A, so the backbone runs once without autograd
and only the head is differentiated (batched: the head treats each image on its own).

Each overlay is the decoded input image (the 8-bit grayscale the model input was prepared from, at
its own size, scaled to MAX_SIDE or MIN_SIDE on the longer side when it is larger or smaller) in
gray with the map, scaled to its maximum, as a semi-transparent jet colour map (transparent where
the map is 0; the caption says when it is 0 everywhere: no position adds to the logit). The map
is bilinearly upsampled to the model input and mapped back through the shard builder's fit (pad:
the padding cut off; crop: zero outside the centre square the model saw), and labelled with the
finding, its probability and threshold. Files: `<row>_<image stem>__<finding>_p<probability>.png`.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_pipeline.image_io import BadImage, load_gray8
from launcher.onnx_meta import probabilities, sha256

if TYPE_CHECKING:  # torch is imported only when heatmaps are asked for
    import torch

    from rmsnet.teachers import TappedModel

REPO = Path(__file__).resolve().parents[1]
PROB_TOLERANCE = 1e-4  # largest accepted |PyTorch - ONNX| probability
MAX_SIDE = 2048  # overlays of larger images are scaled down to this longer side
MIN_SIDE = 512  # and those of smaller ones up, so that the map and its caption can be read
ALPHA = 0.6  # opacity of the colour map where the map is at its maximum
LAYER = "forward_features (the last convolutional feature map before global pooling)"


class HeatmapsUnavailable(RuntimeError):
    """Heatmaps cannot be made for this export; the message says why (one line)."""


def warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------- the weights
def weight_candidates(meta: dict, onnx_path: Path) -> list[Path]:
    """Where the export's PyTorch weights may be: a model.pt beside the ONNX file, then the recorded
    source_checkpoint (as written, from the working directory, then from the repository root)."""
    found = [onnx_path.parent / "model.pt"]
    source = meta.get("source_checkpoint")
    if source:
        path = Path(re.sub(r" \([^()]*\)$", "", str(source)))  # a DeepSpeed source says how it was read
        found += [path] if path.is_absolute() else [Path.cwd() / path, REPO / path]
    return found


def fp32_reference(meta: dict, onnx_path: Path):
    """For an INT8 export, an ONNX Runtime session of the fp32 file it was quantized from (found
    beside it, its sha256 the one the INT8 file records); None for an fp32 export."""
    q = meta.get("quantization")
    if not q:
        return None
    source = onnx_path.parent / str(q.get("from", ""))
    if not source.is_file() or sha256(source) != q.get("from_sha256"):
        state = "is missing" if not source.is_file() else "is not the file it was quantized from (sha256 differs)"
        raise HeatmapsUnavailable(f"{onnx_path} is an INT8 model; its heatmaps come from the fp32 weights it "
                                  f"was quantized from, checked against {source}, which {state}: predicting "
                                  f"without heatmaps")
    import onnxruntime as ort
    return ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])


def load_weights(meta: dict, onnx_path: Path, explicit: str | None) -> tuple[TappedModel, str]:
    """The PyTorch model of the export (eval mode, CPU) and where it was read from."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise HeatmapsUnavailable("--heatmaps needs PyTorch, which is not installed: "
                                  "predicting without heatmaps") from None
    if explicit is not None:
        path = Path(explicit)
        if not path.exists():
            raise HeatmapsUnavailable(f"--heatmap-weights {path}: no such file or directory; "
                                      f"predicting without heatmaps")
    else:
        tried = weight_candidates(meta, onnx_path)
        path = next((p for p in tried if p.exists()), None)
        if path is None:
            raise HeatmapsUnavailable(f"the PyTorch weights of {onnx_path} were not found (looked for "
                                      f"{', '.join(str(p) for p in dict.fromkeys(tried))}; pass "
                                      f"--heatmap-weights CKPT): predicting without heatmaps")
    try:
        from launcher.model_loading import load_model
    except ImportError as e:  # timm, pyyaml: the training stack that rebuilds the model
        raise HeatmapsUnavailable(f"--heatmaps needs {e.name or e}, which is not installed: predicting "
                                  f"without heatmaps") from None
    try:
        loaded = load_model(path)
    except Exception as e:  # CheckpointError, a mismatch, an unreadable file: all mean "no heatmaps"
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise HeatmapsUnavailable(f"cannot load the PyTorch weights {path} ({why}): predicting without "
                                  f"heatmaps") from None
    names = list(meta.get("label_names") or [])
    if list(loaded.meta.get("label_names") or names) != names:
        raise HeatmapsUnavailable(f"the PyTorch weights {path} have labels {loaded.meta['label_names']}, "
                                  f"the export {names}: predicting without heatmaps")
    return loaded.model, loaded.source


# ----------------------------------------------------------------------------------- Grad-CAM
def grad_cam(tapped: TappedModel, images: torch.Tensor, classes: list[int]) -> tuple[np.ndarray, dict]:
    """(logits (b, C) as float64, {class: Grad-CAM maps (b, h, w), >= 0, in feature-map cells})
    for a batch of model inputs (b, 1, S, S) in [0, 1], on the layer named in the module docstring."""
    import torch
    net = tapped.model
    with torch.no_grad():
        feats = net.forward_features(tapped.normalise(images))
    if feats.dim() != 4:
        raise HeatmapsUnavailable(f"{type(net).__name__}'s forward_features gives shape "
                                  f"{tuple(feats.shape)}, not a convolutional feature map (no Grad-CAM)")
    feats = feats.detach().float().requires_grad_(True)  # (b, k, h, w)
    with torch.enable_grad():
        logits = net.forward_head(feats)  # (b, C)
        cams = {}
        for c in classes:
            grad, = torch.autograd.grad(logits[:, c].sum(), feats, retain_graph=True)
            weights = grad.mean(dim=(2, 3), keepdim=True)  # (b, k, 1, 1)
            cams[c] = torch.relu((weights * feats).sum(dim=1)).detach().numpy().astype(np.float64)
    return logits.detach().numpy().astype(np.float64), cams


# ------------------------------------------------------------------------------------ drawing
def to_original(cam: np.ndarray, image_size: int, shard_size: int, fit: str, original: tuple[int, int],
                size: tuple[int, int] | None = None) -> np.ndarray:
    """A map on the feature grid (h, w) over the original image, whose size is `original` = (W, H):
    bilinear to the model input, then the shard builder's fit undone; returned as a float array of
    `size` (W', H') = (W, H) scaled (default: `original`)."""
    w, h = original
    out_w, out_h = size or original
    grid = Image.fromarray(cam.astype(np.float32))  # mode F
    square = grid.resize((image_size, image_size), Image.Resampling.BILINEAR)
    if fit == "stretch" or w == h:
        return np.asarray(square.resize((out_w, out_h), Image.Resampling.BILINEAR), dtype=np.float64)
    if fit == "crop":  # the model saw the centre square only: nothing outside it
        out = np.zeros((out_h, out_w))
        s, f = min(w, h), out_w / w
        x0, y0, side = round((w - s) // 2 * f), round((h - s) // 2 * f), max(1, round(s * f))
        out[y0:y0 + side, x0:x0 + side] = np.asarray(square.resize((side, side), Image.Resampling.BILINEAR))
        return out
    # pad: the image was scaled into the middle of the square; cut the borders off
    scale = shard_size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    k = image_size / shard_size
    x0, y0 = (shard_size - nw) // 2 * k, (shard_size - nh) // 2 * k
    box = (x0, y0, x0 + nw * k, y0 + nh * k)
    return np.asarray(square.resize((out_w, out_h), Image.Resampling.BILINEAR, box=box), dtype=np.float64)


def jet(x: np.ndarray) -> np.ndarray:
    """The jet colour map: values in [0, 1] -> RGB in [0, 1] (..., 3)."""
    x = np.clip(x, 0.0, 1.0)[..., None]
    return np.clip(1.5 - np.abs(4.0 * x - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)


def overlay(gray: np.ndarray, heat: np.ndarray, caption: str) -> Image.Image:
    """RGB image: `gray` (H, W) uint8 under `heat` (H, W) in [0, 1] as jet with opacity ALPHA * heat,
    the caption in the top left corner."""
    base = gray.astype(np.float64)[..., None] / 255.0
    alpha = ALPHA * np.clip(heat, 0.0, 1.0)[..., None]
    rgb = (1.0 - alpha) * base + alpha * jet(heat)
    img = Image.fromarray(np.round(rgb * 255.0).astype(np.uint8))  # RGB
    draw = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=max(10, min(img.size) // 24))
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        font = ImageFont.load_default()
    left, top, right, bottom = draw.multiline_textbbox((4, 2), caption, font=font)
    draw.rectangle((0, 0, right + 4, bottom + 3), fill=(0, 0, 0))
    draw.multiline_text((4, 2), caption, fill=(255, 255, 255), font=font)
    return img


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "image"


# ------------------------------------------------------------------------------------ writing
class Heatmaps:
    """Writes the overlays of each batch predict.py runs; `enabled` False after a warning."""

    def __init__(self, out_dir: Path, prep: dict, label_names: list[str], thresholds: list[float],
                 multilabel: bool, window: tuple[float, float] | None):
        self.out_dir, self.prep, self.window = Path(out_dir), prep, window
        self.label_names, self.thresholds, self.multilabel = label_names, thresholds, multilabel
        self.tapped: TappedModel | None = None
        self.weights: str | None = None
        self.reference = None  # INT8 export: the fp32 ONNX session the weights are checked against
        self.enabled = False
        self.max_abs_prob_diff: float | None = None
        self.written = 0

    def describe(self) -> dict:
        """The heatmaps part of the JSON output."""
        return {"dir": str(self.out_dir), "method": "Grad-CAM", "layer": LAYER, "weights": self.weights,
                "written": self.written, "max_abs_prob_diff_pytorch_onnx": self.max_abs_prob_diff,
                "checked_against": "the fp32 ONNX file the INT8 model was quantized from"
                if self.reference is not None else "the ONNX model predicted with",
                "tolerance": PROB_TOLERANCE}

    def disable(self, text: str) -> None:
        """Warn (on a line of its own, under predict.py's progress line) and write no more."""
        if sys.stderr.isatty():
            print(file=sys.stderr)
        warn(text)
        self.enabled = False

    def write(self, rows: list[int], paths: list[Path], images: np.ndarray,
              probs: np.ndarray) -> list[list[str]]:
        """Overlays of one batch: row numbers, files, model inputs (b, 1, S, S), ONNX probabilities
        (b, C). Per image the files written, one per finding positive at the thresholds."""
        out: list[list[str]] = [[] for _ in paths]
        if not self.enabled:
            return out
        import torch
        positive = probs >= np.asarray(self.thresholds)[None, :]
        classes = [int(c) for c in np.flatnonzero(positive.any(axis=0))]
        try:
            logits, cams = grad_cam(self.tapped, torch.from_numpy(np.ascontiguousarray(images)), classes)
        except HeatmapsUnavailable as e:
            self.disable(f"{e}: predicting without heatmaps")
            return out
        checked = probs  # the probabilities the PyTorch weights must reproduce
        if self.reference is not None:  # an INT8 export: the PyTorch weights are the fp32 file's
            inp = self.reference.get_inputs()[0].name
            checked = probabilities(self.reference.run(None, {inp: images})[0], self.multilabel)
        diff = float(np.abs(probabilities(logits, self.multilabel) - checked).max())
        self.max_abs_prob_diff = max(self.max_abs_prob_diff or 0.0, diff)
        if diff > PROB_TOLERANCE:
            of = "the fp32 model's it was quantized from" if self.reference is not None else "the ONNX model's"
            self.disable(f"the PyTorch weights {self.weights} give probabilities up to {diff:.2e} away from "
                         f"{of} (tolerance {PROB_TOLERANCE:g}): they are not the weights of "
                         f"this export; no heatmaps are written")
            return out
        for k, (row, path) in enumerate(zip(rows, paths)):
            wanted = [c for c in classes if positive[k, c]]
            if not wanted:
                continue
            try:
                self._draw(row, Path(path), {c: cams[c][k] for c in wanted}, probs[k], out[k])
            except (BadImage, OSError, ValueError) as e:  # re-reading the image, writing the PNG
                warn(f"no heatmaps for {path}: {e}")
        return out

    def _draw(self, row: int, path: Path, cams: dict[int, np.ndarray], probs: np.ndarray,
              written: list[str]) -> None:
        """The overlays of one image, one per class in `cams`; their paths appended to `written`."""
        gray = load_gray8(path, window=self.window)
        original = gray.size
        side = min(max(max(gray.size), MIN_SIDE), MAX_SIDE)
        if side != max(gray.size):
            f = side / max(gray.size)
            gray = gray.resize((max(1, round(gray.width * f)), max(1, round(gray.height * f))),
                               Image.Resampling.BILINEAR, reducing_gap=3.0)
        pixels = np.asarray(gray, dtype=np.uint8)
        for c, cam in cams.items():
            peak = float(cam.max())
            heat = to_original(cam / peak if peak > 0 else cam, int(self.prep["image_size"]),
                               int(self.prep["shard_size"]), self.prep["fit"], original, gray.size)
            name, p = self.label_names[c], float(probs[c])
            caption = f"{name}  p={p:.3f}  (threshold {self.thresholds[c]:.3f})"
            caption += "\nGrad-CAM: 0 everywhere" if peak <= 0 else ""
            target = self.out_dir / f"{row + 1:04d}_{_safe(path.stem)}__{_safe(name)}_p{p:.3f}.png"
            overlay(pixels, heat, caption).save(target)
            written.append(str(target))
            self.written += 1


def open_heatmaps(model, out_dir: Path, weights: str | None,
                  window: tuple[float, float] | None) -> Heatmaps:
    """The writer for predict.py's ExportedModel `model`: enabled when its PyTorch weights load,
    else disabled after one warning line."""
    writer = Heatmaps(out_dir, model.preprocess, model.label_names, model.thresholds, model.multilabel,
                      window)
    try:
        writer.reference = fp32_reference(model.meta, model.path)
        writer.tapped, writer.weights = load_weights(model.meta, model.path, weights)
        try:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise HeatmapsUnavailable(f"--heatmaps {out_dir}: cannot create it ({e.strerror or e}): "
                                      f"predicting without heatmaps") from None
    except HeatmapsUnavailable as e:
        warn(str(e))
        return writer
    writer.enabled = True
    print(f"heatmaps: Grad-CAM from the PyTorch weights {writer.weights}, written to {out_dir}",
          file=sys.stderr)
    return writer
