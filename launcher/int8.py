"""`launcher/export.py --int8`: a statically quantized copy of student.onnx, checked against it.

ONNX Runtime's static quantization (QDQ) calibrated on a sample of the validation split as the
evaluation loader reads it; both files scored with ONNX Runtime on the test split (mean and
per-class AUROC) and timed side by side. The INT8 file is written as INT8_FILE.part and renamed
only when its test mean AUROC drops by no more than the tolerance; it carries the fp32 file's
metadata plus a `quantization` record, so launcher/predict.py runs it as it runs the fp32 one.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from data_pipeline.manifest import read_manifest
from launcher.onnx_meta import probabilities, sha256
from launcher.ort_timing import LATENCY, THROUGHPUT, THROUGHPUT_BATCH, onnx_timing, ort_session
from rmsnet.metrics import classification_summary

if TYPE_CHECKING:
    from launcher.model_loading import LoadedModel

INT8_FILE = "student.int8.onnx"
INT8_TOLERANCE = 0.01  # largest accepted drop of the test split's mean AUROC, fp32 minus int8
INT8_CALIBRATION = 256  # validation images the activation ranges are calibrated on

# `--int8` settings, from measurements on the demo student (rmsnet_xxs at 64 px, calibrated on its
# 215 validation images, compared on its 702 test images; the figure is the mean |logit difference|
# to the fp32 model, whose logits have a standard deviation of 1.27; ONNX Runtime 1.32, x86 CPU with
# AVX-512 VNNI; times: one thread, medians, models timed alternately):
# * MobileViT's attention is not where INT8 loses accuracy. Quantizing one op type alone (min-max
#   calibration) costs: Conv 0.098, Mul 0.090 (SiLU and the soft-threshold products), Sigmoid 0.055,
#   Add 0.046, Gemm 0.013, LayerNormalization 0.005, MatMul 0.001, Softmax 0.001. So attention's
#   MatMul, Softmax and LayerNorm are quantized. Keeping every Mul, Sigmoid and Add in float (only
#   Conv, Gemm and MatMul in INT8) was as accurate as the choice below (0.075) but slower than fp32
#   at batch 32 (33.8 against 28.2 ms): each INT8 conv then converts back to float for its activation.
# * Kept in float: the residual shrinkage units' soft thresholding (rmsnet/shrinkage.py: threshold
#   MLP, |r| - tau, sign and the products), which decides on values near a learned threshold. With
#   the settings below, quantizing it too gave 0.085 against 0.076, a mean test AUROC drop of 0.0010
#   against 0.0003 and a largest per-class drop of 0.011 (Hernia) against 0.006 (only the single
#   largest probability change was smaller, 0.15 against 0.26); keeping it in float cost no
#   measurable time (batch 32: 542 against 526 images/s; batch 1: 7.3 against 7.2 ms).
# * Percentile calibration (ORT's default 99.999th percentile of |x|): 0.075 against 0.107 for
#   min-max (largest per-class AUROC drop 0.004 against 0.017). Its histograms cannot bin a tensor
#   whose values span only a few float32 steps (numpy: "Too many bins for data range"; e.g. a
#   shrinkage gate of an untrained model, all 0.5 +- 1e-4), so min-max is the fallback, recorded.
# * Per-channel weights: 0.108 against 0.117 per tensor (min-max, everything quantized), the largest
#   probability change 0.23 against 0.39.
# * uint8 activations, int8 weights (U8S8): as accurate as int8 activations (0.086 both, everything
#   quantized) and about twice as fast in ORT's CPU kernels (batch 32: 26 ms against 59 ms).
CALIBRATION_METHODS = {"Percentile": "percentile 99.999 of |x|", "MinMax": "min-max"}
INT8_SETTINGS = {"format": "QDQ", "weights": "int8, per output channel", "activations": "uint8",
                 "float_kept": "the residual shrinkage units' soft thresholding (threshold MLP, |r| - tau, "
                               "sign and products)"}


def shrinkage_nodes(model) -> list[str]:
    """Names of the soft-thresholding nodes of every residual shrinkage unit (rmsnet/shrinkage.py):
    the threshold MLP `<unit>/threshold/...` and the unit's own Sub, Relu, Sign and Mul `<unit>/<Op>`
    (the TorchScript exporter names a node by its module scope and op type)."""
    names = [n.name for n in model.graph.node]
    units = {name.split("/threshold/")[0] for name in names if "/threshold/" in name}

    def soft_threshold_op(name: str) -> bool:
        scope, _, op = name.rpartition("/")
        return scope in units and re.fullmatch(r"(Sub|Relu|Sign|Mul)(_\d+)?", op) is not None

    return [name for name in names if "/threshold/" in name or soft_threshold_op(name)]


class CalibrationImages:
    """ONNX Runtime's CalibrationDataReader protocol over (n, 1, S, S) images, one image per run
    (the histogram calibrators stack the runs' outputs, so their shapes must agree), and set_range,
    which quantize_static uses to calibrate in chunks (`CalibStridedMinMax`)."""

    def __init__(self, images: np.ndarray):
        self.images = images
        self.set_range(0, len(images))

    def __len__(self) -> int:
        return len(self.images)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.next, self.end = start_index, end_index

    def get_next(self) -> dict | None:
        if self.next >= self.end:
            return None
        self.next += 1
        return {"image": self.images[self.next - 1:self.next]}


def calibration_images(shards, split: str, image_size: int, n: int) -> tuple[np.ndarray, int]:
    """n images of a split spread evenly over it in the evaluation loader's order (all when it has
    fewer), as the evaluation loader gives them; and how many the split has."""
    from data_pipeline.loader import build_loader
    total = int(read_manifest(shards)["splits"][split]["samples"])
    keep = set(np.linspace(0, total - 1, n).round().astype(int).tolist()) if n < total else set(range(total))
    images, seen, position = [], set(), 0
    for batch in build_loader(shards, split, backend="torch", batch_size=THROUGHPUT_BATCH,
                              image_size=image_size, train=False):
        for image, sid in zip(batch["image"].float().numpy(), batch["sid"].tolist()):
            if sid in seen:  # the sampler's padding repeats the last sample
                continue
            seen.add(sid)
            if position in keep:
                images.append(image)
            position += 1
    return np.stack(images), total


def quantize_int8(fp32: Path, out: Path, images: np.ndarray) -> dict:
    """Static INT8 quantization of an fp32 ONNX file with ONNX Runtime (see INT8_SETTINGS for the
    choices); returns what was done."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    chunk = max(d for d in range(1, 9) if len(images) % d == 0)  # must divide the images
    done = {}
    with tempfile.TemporaryDirectory(prefix="int8.") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre))  # symbolic shape inference, ORT's basic optimisations
        keep = shrinkage_nodes(onnx.load(str(pre)))
        for method in (CalibrationMethod.Percentile, CalibrationMethod.MinMax):
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrator prints progress
                    quantize_static(
                        str(pre), str(out), CalibrationImages(images), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=method, nodes_to_exclude=keep,
                        extra_options={
                            # calibrate `chunk` images at a time (any calibrator, despite the name):
                            # the histogram calibrators otherwise hold every run's activations
                            "CalibStridedMinMax": chunk,
                            # LayerNorm's scale is 1-D: per channel along axis 0 (the default axis
                            # 1 does not exist, and ORT falls back to per tensor, warning)
                            "QDQOpTypePerChannelSupportToAxis": {"LayerNormalization": 0}})
                break
            except ValueError as e:
                if method != CalibrationMethod.Percentile:
                    raise
                done["calibration_fallback"] = f"percentile calibration failed ({e}): min-max used"
                print(f"note: int8: {done['calibration_fallback']}", file=sys.stderr)
    return {**INT8_SETTINGS, "calibration_method": CALIBRATION_METHODS[method.name], **done,
            "float_nodes": len(keep), "pre_process": "onnxruntime.quantization.shape_inference."
            "quant_pre_process (symbolic shape inference, basic graph optimisations)"}


