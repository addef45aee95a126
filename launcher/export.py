"""Export a student to ONNX, check it against PyTorch, and write a deployment report.

    python launcher/export.py --checkpoint runs/student --out runs/student/export
    python launcher/export.py --checkpoint runs/student --out DIR --shards shards/cxr   # + real-image check
    python launcher/export.py --checkpoint runs/student/final/model.pt --out DIR --image-size 224 \
        --teacher teacher.pt --teacher-name densenet121 --threads 1,2
    python launcher/export.py --checkpoint runs/student --out DIR --metrics elsewhere/metrics.json
    python launcher/export.py --checkpoint runs/student --out DIR --shards shards/cxr --int8 \
        [--int8-tolerance 0.01] [--int8-calibration 256]

--checkpoint takes what launcher/evaluate.py takes (run directory, model.pt, DeepSpeed checkpoint).
Writes under --out:

    student.onnx      input `image` (batch, 1, S, S) float32 grayscale in [0, 1] -- the model's own
                      normalisation is inside the graph -- output `logits` (batch, C); the batch
                      dimension is dynamic, S is fixed. metadata_props carry the label names, the
                      per-class thresholds (from thresholds.json, written next to the model by
                      evaluate.py), the task type, how to turn logits into decisions, and
                      `preprocess`: how a raw image becomes the input, from the training shards'
                      manifest.json (the shard builder's size, fit, format and DICOM window, then
                      the resize to S), which launcher/predict.py follows (launcher/onnx_meta.py).
    student.json      the same metadata as a JSON sidecar, with the ONNX-vs-PyTorch check
    MODEL_CARD.md     training data, labels, thresholds and how they were chosen, test AUROC with
                      intervals (launcher/model_card.py), intended use and limits, input
                      requirements, the fingerprint (sha256 of student.onnx)
    teacher.onnx/.json  the same for the teacher, when it is known (the run's config or --teacher)
    deploy_report.json, deploy_report.md   parameters, MACs at S, ONNX size, CPU latency (batch 1)
                      and throughput (batch 32) in PyTorch and ONNX Runtime at each --threads count
                      (torch.set_num_threads and ORT intra_op_num_threads set to the same number;
                      medians of repeated runs, student and teacher timed alternately so that both
                      see the same machine load), and the teacher/student ratios; with --int8, an
                      `int8` section: the INT8 model against fp32 (below)
    student.int8.onnx with --int8: statically quantized by ONNX Runtime (QDQ, per-channel int8
                      weights, uint8 activations; what stays in float and why: launcher/int8.py),
                      calibrated on up to --int8-calibration images of the validation split as the
                      evaluation loader reads them. Both files are then scored with ONNX Runtime on
                      the test split (mean and per-class AUROC) and timed side by side; the file
                      carries student.onnx's metadata_props plus a `quantization` record (its
                      measured AUROC drop among them), so launcher/predict.py runs it unchanged.
                      When the test mean AUROC drops by more than --int8-tolerance (default 0.01),
                      it is not written (it is made as student.int8.onnx.part and renamed only when
                      it passes) and the exit status is 1; the fp32 export stays.

The training shards are the run config's data.shards when their manifest.json is there, else
--shards. The card's test figures come from --metrics (an evaluate.py metrics.json), else the
newest <run dir>/eval/metrics.json or eval/*/metrics.json of the test split whose thresholds.json
carries these weights' fingerprint, else the run's own metrics.json when exporting its
final/model.pt (AUROC without intervals).

The export is checked with ONNX Runtime against PyTorch on random inputs (two batch sizes, so the
dynamic batch is exercised) and, with --shards, on real images: the largest absolute logit
difference must be <= --tolerance (default 1e-4); otherwise the exit status is 1.
The TorchScript exporter (`dynamo=False`) is used: it needs no package beyond onnx.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data_pipeline.cli import add_debug_flag, run_cli
from data_pipeline.manifest import MANIFEST, read_manifest
from launcher.config import ConfigError
from launcher.metrics_doc import model_result, read_metrics
from launcher.model_card import model_card
from launcher.model_loading import (REPO, THRESHOLDS, CheckpointError, LoadedModel, load_model, load_teacher,
                                    read_thresholds, resolve_teacher)
from launcher.int8 import INT8_CALIBRATION, INT8_FILE, INT8_TOLERANCE, int8_export, int8_inputs, int8_markdown, \
    int8_refusal
from launcher.onnx_meta import DEFAULT_THRESHOLD, preprocessing, sha256  # noqa: F401 (export.sha256 stays)
from launcher.ort_timing import LATENCY, THROUGHPUT, THROUGHPUT_BATCH, median_times, ort_session
from rmsnet.summary import count_macs
from rmsnet.teachers import TappedModel



class LogitsGraph(nn.Module):
    """What goes into the ONNX graph: grayscale [0, 1] in, logits out (`TappedModel.forward_logits`)."""

    def __init__(self, tapped: TappedModel):
        super().__init__()
        self.tapped = tapped

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.tapped.forward_logits(image)  # (b, 1, S, S) -> (b, C)


def export_onnx(tapped: TappedModel, path: Path, image_size: int, metadata: dict, opset: int) -> None:
    """TorchScript-based export with a dynamic batch; metadata_props added; checked by onnx."""
    import onnx

    graph = LogitsGraph(tapped).eval()
    dummy = torch.rand(2, 1, image_size, image_size)
    with warnings.catch_warnings():
        # Tracing freezes Python-side shape arithmetic (timm's MobileViT patch sizes, the channel
        # check): correct here because only the batch dimension is dynamic; S is fixed.
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (dummy,), str(path), input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    model = onnx.load(str(path))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    model.producer_name = "rms-distill launcher/export.py"
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@torch.inference_mode()
def max_abs_diff(tapped: TappedModel, session, images: torch.Tensor) -> float:
    ref = tapped.forward_logits(images).float().numpy()
    got = session.run(["logits"], {"image": images.numpy()})[0]
    if got.shape != ref.shape:
        raise RuntimeError(f"ONNX output shape {got.shape} differs from PyTorch {ref.shape}")
    return float(np.abs(got - ref).max())


def real_images(shards, split: str, image_size: int, n: int) -> torch.Tensor:
    """Up to n images of a split, as the evaluation loader gives them."""
    from data_pipeline.loader import build_loader
    loader = build_loader(shards, split, backend="torch", batch_size=min(n, 32), image_size=image_size,
                          train=False)
    batches, seen = [], 0
    for batch in loader:
        batches.append(batch["image"].float())
        seen += len(batches[-1])
        if seen >= n:
            break
    return torch.cat(batches)[:n]


def check(tapped: TappedModel, path: Path, image_size: int, tolerance: float,
          real: torch.Tensor | None) -> dict:
    """Largest |ONNX - PyTorch| logit on random inputs (batches 1 and 7) and on real images."""
    session = ort_session(path, threads=1)
    g = torch.Generator().manual_seed(0)
    out = {"tolerance_max_abs_logit_diff": tolerance,
           "random": {f"batch_{b}": max_abs_diff(tapped, session, torch.rand(b, 1, image_size, image_size,
                                                                              generator=g))
                      for b in (1, 7)}}
    if real is not None:
        out["real"] = {f"batch_{len(real)}": max_abs_diff(tapped, session, real)}
    diffs = [v for part in ("random", "real") for v in out.get(part, {}).values()]
    out["max_abs_diff"] = max(diffs)
    out["passed"] = out["max_abs_diff"] <= tolerance
    return out


# --------------------------------------------------------------------------------------- timing

def benchmark(models: dict, image_size: int, threads: list[int], repeats: int,
              throughput_repeats: int) -> dict:
    """models: name -> (TappedModel, onnx path). Latency (ms, batch 1) and throughput (images/s,
    batch 32) per runtime and thread count."""
    result = {m: {key: {"pytorch": {}, "onnxruntime": {}} for key in (LATENCY, THROUGHPUT)} for m in models}
    saved_threads = torch.get_num_threads()
    try:
        for n in threads:
            torch.set_num_threads(n)
            sessions = {m: ort_session(path, n) for m, (_, path) in models.items()}
            for batch, reps, key in ((1, repeats, LATENCY),
                                     (THROUGHPUT_BATCH, throughput_repeats, THROUGHPUT)):
                x = torch.rand(batch, 1, image_size, image_size)
                xn = x.numpy()

                def torch_fn(t):
                    def run():
                        with torch.inference_mode():
                            t.forward_logits(x)
                    return run

                def ort_fn(s):
                    return lambda: s.run(["logits"], {"image": xn})

                for runtime, fns in (("pytorch", {m: torch_fn(t) for m, (t, _) in models.items()}),
                                     ("onnxruntime", {m: ort_fn(s) for m, s in sessions.items()})):
                    for m, sec in median_times(fns, reps).items():
                        result[m][key][runtime][str(n)] = 1000 * sec if batch == 1 else batch / sec
    finally:
        torch.set_num_threads(saved_threads)
    return result


def host_info() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import onnxruntime
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


# --------------------------------------------------------------------------------------- report
def _ratio(a, b):
    return None if not a or not b else a / b


def savings(student: dict, teacher: dict) -> dict:
    """Teacher / student for sizes and times (so > 1 means the student saves), student / teacher
    for throughput (> 1 means the student processes more images per second)."""
    tput = THROUGHPUT
    out = {"params_ratio": _ratio(teacher["params"], student["params"]),
           "macs_ratio": _ratio(teacher["macs"], student["macs"]),
           "onnx_size_ratio": _ratio(teacher["onnx_bytes"], student["onnx_bytes"]),
           "latency_speedup_batch1": {}, f"throughput_ratio_batch{THROUGHPUT_BATCH}": {}}
    for rt, per in student[LATENCY].items():
        out["latency_speedup_batch1"][rt] = {n: _ratio(teacher[LATENCY][rt][n], v)
                                             for n, v in per.items()}
        out[f"throughput_ratio_batch{THROUGHPUT_BATCH}"][rt] = {n: _ratio(v, teacher[tput][rt][n])
                                                               for n, v in student[tput][rt].items()}
    return out


def markdown(report: dict) -> str:
    models = report["models"]
    names = list(models)
    tput = THROUGHPUT
    s = report["image_size"]
    head = ["", *(f"{m} ({models[m]['arch']})" for m in names)]
    if "savings" in report:
        head.append("teacher / student")
    rows = []

    def row(label, values, ratio=None, fmt="{:.3f}"):
        cells = ["-" if v is None else fmt.format(v) for v in values]
        if "savings" in report:
            cells.append("-" if ratio is None else f"{ratio:.1f}x")
        rows.append([label, *cells])

    sv = report.get("savings", {})
    row("parameters (M)", [models[m]["params"] / 1e6 for m in names], sv.get("params_ratio"))
    row(f"MACs at {s}x{s} (G)", [models[m]["macs"] / 1e9 for m in names], sv.get("macs_ratio"), "{:.4f}")
    row("ONNX file (MB)", [models[m]["onnx_bytes"] / 1e6 for m in names], sv.get("onnx_size_ratio"), "{:.2f}")
    for rt, label in (("pytorch", "PyTorch"), ("onnxruntime", "ONNX Runtime")):
        for n in report["threads"]:
            row(f"{label} latency, batch 1, {n} thread{'s' * (n > 1)} (ms)",
                [models[m][LATENCY][rt][str(n)] for m in names],
                sv.get("latency_speedup_batch1", {}).get(rt, {}).get(str(n)), "{:.2f}")
    for rt, label in (("pytorch", "PyTorch"), ("onnxruntime", "ONNX Runtime")):
        for n in report["threads"]:
            row(f"{label} throughput, batch {THROUGHPUT_BATCH}, {n} thread{'s' * (n > 1)} (images/s)",
                [models[m][tput][rt][str(n)] for m in names],
                sv.get(f"throughput_ratio_batch{THROUGHPUT_BATCH}", {}).get(rt, {}).get(str(n)), "{:.1f}")
    row("ONNX vs PyTorch max abs logit diff", [models[m]["check"]["max_abs_diff"] for m in names],
        None, "{:.1e}")
    if "savings" in report:
        rows[-1][-1] = f"tolerance {report['tolerance']:.0e}"
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    h = report["host"]
    lines += ["", f"Input (batch, 1, {s}, {s}) float32 in [0, 1]. Medians of {report['repeats']} runs "
                  f"(batch 1) and {report['throughput_repeats']} runs (batch {THROUGHPUT_BATCH}); "
                  f"torch.set_num_threads = ORT intra_op_num_threads = the thread count; models timed "
                  f"alternately. Ratio column: teacher/student for size, MACs and latency, "
                  f"student/teacher for throughput.",
              f"Host: {h['cpu']}, {h['logical_cpus']} logical CPUs; torch {h['torch']}, "
              f"onnxruntime {h['onnxruntime']}."]
    return "\n".join(lines)


# ------------------------------------------------------------------ training data and evaluation
def _manifest_dir(text: str) -> Path | None:
    """A config's data.shards as meant: from the working directory, else from the repository."""
    for path in (Path(text), REPO / text):
        if (path / MANIFEST).is_file():
            return path
    return None


