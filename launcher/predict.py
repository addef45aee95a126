"""Classify images with an exported student at a terminal: ONNX Runtime, numpy and Pillow (+ pydicom).

    python launcher/predict.py --model runs/student/export images/ scan.dcm --out results.csv
    python launcher/predict.py --model runs/student/export/student.onnx series/ --out results.json
    python launcher/predict.py --model runs/student/export a.png          # CSV on stdout

--model is the directory launcher/export.py wrote (its student.onnx) or an .onnx file. INPUT is
any number of image files (PNG, JPEG, TIFF, BMP, DICOM) and folders, searched recursively; in a
folder, files count as images by their suffix or, for DICOM series without suffixes, by the DICM
magic (DICOMDIR and hidden files are skipped).

Every image is prepared as the model was trained, from what export.py recorded in the ONNX
metadata (`preprocess`, read from the shards' manifest.json at export time): decoded to 8-bit
grayscale by the shard builder's own function (data_pipeline/image_io.py: DICOM rescale slope /
intercept, window, MONOCHROME1 inverted; 16-bit PNG/TIFF >> 8; RGB, RGBA, CMYK to luminance; EXIF
orientation), fitted to the shards' size with their --fit, passed through their storage format
(a JPEG shard's compression included), resized to the model's input side when that differs
exactly as the evaluation loader (torchvision's antialiased bilinear on uint8, reproduced here in
numpy bit for bit; DALI's GPU resize, used by GPU runs, may differ from it by one grey level on a
few pixels), and scaled to [0, 1]; the model's normalisation is inside the graph.
--dicom-window C,W replaces the window the shards were built with (if any) and each file's own.

Output, one row per input in the order found: the file path, the DICOM SOPInstanceUID and
PatientID when present, every class probability (sigmoid for multi-label models, softmax
otherwise), the decision per class at the thresholds stored in the export (chosen on validation
by launcher/evaluate.py; 0.5 for every class when the export has none, and the output says which),
the predicted class of a single-label model, and the model's fingerprint (sha256 of the ONNX
file). `--out X.csv` writes CSV, `--out X.json` JSON with the model's description once at the top;
without --out, CSV goes to stdout. The file is written to X.part and renamed when complete.

--heatmaps DIR also writes, per image and per finding positive at those thresholds, a PNG of the
image with the student's Grad-CAM map over it (launcher/heatmaps.py: computed in PyTorch from the
export's PyTorch weights, after checking they give the ONNX probabilities); each row lists its
files (`heatmaps`). Only then is torch imported; without torch or the weights, one warning, and
the predictions are made as without the option.

A file that cannot be read gets a row with status `error` and the reason, and the others go on.
Exit status: 0 when every input was predicted, 1 when any failed, 2 for usage errors (a --model
that is not an export, no inputs, a bad option).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python launcher/predict.py` from a checkout
    sys.path.insert(0, str(REPO))

from data_pipeline.cli import add_debug_flag, run_cli  # noqa: E402
from data_pipeline.image_io import (BadImage, MissingDependency, as_stored, dicom_identifiers,  # noqa: E402
                                    fit_square, is_dicom, load_gray8, parse_window)
from launcher.onnx_meta import (decision_thresholds, decode_metadata, probabilities, sha256,  # noqa: E402
                                thresholds_source)

if TYPE_CHECKING:  # imported (with torch) only for --heatmaps
    from launcher.heatmaps import Heatmaps

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"}
OUTPUT_SUFFIXES = (".csv", ".json")


class UsageError(ValueError):
    """A command line predict.py cannot run (exit status 2); the message names what is wrong."""


# ----------------------------------------------------------------------------------- the model
@dataclass
class ExportedModel:
    path: Path
    session: object  # onnxruntime.InferenceSession
    meta: dict  # the decoded metadata_props
    sha256: str
    label_names: list[str]
    multilabel: bool
    thresholds: list[float]
    thresholds_source: str
    preprocess: dict

    def describe(self) -> dict:
        """The model part of the JSON output."""
        return {"path": str(self.path), "sha256": self.sha256, "arch": self.meta.get("arch"),
                "role": self.meta.get("role"), "label_names": self.label_names,
                "multilabel": self.multilabel, "probability": "sigmoid per class" if self.multilabel
                else "softmax over the classes", "thresholds": dict(zip(self.label_names, self.thresholds)),
                "thresholds_source": self.thresholds_source, "preprocess": self.preprocess}


def onnx_file(model: Path) -> Path:
    """--model as the .onnx file: itself, or the student.onnx (else the only .onnx) of a directory."""
    if model.is_file():
        return model
    if not model.is_dir():
        raise UsageError(f"--model {model}: no such file or directory")
    if (model / "student.onnx").is_file():
        return model / "student.onnx"
    found = sorted(model.glob("*.onnx"))
    if len(found) != 1:
        raise UsageError(f"--model {model}: no student.onnx, and {len(found)} other .onnx files "
                         f"({', '.join(p.name for p in found) or 'none'}); name the file")
    return found[0]


def load_exported(model: Path) -> ExportedModel:
    """The ONNX session and what export.py recorded in the file; UsageError naming the file when it
    is not a model launcher/export.py wrote (with the preprocessing record)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UsageError("predict.py needs ONNX Runtime, which is not installed "
                         "(pip install onnxruntime)") from None
    path = onnx_file(Path(model))
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        meta = decode_metadata(dict(session.get_modelmeta().custom_metadata_map))
    except ValueError as e:  # a metadata value that is not what export.py writes
        raise UsageError(f"--model {path}: {e}") from None
    except Exception as e:  # ORT raises its own Fail / InvalidProtobuf / ... types
        raise UsageError(f"--model {path}: cannot load it as an ONNX model ({e})") from None
    names = meta.get("label_names")
    if not names:
        raise UsageError(f"--model {path}: no label_names in its metadata (not written by "
                         f"launcher/export.py)")
    prep = meta.get("preprocess")
    if not prep:
        raise UsageError(f"--model {path}: its metadata does not record how the training images were "
                         f"prepared (exported by an older export.py, or without a shard manifest); "
                         f"export again with --shards SHARDS")
    shape = session.get_inputs()[0].shape
    if len(shape) != 4 or shape[1:] != [1, prep["image_size"], prep["image_size"]]:
        raise UsageError(f"--model {path}: input shape {shape} does not match the recorded input side "
                         f"{prep['image_size']}")
    try:
        thresholds = decision_thresholds(meta, list(names))
    except ValueError as e:
        raise UsageError(f"--model {path}: {e}") from None
    return ExportedModel(path, session, meta, sha256(path), list(names), bool(meta.get("multilabel")),
                         thresholds, thresholds_source(meta, f"the metadata of {path}"), prep)