def split_logits(paths: dict, shards, split: str, image_size: int, threads: int) -> tuple[dict, np.ndarray]:
    """Logits of each ONNX file (name -> path) on every sample of a split, read once by the
    evaluation loader (its padding dropped by sample id, as launcher/engine.py does), and the targets."""
    from data_pipeline.loader import build_loader
    sessions = {k: ort_session(p, threads) for k, p in paths.items()}
    logits, targets, sids = {k: [] for k in paths}, [], []
    for batch in build_loader(shards, split, backend="torch", batch_size=THROUGHPUT_BATCH,
                              image_size=image_size, train=False):
        x = batch["image"].float().numpy()
        for k, session in sessions.items():
            logits[k].append(session.run(["logits"], {"image": x})[0])
        targets.append(batch["label"].float().numpy())
        sids.append(batch["sid"].numpy())
    _, first = np.unique(np.concatenate(sids), return_index=True)
    return {k: np.concatenate(v)[first] for k, v in logits.items()}, np.concatenate(targets)[first]


def compare_auroc(logits: dict, targets: np.ndarray, split: str, names: list[str], multilabel: bool) -> dict:
    """fp32 and int8 side by side: classification_summary of each, the drops (fp32 - int8, so > 0
    means the int8 model is worse), the largest per-class drop, and how far the outputs moved."""
    probs = {k: probabilities(v, multilabel) for k, v in logits.items()}
    fp32 = classification_summary(probs["fp32"], targets, names, multilabel)
    with warnings.catch_warnings():  # the same classes lack an AUROC: warned once, for fp32
        warnings.simplefilter("ignore")
        int8 = classification_summary(probs["int8"], targets, names, multilabel)
    drops = {n: None if fp32["auroc"][n] is None or int8["auroc"][n] is None
             else fp32["auroc"][n] - int8["auroc"][n] for n in names}
    defined = {n: d for n, d in drops.items() if d is not None}
    worst = max(defined, key=defined.get) if defined else None
    return {"split": split, "samples": int(len(targets)), "runtime": "onnxruntime CPUExecutionProvider",
            "fp32": fp32, "int8": int8,
            "mean_auroc_drop": None if fp32["mean_auroc"] is None
            else fp32["mean_auroc"] - int8["mean_auroc"],
            "per_class_drop": drops,
            "largest_class_drop": {"label": worst, "drop": defined[worst]} if worst else None,
            "max_abs_probability_diff": float(np.abs(probs["fp32"] - probs["int8"]).max()),
            "mean_abs_logit_diff": float(np.abs(logits["fp32"] - logits["int8"]).mean())}