def training_shards(loaded: LoadedModel, shards_arg: str | None) -> tuple[Path | None, dict | None]:
    """The shards the model was trained on and their manifest: the run config's data.shards when
    its manifest.json is there, else --shards; (None, None) when neither is known."""
    configured = loaded.config.data.shards if loaded.config else None
    path = _manifest_dir(configured) if configured else None
    if path is None and shards_arg:
        path = Path(shards_arg)
    if path is None:
        return None, None
    manifest = read_manifest(path)
    if list(manifest["label_names"]) != list(loaded.meta["label_names"]):
        raise CheckpointError(f"{path / MANIFEST}: label names {manifest['label_names']} differ from the "
                              f"model's {loaded.meta['label_names']}")
    if shards_arg and Path(shards_arg).resolve() != path.resolve():
        print(f"note: the preprocessing record and the model card use the run's training shards {path}, "
              f"not --shards {shards_arg}", file=sys.stderr)
    return path, manifest


def training_record(shards: Path, manifest: dict) -> dict:
    """The `training_data` metadata: which shards, which dataset, synthetic or not, split sizes."""
    return {"shards": str(shards.resolve()), "dataset": manifest.get("dataset"),
            "synthetic": bool(manifest.get("synthetic")),
            "samples": {s: v.get("samples") for s, v in manifest["splits"].items()}}