# ---------------------------------------------------------------------------------- the inputs
def in_folder_is_image(path: Path) -> bool:
    """Whether a file met while searching a folder is an input: image suffix, or DICOM magic."""
    if path.name.startswith(".") or path.name.upper() == "DICOMDIR":
        return False
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        return is_dicom(path)
    except OSError:
        return False


def find_inputs(inputs: list[str]) -> tuple[list[Path], int]:
    """Files to predict, in the order given (folders: sorted, recursive), each once; and how many
    files in the folders were passed over as not images. A path that does not exist stays in the
    list (its row says so)."""
    found, skipped, seen = [], 0, set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            found.append(path)

    for item in inputs:
        path = Path(item)
        if not path.is_dir():
            add(path)
            continue
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            if in_folder_is_image(f):
                add(f)
            else:
                skipped += 1
    return found, skipped


def model_input(path: Path, prep: dict, window: tuple[float, float] | None) -> np.ndarray:
    """One image as the model's (S, S) float32 input in [0, 1], prepared as the shard builder and
    the evaluation loader prepared the training data (module docstring)."""
    img = load_gray8(path, window=window)
    img = as_stored(fit_square(img, int(prep["shard_size"]), prep["fit"]), prep["format"],
                    int(prep["jpeg_quality"]))
    pixels = resize_like_loader(np.asarray(img, dtype=np.uint8), int(prep["image_size"]))
    return pixels.astype(np.float32) / np.float32(255.0)


# ------------------------------------------------------------- the evaluation loader's resize
def _axis_filter(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Source indices (n_out, k), int16-range weights (n_out, k) and their precision in bits of the
    antialiased linear filter that torch's uint8 interpolate uses (`_compute_index_ranges_int16_weights`:
    triangle of half-width max(scale, 1), weights normalised, then scaled to 2**precision)."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    inv = 1.0 / support
    starts, weights = [], []
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        w = np.clip(1.0 - np.abs((np.arange(lo, hi) - center + 0.5) * inv), 0.0, None)
        starts.append(lo)
        weights.append(w / w.sum() if w.sum() else w)
    w_max = max(float(w.max()) for w in weights if len(w))
    precision = 0
    while precision < 22 and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    k = max(len(w) for w in weights)
    index, fixed = np.zeros((n_out, k), np.int64), np.zeros((n_out, k), np.int64)
    for i, (lo, w) in enumerate(zip(starts, weights)):
        index[i, :len(w)] = lo + np.arange(len(w))
        fixed[i, :len(w)] = np.trunc(w * (1 << precision) + 0.5)  # weights are >= 0
    return index, fixed, precision