def write_int8_metadata(path: Path, fp32: Path, quantization: dict) -> None:
    """The fp32 file's metadata_props (labels, thresholds, preprocess, ...) and a `quantization`
    record, so launcher/predict.py reads the INT8 file as it reads the fp32 one."""
    import onnx
    model, source = onnx.load(str(path)), onnx.load(str(fp32))
    del model.metadata_props[:]
    model.metadata_props.extend(source.metadata_props)
    entry = model.metadata_props.add()
    entry.key, entry.value = "quantization", json.dumps(quantization)
    model.producer_name = source.producer_name
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def int8_inputs(args, loaded: LoadedModel, manifest: dict | None, shards: Path | None,
                train_manifest: dict | None) -> tuple[Path, str, str] | None:
    """(shards, calibration split, test split) for --int8: --shards, else the training shards;
    None without --int8. ValueError for a combination that cannot work."""
    if not args.int8:
        given = [f for f, v in (("--int8-tolerance", args.int8_tolerance),
                                ("--int8-calibration", args.int8_calibration)) if v is not None]
        if given:
            verb = "apply" if len(given) > 1 else "applies"
            raise ValueError(f"{' and '.join(given)} {verb} only with --int8")
        return None
    if args.int8_calibration is not None and args.int8_calibration < 1:
        raise ValueError(f"--int8-calibration wants a positive number of images, got {args.int8_calibration}")
    path, man = (Path(args.shards), manifest) if args.shards else (shards, train_manifest)
    if man is None:
        raise ValueError("--int8 needs shards (--shards SHARDS, or the run config's data.shards): their "
                         "validation split calibrates the INT8 model and their test split checks its AUROC")
    cfg = loaded.config
    val, test = (cfg.data.val_split, cfg.data.test_split) if cfg else ("val", "test")
    for split, use in ((val, "calibration"), (test, "the AUROC check")):
        if not (man["splits"].get(split) or {}).get("samples"):
            raise ValueError(f"--int8: {path} has no '{split}' split or it is empty ({use} reads it)")
    return path, val, test


def int8_export(out: Path, fp32: Path, data: tuple[Path, str, str], image_size: int, meta: dict,
                args, threads: list[int]) -> dict:
    """Quantize student.onnx, compare both files' test AUROC, and (when the drop is within the
    tolerance) time them and write INT8_FILE; the report's `int8` section, `passed` saying which.
    The file is written as INT8_FILE.part and renamed only when it passes."""
    shards, val_split, test_split = data
    tolerance = INT8_TOLERANCE if args.int8_tolerance is None else args.int8_tolerance
    final, part = out / INT8_FILE, out / f"{INT8_FILE}.part"
    final.unlink(missing_ok=True)  # an earlier export's INT8 file belongs to other weights
    try:
        images, total = calibration_images(shards, val_split, image_size,
                                           args.int8_calibration or INT8_CALIBRATION)
        quantization = quantize_int8(fp32, part, images)
        logits, targets = split_logits({"fp32": fp32, "int8": part}, shards, test_split, image_size,
                                       max(threads))
        evaluation = compare_auroc(logits, targets, test_split, list(meta["label_names"]),
                                   bool(meta["multilabel"]))
        drop = evaluation["mean_auroc_drop"]
        section = {"file": INT8_FILE, "fp32_file": fp32.name, "fp32_bytes": fp32.stat().st_size,
                   "tolerance": tolerance, "passed": drop is not None and drop <= tolerance,
                   "quantization": quantization,
                   "calibration": {"shards": str(Path(shards).resolve()), "split": val_split,
                                   "images": len(images), "of": total,
                                   "selection": "evenly spaced in the evaluation loader's order"},
                   "evaluation": evaluation}
        if section["passed"]:
            write_int8_metadata(part, fp32, {
                "precision": "int8", "from": fp32.name, "from_sha256": sha256(fp32), **quantization,
                "calibration": section["calibration"], "test_split": test_split,
                "test_samples": evaluation["samples"], "mean_auroc_fp32": evaluation["fp32"]["mean_auroc"],
                "mean_auroc_int8": evaluation["int8"]["mean_auroc"], "mean_auroc_drop": drop,
                "largest_class_drop": evaluation["largest_class_drop"], "tolerance": tolerance})
            section["timing"] = onnx_timing({"fp32": fp32, "int8": part}, image_size, threads, args.repeats,
                                            args.throughput_repeats)
        section["bytes"] = part.stat().st_size
        if section["passed"]:
            os.replace(part, final)
            section["sha256"] = sha256(final)
    finally:
        part.unlink(missing_ok=True)
    return section