def _evaluation_of(path: Path, loaded: LoadedModel, split: str | None) -> tuple[dict | None, str]:
    """(evaluate.py's metrics.json, "") when it scored these weights on `split` (None: whichever
    single split it holds), else (None, why not)."""
    try:
        doc = read_metrics(path)
    except ValueError as e:
        return None, str(e)
    if doc.get("written_by") != "launcher/evaluate.py" or len(doc["splits"]) != 1:
        return None, f"{path}: not a metrics.json of launcher/evaluate.py"
    (held,) = doc["splits"]
    if split is not None and held != split or model_result(doc, "student", held) is None:
        return None, f"{path}: no student result on split {split!r} (holds {held!r})"
    beside = path.parent / THRESHOLDS
    try:
        fingerprint = json.loads(beside.read_text()).get("fingerprint")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None, f"{path}: no readable {beside.name} beside it to tie it to the weights"
    if fingerprint != loaded.fingerprint:
        return None, (f"{path}: scored other weights (fingerprint {fingerprint} in {beside}, model "
                      f"{loaded.fingerprint})")
    return doc, ""


def find_evaluation(loaded: LoadedModel, metrics_arg: str | None, split: str) -> tuple[dict | None, str]:
    """The evaluation of these weights on `split` for the model card (see the module docstring),
    and where it was looked for: {"kind": "evaluate" | "run", "path", "doc" (a metrics.json,
    launcher/metrics_doc.py), "split"}. An explicit --metrics that is not one is a CheckpointError."""
    if metrics_arg:
        path = Path(metrics_arg)
        doc, why = _evaluation_of(path, loaded, None)
        if doc is None:
            raise CheckpointError(f"--metrics {why}")
        return {"kind": "evaluate", "path": str(path), "doc": doc, "split": next(iter(doc["splits"]))}, str(path)
    base = loaded.run_dir or loaded.model_dir
    candidates = [p for p in [base / "eval" / "metrics.json", *sorted(base.glob("eval/*/metrics.json"))]
                  if p.is_file()]
    found = [(p, doc) for p in candidates for doc in [_evaluation_of(p, loaded, split)[0]] if doc is not None]
    looked = f"{base / 'eval' / 'metrics.json'} and {base / 'eval' / '*' / 'metrics.json'}"
    if found:
        path, doc = max(found, key=lambda f: f[0].stat().st_mtime)
        return {"kind": "evaluate", "path": str(path), "doc": doc, "split": split}, looked
    if loaded.run_dir is not None:
        looked += f", and {loaded.run_dir / 'metrics.json'} for {loaded.run_dir / 'final' / 'model.pt'}"
        final, run_metrics = loaded.run_dir / "final" / "model.pt", loaded.run_dir / "metrics.json"
        if final.is_file() and Path(loaded.source).resolve() == final.resolve() and run_metrics.is_file():
            try:
                doc = read_metrics(run_metrics)
            except ValueError as e:
                print(f"note: {e}", file=sys.stderr)
                doc = None
            if doc is not None and model_result(doc, "student", split) is not None:
                return {"kind": "run", "path": str(run_metrics), "doc": doc, "split": split}, looked
    return None, looked


