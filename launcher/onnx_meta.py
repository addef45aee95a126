"""What an exported model records about itself, readable without torch.

`launcher/export.py` writes these records into the ONNX file's metadata_props (and the JSON sidecar
beside it); `launcher/predict.py` reads them back on a terminal that has ONNX Runtime, numpy and
Pillow only. Kept here, free of torch, so both sides share one definition: the file fingerprint,
which metadata values are JSON, the input preprocessing taken from the shards' manifest.json, and
the wording of where the decision thresholds came from, and logits to probabilities.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from data_pipeline.manifest import MANIFEST

DEFAULT_THRESHOLD = 0.5
# metadata_props values that export.py writes as JSON; the others are plain strings, or "null"
JSON_KEYS = ("label_names", "multilabel", "input", "output", "thresholds", "thresholds_chosen_on",
             "trained_image_size", "preprocess", "training_data", "quantization")


def probabilities(logits: np.ndarray, multilabel: bool) -> np.ndarray:
    """Sigmoid per class (multi-label) or softmax over the classes, in float64."""
    x = logits.astype(np.float64)
    if multilabel:
        return 1.0 / (1.0 + np.exp(-x))
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def sha256(path: Path) -> str:
    """sha256 of a file, streamed (the ONNX model's fingerprint)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def preprocessing(manifest: dict, shards: Path, image_size: int, trained_image_size: int | None) -> dict:
    """How a raw image becomes the model's input: the shard builder's options recorded in the
    shards' manifest.json (decode to 8-bit grayscale, fit to the stored size, the stored format),
    then the evaluation loaders' resize to the model's input side and the scaling to [0, 1]."""
    image = manifest["image"]
    stored = int(image["size"])
    return {
        "source": str(Path(shards).resolve() / MANIFEST),
        "gray8": "data_pipeline/image_io.py load_gray8 (DICOM rescale and window, MONOCHROME1 inverted; "
                 "16-bit >> 8; colour to luminance; EXIF orientation)",
        "shard_size": stored, "fit": image.get("fit", "pad"), "format": image["format"],
        "jpeg_quality": int(image.get("jpeg_quality", 95)), "dicom_window": image.get("dicom_window"),
        "image_size": int(image_size), "trained_image_size": trained_image_size,
        "resize": None if stored == image_size else
        f"antialiased bilinear, {stored} -> {image_size} (the evaluation loader's resize)",
        "scale": "uint8 / 255 as float32; the model's normalisation is inside the graph",
    }


def decode_metadata(props: dict[str, str]) -> dict:
    """metadata_props as export.py meant them: JSON values decoded, the others kept as strings
    (export.py writes a string as it is and anything else, None included, as JSON)."""
    out = {}
    for key, value in props.items():
        if key in JSON_KEYS:
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"metadata {key!r} is not valid JSON ({e})") from None
        elif value == "null":
            value = None
        out[key] = value
    return out


def decision_thresholds(meta: dict, label_names: list[str]) -> list[float]:
    """The threshold of every class, in label order: the stored one, else DEFAULT_THRESHOLD (no
    thresholds in the export, or none chosen for a class that had no positives or no negatives)."""
    stored = meta.get("thresholds") or {}
    unknown = sorted(set(stored) - set(label_names))
    if unknown:
        raise ValueError(f"metadata thresholds name classes {unknown} that are not among the labels "
                         f"{label_names}")
    return [DEFAULT_THRESHOLD if stored.get(n) is None else float(stored[n]) for n in label_names]


def thresholds_source(meta: dict, where: str) -> str:
    """One sentence: which thresholds decide, how they were chosen, where they were read from."""
    stored = meta.get("thresholds")
    if not stored:
        return (f"none stored in {where} (launcher/evaluate.py was not run before export): "
                f"{DEFAULT_THRESHOLD} for every class")
    chosen = meta.get("thresholds_chosen_on") or {}
    on = f"split '{chosen.get('split')}' ({chosen.get('samples')} images)" if chosen else "an unnamed split"
    method = meta.get("thresholds_method") or "unknown method"
    text = f"{method}, chosen on {on} by launcher/evaluate.py; read from {where}"
    missing = [n for n in meta.get("label_names") or stored if stored.get(n) is None]
    if missing:
        text += (f"; none could be chosen for {', '.join(missing)} (no positives or no negatives on "
                 f"that split): {DEFAULT_THRESHOLD} for those")
    return text