def int8_refusal(section: dict) -> str:
    """The one line saying why the INT8 model was not kept."""
    ev, tol = section["evaluation"], section["tolerance"]
    if ev["mean_auroc_drop"] is None:
        return (f"INT8 model not written: no class of the '{ev['split']}' split has both positives and "
                f"negatives, so its AUROC cannot be checked")
    return (f"INT8 model not written: its mean AUROC on '{ev['split']}' drops by {ev['mean_auroc_drop']:.4f} "
            f"({ev['fp32']['mean_auroc']:.4f} fp32 -> {ev['int8']['mean_auroc']:.4f} int8), more than the "
            f"tolerance {tol:g}; accept a larger drop with --int8-tolerance")


def int8_markdown(section: dict, threads: list[int]) -> str:
    """fp32 and int8 side by side: AUROC (mean, per class, largest drop), size, speed."""
    ev = section["evaluation"]
    fp, q = ev["fp32"], ev["int8"]
    timing = section.get("timing") or {}
    rows = []

    def row(label, a, b, last):
        rows.append([label, a, b, last])

    def auroc(v):
        return "-" if v is None else f"{v:.4f}"

    def drop(v):
        return "-" if v is None else f"drop {v:+.4f}"

    row(f"mean AUROC, '{ev['split']}' ({ev['samples']} images)", auroc(fp["mean_auroc"]),
        auroc(q["mean_auroc"]), f"{drop(ev['mean_auroc_drop'])} (tolerance {section['tolerance']:g}: "
                                f"{'passed' if section['passed'] else 'REFUSED'})")
    for n, d in ev["per_class_drop"].items():
        row(f"AUROC {n}", auroc(fp["auroc"][n]), auroc(q["auroc"][n]), drop(d))
    worst = ev["largest_class_drop"]
    row("largest per-class drop", "", "", f"{worst['label']} {worst['drop']:+.4f}" if worst else "-")
    row("file (MB)", f"{section['fp32_bytes'] / 1e6:.2f}", f"{section['bytes'] / 1e6:.2f}",
        f"{section['bytes'] / section['fp32_bytes']:.2f}x the fp32 size")
    for key, label, fmt in ((LATENCY, "latency, batch 1, {} (ms)", "{:.2f}"),
                            (THROUGHPUT, f"throughput, batch {THROUGHPUT_BATCH}, {{}} (images/s)", "{:.1f}")):
        for n in threads:
            a, b = (timing.get(key, {}).get(k, {}).get(str(n)) for k in ("fp32", "int8"))
            ratio = "-" if not a or not b else f"speed-up {a / b if key == LATENCY else b / a:.2f}x"
            row("ONNX Runtime " + label.format(f"{n} thread{'s' * (n > 1)}"),
                "-" if a is None else fmt.format(a), "-" if b is None else fmt.format(b), ratio)
    row("largest probability change", "", "", f"{ev['max_abs_probability_diff']:.3f}")
    head = ["", f"fp32 ({section['fp32_file']})", f"int8 ({section['file']})", "int8 vs fp32"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    qz, cal = section["quantization"], section["calibration"]
    lines += ["", f"INT8: ONNX Runtime static quantization, {qz['format']}, weights {qz['weights']}, "
                  f"activations {qz['activations']}, calibrated ({qz['calibration_method']}) on "
                  f"{cal['images']} of the {cal['of']} '{cal['split']}' images; kept in float: "
                  f"{qz['float_kept']} ({qz['float_nodes']} nodes). AUROC of both files in ONNX Runtime "
                  f"(CPU) on the same images; drop = fp32 - int8. Times: medians, intra_op_num_threads = "
                  f"the thread count, the two files timed alternately."]
    return "\n".join(lines)