def _resize_last_axis(a: np.ndarray, n_out: int) -> np.ndarray:
    index, fixed, precision = _axis_filter(a.shape[-1], n_out)
    acc = (a[..., index].astype(np.int64) * fixed).sum(-1) + (1 << (precision - 1))
    return np.clip(acc >> precision, 0, 255).astype(np.uint8)


def resize_like_loader(pixels: np.ndarray, size: int) -> np.ndarray:
    """(h, w) uint8 to (size, size) as the evaluation loader resizes a shard image to the training
    image_size (torchvision Resize on a uint8 tensor: antialiased bilinear in integer arithmetic,
    width first, then height), bit for bit; unchanged when it already has that size."""
    h, w = pixels.shape
    if w != size:
        pixels = _resize_last_axis(pixels, size)
    if h != size:
        pixels = _resize_last_axis(pixels.T, size).T
    return np.ascontiguousarray(pixels)


# --------------------------------------------------------------------------------- prediction
def result_row(model: ExportedModel, path: Path, probs: np.ndarray | None, error: str | None,
               heatmaps: list[str] | None = None) -> dict:
    """What the output says about one input (probs None: it could not be read, `error` says why)."""
    ids = dicom_identifiers(path)
    row = {"path": str(path), "status": "error" if error else "ok", "error": error or "",
           "sop_instance_uid": ids.get("SOPInstanceUID", ""), "patient_id": ids.get("PatientID", "")}
    names = model.label_names
    if probs is None:
        row.update(probabilities={}, positive={}, predicted="")
    else:
        row["probabilities"] = {n: float(p) for n, p in zip(names, probs)}
        row["positive"] = {n: bool(p >= t) for n, p, t in zip(names, probs, model.thresholds)}
        row["predicted"] = "" if model.multilabel else names[int(np.argmax(probs))]
    row["model_sha256"] = model.sha256
    if heatmaps is not None:
        row["heatmaps"] = heatmaps
    return row