# ------------------------------------------------------------------------------------ metadata
def model_metadata(role: str, arch: str, meta: dict, image_size: int, thresholds: dict | None,
                   source: str, preprocess: dict | None = None, training: dict | None = None) -> dict:
    multilabel = bool(meta["multilabel"])
    return {
        "role": role, "arch": arch, "source_checkpoint": source,
        "label_names": list(meta["label_names"]), "multilabel": multilabel,
        "input": {"name": "image", "shape": ["batch", 1, image_size, image_size], "dtype": "float32",
                  "range": [0.0, 1.0], "channels": "grayscale (normalisation is inside the graph)"},
        "output": {"name": "logits", "shape": ["batch", len(meta["label_names"])]},
        "postprocess": "sigmoid per class; finding present when probability >= its threshold"
        if multilabel else "softmax; predicted class = argmax (thresholds: one class against the rest)",
        "thresholds": thresholds["thresholds"] if thresholds else None,
        "thresholds_chosen_on": thresholds["chosen_on"] if thresholds else None,
        "thresholds_method": thresholds["method"] if thresholds else None,
        "trained_image_size": meta.get("image_size"),
        "preprocess": preprocess, "training_data": training,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run directory, model.pt, or DeepSpeed checkpoint")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--image-size", type=int, default=None, help="input side S (default: the training size)")
    p.add_argument("--shards", default=None, help="shards for the real-image check (and the label names "
                                                  "of a DeepSpeed checkpoint)")
    p.add_argument("--split", default="test", help="split the real-image check reads (default test)")
    p.add_argument("--real-samples", type=int, default=64, help="images in the real-image check")
    p.add_argument("--teacher", default=None,
                   help="teacher checkpoint (default: the run config's, if the file exists)")
    p.add_argument("--teacher-name", default=None, help="timm name of --teacher's architecture")
    p.add_argument("--no-teacher", action="store_true", help="export and time the student only")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts to time (default 1,2)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs at batch 1 (median reported)")
    p.add_argument("--throughput-repeats", type=int, default=5,
                   help=f"timed runs at batch {THROUGHPUT_BATCH} (median reported)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max abs logit difference ONNX vs PyTorch")
    p.add_argument("--metrics", default=None,
                   help="launcher/evaluate.py metrics.json for the model card (default: the run's eval/)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--int8", action="store_true",
                   help=f"also write {INT8_FILE}: ONNX Runtime static INT8 quantization calibrated on the "
                        f"validation split, kept only when its test mean AUROC is within --int8-tolerance")
    p.add_argument("--int8-tolerance", type=float, default=None,
                   help=f"largest accepted drop of the test mean AUROC, fp32 - int8 "
                        f"(default {INT8_TOLERANCE})")
    p.add_argument("--int8-calibration", type=int, default=None,
                   help=f"validation images to calibrate on (default {INT8_CALIBRATION}; all when fewer)")
    add_debug_flag(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        threads = [int(t) for t in args.threads.split(",") if t.strip()]
        if not threads or min(threads) < 1:
            raise ValueError(f"--threads wants positive integers like 1,2, got {args.threads!r}")
        manifest = read_manifest(args.shards) if args.shards else None
        loaded: LoadedModel = load_model(args.checkpoint, manifest)
        thresholds = read_thresholds(loaded)
        shards, train_manifest = training_shards(loaded, args.shards)
        test_split = loaded.config.data.test_split if loaded.config else "test"
        evaluation, looked_for = find_evaluation(loaded, args.metrics, test_split)
        int8_data = int8_inputs(args, loaded, manifest, shards, train_manifest)
        spec = None if args.no_teacher else resolve_teacher(loaded, args.teacher, args.teacher_name)
        teacher = load_teacher(spec, loaded.meta["num_classes"]) if spec else None
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = loaded.meta
    size = args.image_size or int(meta["image_size"])
    if size != meta["image_size"]:
        print(f"note: exporting at {size}x{size}; the model was trained at {meta['image_size']}",
              file=sys.stderr)
    if thresholds is None:
        print(f"warning: no {loaded.model_dir / 'thresholds.json'}: exported without thresholds "
              f"(run launcher/evaluate.py first)", file=sys.stderr)
    else:
        missing = [k for k, v in thresholds["thresholds"].items() if v is None]
        if missing:
            on = (thresholds.get("chosen_on") or {}).get("split", "validation")
            print(f"warning: no threshold could be chosen for {', '.join(missing)}: the '{on}' split had no "
                  f"positive or no negative of them; the export records null and launcher/predict.py "
                  f"decides them at {DEFAULT_THRESHOLD}", file=sys.stderr)
    if train_manifest is None:
        print("warning: no training shard manifest (neither the run config's data.shards nor --shards): "
              "the export does not record how images were prepared, and launcher/predict.py will "
              "refuse it", file=sys.stderr)
    prep = preprocessing(train_manifest, shards, size, meta.get("image_size")) if train_manifest else None
    training = training_record(shards, train_manifest) if train_manifest else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    real = real_images(args.shards, args.split, size, args.real_samples) if args.shards else None

    entries = {"student": (loaded.model, meta["arch"], thresholds, loaded.source)}
    if teacher is not None:
        entries["teacher"] = (teacher.eval(), spec.name, None, str(spec.checkpoint))
    models, timed, infos = {}, {}, {}
    for role, (tapped, arch, thr, source) in entries.items():
        path = out / f"{role}.onnx"
        info = model_metadata(role, arch, meta, size, thr, source, prep, training)
        export_onnx(tapped, path, size, info, args.opset)
        info["check"] = check(tapped, path, size, args.tolerance, real)
        info.update(onnx_file=path.name, onnx_bytes=path.stat().st_size, onnx_sha256=sha256(path))
        (out / f"{role}.json").write_text(json.dumps(info, indent=1))
        infos[role] = info
        net = tapped.model
        models[role] = {"arch": arch, "params": sum(p.numel() for p in net.parameters()),
                        "macs": count_macs(net, size, tapped.in_chans), "onnx_file": path.name,
                        "onnx_bytes": info["onnx_bytes"], "check": info["check"]}
        timed[role] = (tapped, path)
        print(f"{role}: {path} ({info['onnx_bytes'] / 1e6:.2f} MB), ONNX vs PyTorch max |diff| "
              f"{info['check']['max_abs_diff']:.2e} ({'ok' if info['check']['passed'] else 'FAILED'}, "
              f"tolerance {args.tolerance:g})", flush=True)

    for role, times in benchmark(timed, size, threads, args.repeats, args.throughput_repeats).items():
        models[role].update(times)
    if int8_data is None and (out / INT8_FILE).exists():  # it was made from other weights
        (out / INT8_FILE).unlink()
        print(f"note: removed {out / INT8_FILE} of an earlier export (no --int8 this time)", file=sys.stderr)
    int8 = int8_export(out, out / "student.onnx", int8_data, size, meta, args, threads) if int8_data else None
    report = {"image_size": size, "input": f"(batch, 1, {size}, {size}) float32 in [0, 1]",
              "threads": threads, "repeats": args.repeats, "throughput_repeats": args.throughput_repeats,
              "statistic": "median", "tolerance": args.tolerance, "host": host_info(), "models": models,
              "thresholds": "included" if thresholds else "missing (run launcher/evaluate.py first)"}
    if "teacher" in models:
        report["savings"] = savings(models["student"], models["teacher"])
    if int8 is not None:
        report["int8"] = int8
    (out / "deploy_report.json").write_text(json.dumps(report, indent=1))
    table = markdown(report)
    if int8 is not None:
        table += f"\n\n## INT8 against fp32\n\n{int8_markdown(int8, threads)}"
    (out / "deploy_report.md").write_text(f"# Deployment report: {meta['arch']}\n\n{table}\n")
    print(table)
    card = model_card(infos["student"], train_manifest, str(shards) if shards else None, evaluation,
                      models["student"]["params"], looked_for, int8 if int8 and int8["passed"] else None)
    (out / "MODEL_CARD.md").write_text(card)
    print(f"model card: {out / 'MODEL_CARD.md'}"
          + ("" if evaluation else " (no evaluation of these weights found: no test figures)"))
    if int8 is not None and int8["passed"]:
        print(f"int8: {out / INT8_FILE} ({int8['bytes'] / 1e6:.2f} MB), mean AUROC drop "
              f"{int8['evaluation']['mean_auroc_drop']:+.4f} (tolerance {int8['tolerance']:g})")
    ok = all(m["check"]["passed"] for m in models.values())
    if not ok:
        print(f"error: ONNX output differs from PyTorch by more than {args.tolerance:g}", file=sys.stderr)
    if int8 is not None and not int8["passed"]:
        print(f"error: {int8_refusal(int8)}", file=sys.stderr)
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run_cli(main))