class Progress:
    """`predict: k/n images, f failed` on stderr: rewritten in place on a terminal, one line per
    batch otherwise."""

    def __init__(self, total: int):
        self.total, self.tty = total, sys.stderr.isatty()

    def update(self, done: int, failed: int) -> None:
        text = f"predict: {done}/{self.total} images, {failed} failed"
        print(("\r" + text) if self.tty else text, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def predict(model: ExportedModel, paths: list[Path], batch_size: int,
            window: tuple[float, float] | None, heatmaps: Heatmaps | None = None) -> list[dict]:
    """One row per path, in order; unreadable files get their reason and the others go on.
    `heatmaps`: a launcher/heatmaps.py writer, given every batch; the rows then list its files."""
    rows: list[dict | None] = [None] * len(paths)
    batch: list[tuple[int, np.ndarray]] = []
    progress, done, failed = Progress(len(paths)), 0, 0
    input_name = model.session.get_inputs()[0].name

    def flush() -> None:
        nonlocal done
        x = np.stack([a for _, a in batch])[:, None]  # (b, 1, S, S)
        probs = probabilities(model.session.run(None, {input_name: x})[0], model.multilabel)
        maps = [None] * len(batch) if heatmaps is None else \
            heatmaps.write([i for i, _ in batch], [paths[i] for i, _ in batch], x, probs)
        for (i, _), p, m in zip(batch, probs, maps):
            rows[i] = result_row(model, paths[i], p, None, m)
        done += len(batch)
        batch.clear()
        progress.update(done, failed)

    for i, path in enumerate(paths):
        try:
            batch.append((i, model_input(path, model.preprocess, window)))
        except (BadImage, MissingDependency, OSError, ValueError) as e:
            reason = f"{path}: {e}"
            print(f"\nerror: {reason}" if progress.tty else f"error: {reason}", file=sys.stderr)
            rows[i] = result_row(model, path, None, reason, None if heatmaps is None else [])
            failed += 1
            done += 1
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    elif failed:
        progress.update(done, failed)
    progress.close()
    return rows


# ------------------------------------------------------------------------------------- output
def csv_text(model: ExportedModel, rows: list[dict]) -> str:
    """The rows as CSV; with --heatmaps a last column `heatmaps` joins each row's files with '|'."""
    names = model.label_names
    head = ["path", "status", "error", "sop_instance_uid", "patient_id"]
    head += [f"prob:{n}" for n in names] + [f"positive:{n}" for n in names] + ["positives"]
    head += ([] if model.multilabel else ["predicted"]) + [f"threshold:{n}" for n in names]
    head += ["thresholds", "model_sha256"]
    with_maps = bool(rows) and "heatmaps" in rows[0]
    head += ["heatmaps"] if with_maps else []
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(head)
    for r in rows:
        ok = r["status"] == "ok"
        cells = [r[k] for k in head[:5]]
        cells += [repr(r["probabilities"][n]) if ok else "" for n in names]
        cells += [int(r["positive"][n]) if ok else "" for n in names]
        cells.append("|".join(n for n in names if ok and r["positive"][n]))
        cells += [] if model.multilabel else [r["predicted"]]
        cells += [repr(t) for t in model.thresholds] + [model.thresholds_source, r["model_sha256"]]
        cells += ["|".join(r["heatmaps"])] if with_maps else []
        writer.writerow(cells)
    return buf.getvalue()


def json_text(model: ExportedModel, rows: list[dict], heatmaps: dict | None = None) -> str:
    failed = sum(r["status"] != "ok" for r in rows)
    doc = {"model": model.describe(),
           "summary": {"inputs": len(rows), "predicted": len(rows) - failed, "failed": failed},
           **({"heatmaps": heatmaps} if heatmaps is not None else {}), "results": rows}
    return json.dumps(doc, indent=1) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write `path.part`, then rename it over `path`: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------- main
def _window(text: str) -> tuple[float, float]:
    try:
        return parse_window(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="export directory (student.onnx) or an .onnx file")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image or DICOM files, folders (recursive)")
    p.add_argument("--out", default=None, help="results.csv or results.json (default: CSV on stdout)")
    p.add_argument("--batch-size", type=_positive, default=32, help="images per ONNX Runtime call")
    p.add_argument("--dicom-window", type=_window, metavar="CENTER,WIDTH", default=None,
                   help="DICOM window for every file, instead of the shards' and each file's own")
    p.add_argument("--heatmaps", metavar="DIR", default=None,
                   help="write a Grad-CAM overlay PNG per image and positive finding into DIR "
                        "(needs torch and the export's PyTorch weights)")
    p.add_argument("--heatmap-weights", metavar="CKPT", default=None,
                   help="the PyTorch checkpoint the export was made from, for --heatmaps (default: the "
                        "one its metadata records, or a model.pt beside the ONNX file)")
    add_debug_flag(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.out is not None and Path(args.out).suffix.lower() not in OUTPUT_SUFFIXES:
            raise UsageError(f"--out {args.out}: the name must end in .csv or .json")
        if not args.inputs:
            raise UsageError("no INPUT given: name image files or folders")
        if args.heatmap_weights is not None and args.heatmaps is None:
            raise UsageError("--heatmap-weights is only used with --heatmaps DIR")
        model = load_exported(Path(args.model))
        paths, skipped = find_inputs(args.inputs)
        if not paths:
            raise UsageError(f"no images found in {', '.join(args.inputs)}"
                             + (f" ({skipped} other files passed over)" if skipped else ""))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if skipped:
        print(f"note: {skipped} files in the folders are neither images (by suffix) nor DICOM; "
              f"passed over", file=sys.stderr)
    if (model.meta.get("training_data") or {}).get("synthetic"):
        print("warning: this model was trained on synthetic stand-in images: for testing the system "
              "only, not for clinical use (see MODEL_CARD.md beside the export)", file=sys.stderr)
    stored = model.preprocess.get("dicom_window")
    window = args.dicom_window or (tuple(stored) if stored else None)
    print(f"model {model.path} (sha256 {model.sha256[:12]}...), {len(paths)} inputs; thresholds: "
          f"{model.thresholds_source}", file=sys.stderr)
    heatmaps = None
    if args.heatmaps is not None:
        from launcher.heatmaps import open_heatmaps  # torch is imported from here on, not before
        heatmaps = open_heatmaps(model, Path(args.heatmaps), args.heatmap_weights, window)
    rows = predict(model, paths, args.batch_size, window, heatmaps)
    out = Path(args.out) if args.out else None
    if out and out.suffix.lower() == ".json":
        text = json_text(model, rows, heatmaps.describe() if heatmaps is not None else None)
    else:
        text = csv_text(model, rows)
    if out is None:
        sys.stdout.write(text)
    else:
        write_atomic(out, text)
        print(f"wrote {out}", file=sys.stderr)
    if heatmaps is not None and (heatmaps.enabled or heatmaps.written):
        print(f"wrote {heatmaps.written} heatmaps to {heatmaps.out_dir}", file=sys.stderr)
    failed = sum(r["status"] != "ok" for r in rows)
    if failed:
        print(f"{failed} of {len(rows)} inputs could not be predicted (status 'error' in the output)",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
