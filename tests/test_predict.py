"""launcher/predict.py: raw images give what the model sees through the shards; failures and usage
errors; no torch on a terminal; the model card of launcher/export.py.

The images are made here, one of each kind predict.py must read (8-bit PNG, RGB JPEG, 16-bit PNG,
RGBA PNG, CMYK JPEG, a JPEG with an EXIF rotation, DICOM MONOCHROME1 and MONOCHROME2, a DICOM
series without suffixes), at sizes that make the shard builder fit them. The reference for every
probability is the training path itself: the same files through `data_pipeline.build_shards`
(CSV dataset), read back by the evaluation loader and run through the same ONNX file.
The model is a random rmsnet_xxs saved as the launcher saves students, exported by export.py.
"""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from data_pipeline import build_shards
from data_pipeline.adapters import sample_key
from data_pipeline.image_io import load_gray8
from data_pipeline.loader import build_loader
from data_pipeline.shard_format import ID_EXT, META_EXT, decode_sid, read_shard
from launcher import evaluate, export, predict
from launcher.metrics_doc import model_result, read_metrics
from launcher.model_loading import load_model
from rmsnet.teachers import create_tapped_model
from test_dicom import write_dicom

REPO = Path(__file__).resolve().parents[1]
LABELS = ["A", "B", "C"]
SHARD_PX = 48
TOLERANCE = 1e-4
HEAD_GAIN = 30.0
EXPORT_FAST = ["--no-teacher", "--threads", "1", "--repeats", "1", "--throughput-repeats", "1",
               "--real-samples", "4"]


# ------------------------------------------------------------------------------------ the data
def _pattern(rng: np.random.Generator, h: int, w: int, peak: float = 255.0) -> np.ndarray:
    """Smooth structure plus noise in [0, peak]: enough texture for the model's outputs to differ."""
    yy, xx = np.mgrid[0:h, 0:w]
    wave = np.sin(xx / rng.uniform(3, 8) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(3, 8))
    x = 0.5 + 0.35 * wave + rng.normal(0, 0.1, (h, w))
    return np.clip(x, 0, 1) * peak


def _dicom(path: Path, stored: np.ndarray, patient: str, **kw) -> Path:
    import pydicom
    write_dicom(path, stored.astype(np.uint16), **kw)
    ds = pydicom.dcmread(str(path))
    ds.PatientID = patient
    ds.save_as(str(path))
    return path


def make_inputs(root: Path) -> list[str]:
    """One image of every kind, paths relative to `root` (in the order written)."""
    rng = np.random.default_rng(7)
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_pattern(rng, 44, 60).astype(np.uint8), "L").save(root / "gray8.png")
    rgb = np.stack([_pattern(rng, 64, 50) for _ in range(3)], -1).astype(np.uint8)
    Image.fromarray(rgb, "RGB").save(root / "rgb.jpg", quality=90)
    Image.fromarray(_pattern(rng, 40, 52, 65535).astype(np.uint16)).save(root / "gray16.png")
    rgba = np.stack([_pattern(rng, 56, 40) for _ in range(4)], -1).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    cmyk = np.stack([_pattern(rng, 36, 48) for _ in range(4)], -1).astype(np.uint8)
    Image.fromarray(cmyk, "CMYK").save(root / "cmyk.jpg", quality=92)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    rot = np.stack([_pattern(rng, 30, 62) for _ in range(3)], -1).astype(np.uint8)
    Image.fromarray(rot, "RGB").save(root / "rotated.jpg", quality=90, exif=exif)
    _dicom(root / "dicom" / "mono1.dcm", _pattern(rng, 50, 64, 3000), "P-001", photometric="MONOCHROME1",
           slope=2, intercept=-1024, center=1500, width=3000)
    _dicom(root / "dicom" / "mono2.dcm", _pattern(rng, 56, 56, 4000), "P-002")  # no window: min-max
    for i in (1, 2):
        _dicom(root / "dicom" / "series" / f"IM{i:04d}", _pattern(rng, 48, 40, 2000), "P-003",
               center=1000, width=1600)
    return ["gray8.png", "rgb.jpg", "gray16.png", "rgba.png", "cmyk.jpg", "rotated.jpg", "dicom/mono1.dcm",
            "dicom/mono2.dcm", "dicom/series/IM0001", "dicom/series/IM0002"]


def build_csv_shards(root: Path, files: list[str], out: Path, *extra: str) -> Path:
    """The files as a CSV dataset through the real shard builder (every split non-empty)."""
    rng = np.random.default_rng(1)
    splits = ["train", "train", "train", "train", "val", "val", "val", "test", "test", "test"]
    rows = [f"{f},{','.join(str(int(v)) for v in rng.random(3) < 0.5)},{splits[i % len(splits)]}"
            for i, f in enumerate(files)]
    (root / "table.csv").write_text("path,A,B,C,split\n" + "\n".join(rows) + "\n")
    build_shards.main(["--dataset", "csv", "--root", str(root), "--out", str(out), "--csv", "table.csv",
                       "--label-columns", ",".join(LABELS), "--split-column", "split",
                       "--size", str(SHARD_PX), "--shard-size", "4", "--workers", "1", "--quiet", *extra])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rejected"] == [] and manifest["summary"]["accepted"] == len(files)
    return out


def save_student(d: Path, labels: list[str], image_size: int, seed: int = 0) -> Path:
    """A random rmsnet_xxs in the launcher's model.pt format; its classifier is scaled up so that
    the probabilities spread over most of (0, 1) rather than sitting at 0.5 (a stricter check)."""
    torch.manual_seed(seed)
    student = create_tapped_model("rmsnet_xxs", len(labels))
    with torch.no_grad():
        student.model.head.fc.weight.mul_(HEAD_GAIN)
    meta = {"arch": "rmsnet_xxs", "num_classes": len(labels), "in_chans": 1,
            "feature_indices": student.feature_indices, "image_size": image_size, "label_names": labels,
            "multilabel": True, "step": 1, "mode": "distill"}
    d.mkdir(parents=True, exist_ok=True)
    torch.save({"model": student.model.state_dict(), "adapters": {}, "meta": meta}, d / "model.pt")
    return d / "model.pt"


def run_export(checkpoint: Path, out: Path, shards: Path | None, *extra: str) -> Path:
    args = ["--checkpoint", str(checkpoint), "--out", str(out), *EXPORT_FAST, *extra]
    assert export.main(args + (["--shards", str(shards)] if shards else [])) == 0
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict_inputs")
    return root, make_inputs(root)


@pytest.fixture(scope="module")
def png_shards(inputs, tmp_path_factory):
    root, files = inputs
    return build_csv_shards(root, files, tmp_path_factory.mktemp("predict_png_shards"))


@pytest.fixture(scope="module")
def png_export(png_shards, tmp_path_factory):
    """Trained (here: saved) at the shards' size, exported without thresholds."""
    d = tmp_path_factory.mktemp("predict_png_model")
    return run_export(save_student(d, LABELS, SHARD_PX), d / "export", png_shards)


# ---------------------------------------------------------------------------- the reference path
def sid_keys(shards: Path, split: str) -> dict[int, str]:
    manifest = json.loads((shards / "manifest.json").read_text())
    out = {}
    for shard in manifest["splits"][split]["shards"]:
        for _, members in read_shard(shards / shard["name"]):
            out[decode_sid(members[ID_EXT])] = json.loads(members[META_EXT])["key"]
    return out


def through_shards(shards: Path, onnx_path: Path, image_size: int) -> tuple[dict, dict]:
    """key -> (sigmoid probabilities, model input) of every sample, as the evaluation loader gives
    them to the exported model."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    manifest = json.loads((shards / "manifest.json").read_text())
    probs, pixels = {}, {}
    for split, entry in manifest["splits"].items():
        if not entry["samples"]:
            continue
        keys = sid_keys(shards, split)
        for batch in build_loader(shards, split, backend="torch", batch_size=4, image_size=image_size,
                                  train=False):
            x = batch["image"].numpy()
            logits = session.run(None, {"image": x})[0]
            for sid, p, img in zip(batch["sid"].tolist(), 1 / (1 + np.exp(-logits.astype(np.float64))), x):
                probs[keys[sid]], pixels[keys[sid]] = p, img[0]
    return probs, pixels


def predicted(export_dir: Path, paths: list, tmp: Path, *extra: str) -> tuple[int, dict]:
    out = tmp / "results.json"
    rc = predict.main(["--model", str(export_dir), *map(str, paths), "--out", str(out), *extra])
    return rc, json.loads(out.read_text())


def _by_key(doc: dict) -> dict:
    return {sample_key(Path(r["path"]).stem): r for r in doc["results"]}


# ---------------------------------------------------------------------------------------- tests
def test_every_kind_of_input_gives_the_probabilities_of_the_shard_path(inputs, png_shards, png_export,
                                                                        tmp_path):
    root, files = inputs
    rc, doc = predicted(png_export, [root], tmp_path, "--batch-size", "3")  # the folder, recursively
    assert rc == 0 and doc["summary"] == {"inputs": len(files), "predicted": len(files), "failed": 0}
    assert sorted(Path(r["path"]).relative_to(root).as_posix() for r in doc["results"]) == sorted(files)
    reference, _ = through_shards(png_shards, png_export / "student.onnx", SHARD_PX)
    got = _by_key(doc)
    assert set(got) == set(reference) == {sample_key(Path(f).stem) for f in files}
    for key, ref in reference.items():
        p = np.array([got[key]["probabilities"][n] for n in LABELS])
        assert np.abs(p - ref).max() <= TOLERANCE, (key, p, ref)
    # The check means something only if the images lead to different outputs:
    spread = np.ptp(np.stack(list(reference.values())), axis=0).max()
    assert spread > 100 * TOLERANCE, spread


def test_jpeg_shards_and_a_model_trained_at_another_size_are_followed_too(inputs, tmp_path_factory,
                                                                          tmp_path):
    """JPEG shards (the compression is part of what training saw) and a model trained at 40 px on
    48 px shards (the loader's resize): the model inputs equal the loader's exactly."""
    root, files = inputs
    shards = build_csv_shards(root, files, tmp_path_factory.mktemp("predict_jpeg_shards"),
                              "--format", "jpeg", "--jpeg-quality", "80")
    d = tmp_path_factory.mktemp("predict_jpeg_model")
    exported = run_export(save_student(d, LABELS, 40), d / "export", shards)
    prep = json.loads((exported / "student.json").read_text())["preprocess"]
    assert (prep["shard_size"], prep["format"], prep["jpeg_quality"]) == (48, "jpeg", 80)
    assert prep["image_size"] == 40 and "48 -> 40" in prep["resize"]
    reference, ref_pixels = through_shards(shards, exported / "student.onnx", 40)
    rc, doc = predicted(exported, [root / f for f in files], tmp_path)
    assert rc == 0
    got = _by_key(doc)
    model = predict.load_exported(exported)
    for f in files:
        key = sample_key(Path(f).stem)
        mine = predict.model_input(root / f, model.preprocess, None)
        np.testing.assert_array_equal(mine, ref_pixels[key], err_msg=f)  # the loader's input, bit for bit
        p = np.array([got[key]["probabilities"][n] for n in LABELS])
        assert np.abs(p - reference[key]).max() <= TOLERANCE, (key, p, reference[key])


@pytest.mark.parametrize("src,dst", [(256, 224), (48, 40), (1024, 224), (100, 99), (30, 224), (48, 64)])
def test_the_numpy_resize_equals_the_torch_loaders_resize_bit_for_bit(src, dst):
    from torchvision.transforms import v2 as T
    pixels = np.random.default_rng(src * dst).integers(0, 256, (src, src), dtype=np.uint8)
    expected = T.Resize((dst, dst))(torch.from_numpy(pixels).unsqueeze(0))[0].numpy()
    np.testing.assert_array_equal(predict.resize_like_loader(pixels, dst), expected)
    np.testing.assert_array_equal(predict.resize_like_loader(pixels, src), pixels)


def test_exif_orientation_is_applied_by_the_shared_decoder(inputs):
    root, _ = inputs
    stored = Image.open(root / "rotated.jpg")
    assert stored.size == (62, 30)
    upright = load_gray8(root / "rotated.jpg")
    assert upright.size == (30, 62)  # turned as the tag says, for shards and predict.py alike
    expected = np.asarray(stored.convert("L").transpose(Image.Transpose.ROTATE_270))
    np.testing.assert_array_equal(np.asarray(upright), expected)


def test_rows_carry_dicom_identifiers_fingerprint_and_the_default_thresholds(inputs, png_export, tmp_path):
    root, _ = inputs
    rc, doc = predicted(png_export, [root / "dicom"], tmp_path)
    assert rc == 0
    onnx_sha = hashlib.sha256((png_export / "student.onnx").read_bytes()).hexdigest()
    assert doc["model"]["sha256"] == onnx_sha and all(r["model_sha256"] == onnx_sha for r in doc["results"])
    rows = {Path(r["path"]).name: r for r in doc["results"]}
    assert sorted(rows) == ["IM0001", "IM0002", "mono1.dcm", "mono2.dcm"]
    import pydicom
    for name, r in rows.items():
        ds = pydicom.dcmread(str(r["path"]))
        assert r["sop_instance_uid"] == ds.SOPInstanceUID and r["patient_id"] == ds.PatientID != ""
    assert doc["model"]["thresholds"] == {n: 0.5 for n in LABELS}
    assert "none stored" in doc["model"]["thresholds_source"] and "0.5" in doc["model"]["thresholds_source"]
    for r in rows.values():
        assert r["positive"] == {n: r["probabilities"][n] >= 0.5 for n in LABELS}


def test_a_corrupt_file_in_a_folder_is_reported_and_the_rest_predicted(inputs, png_export, tmp_path):
    root, files = inputs
    folder = tmp_path / "in"
    shutil.copytree(root, folder, ignore=shutil.ignore_patterns("table.csv"))
    good = (folder / "gray8.png").read_bytes()
    (folder / "broken.png").write_bytes(good[:len(good) // 3])  # truncated
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image\n")  # passed over, not an input
    out = tmp_path / "results.csv"
    proc = subprocess.run([sys.executable, str(REPO / "launcher" / "predict.py"), "--model", str(png_export),
                           str(folder), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    with open(out, newline="") as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert len(rows) == len(files) + 2 and "notes.txt" not in rows
    for name, why in (("broken.png", "cannot decode image"), ("empty.jpg", "zero-byte file")):
        r = rows[name]
        assert r["status"] == "error" and why in r["error"] and name in r["error"], r
        assert all(r[f"prob:{n}"] == "" for n in LABELS)
        assert name in proc.stderr
    ok = [r for n, r in rows.items() if n not in ("broken.png", "empty.jpg")]
    assert all(r["status"] == "ok" and 0 <= float(r["prob:A"]) <= 1 for r in ok)
    n = len(files) + 2
    assert "1 files in the folders" in proc.stderr and f"{n}/{n} images, 2 failed" in proc.stderr
    assert not list(tmp_path.glob("*.part"))  # written atomically


def test_usage_errors_exit_2_naming_the_problem(inputs, png_export, tmp_path, capsys):
    import onnx
    root, _ = inputs
    image = str(root / "gray8.png")
    (tmp_path / "junk.onnx").write_text("not a model")
    bare = onnx.load(str(png_export / "student.onnx"))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    for argv, needle in (([str(tmp_path / "missing"), image], "no such file"),
                         ([str(tmp_path / "junk.onnx"), image], "cannot load"),
                         ([str(tmp_path / "bare.onnx"), image], "label_names"),
                         ([str(png_export)], "no INPUT"),
                         ([str(png_export), str(tmp_path / "empty_dir")], "no images found")):
        (tmp_path / "empty_dir").mkdir(exist_ok=True)
        assert predict.main(["--model", *argv[:1], *argv[1:]]) == 2, argv
        assert needle in capsys.readouterr().err, needle
    assert predict.main(["--model", str(png_export), image, "--out", str(tmp_path / "r.txt")]) == 2
    assert ".csv or .json" in capsys.readouterr().err
    no_prep = onnx.load(str(png_export / "student.onnx"))
    keep = [p for p in no_prep.metadata_props if p.key != "preprocess"]
    del no_prep.metadata_props[:]
    no_prep.metadata_props.extend(keep)
    onnx.save(no_prep, str(tmp_path / "old.onnx"))
    assert predict.main(["--model", str(tmp_path / "old.onnx"), image]) == 2
    assert "export again with --shards" in capsys.readouterr().err


def test_predict_imports_neither_torch_nor_the_training_stack(inputs, png_export, tmp_path):
    root, files = inputs
    out = tmp_path / "r.csv"
    code = ("import json, runpy, sys\n"
            f"sys.argv = ['predict.py', '--model', {str(png_export)!r}, {str(root)!r},\n"
            f"            '--out', {str(out)!r}]\n"
            "try:\n"
            f"    runpy.run_path({str(REPO / 'launcher' / 'predict.py')!r}, run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    rc = e.code\n"
            "heavy = ('torch', 'torchvision', 'deepspeed', 'nvidia.dali', 'timm')\n"
            "loaded = sorted(m for m in sys.modules if any(m == h or m.startswith(h + '.') for h in heavy))\n"
            "print(json.dumps({'rc': rc, 'heavy': loaded, 'ort': 'onnxruntime' in sys.modules,\n"
            "                  'pydicom': 'pydicom' in sys.modules}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"rc": 0, "heavy": [], "ort": True, "pydicom": True}  # it ran, DICOM included
    assert len(list(csv.DictReader(out.open()))) == len(files)


# --------------------------------------------------------------------------------- model card
@pytest.fixture(scope="module")
def evaluated_export(cxr_shards, tmp_path_factory):
    """A student evaluated by evaluate.py on the synthetic chest X-ray shards, then exported."""
    names = json.loads((cxr_shards / "manifest.json").read_text())["label_names"]
    d = tmp_path_factory.mktemp("predict_card_model")
    checkpoint = save_student(d, names, SHARD_PX)
    assert evaluate.main(["--checkpoint", str(checkpoint), "--shards", str(cxr_shards), "--no-teacher",
                          "--bootstrap", "50", "--loader", "torch"]) == 0
    return d, run_export(checkpoint, d / "export", cxr_shards)


@pytest.mark.slow
def test_model_card_states_data_labels_thresholds_test_auroc_use_and_fingerprint(evaluated_export,
                                                                               cxr_shards):
    d, exported = evaluated_export
    card = (exported / "MODEL_CARD.md").read_text()
    manifest = json.loads((cxr_shards / "manifest.json").read_text())
    thresholds = json.loads((d / "thresholds.json").read_text())
    metrics = model_result(read_metrics(d / "eval" / "test" / "metrics.json"), "student", "test")
    assert hashlib.sha256((exported / "student.onnx").read_bytes()).hexdigest() in card
    assert f"`{cxr_shards}`" in card and "dataset `chestxray14`" in card
    for split, entry in manifest["splits"].items():
        assert f"| {split} | {entry['samples']} | {entry['patients']} |" in card
    chosen = {n: t for n, t in thresholds["thresholds"].items() if t is not None}
    assert 0 < len(chosen) < len(manifest["label_names"])  # the tiny val split lacks some classes
    for n in manifest["label_names"]:
        if n in chosen:
            assert f"| {n} | {chosen[n]:.4f} |" in card
        else:
            assert f"| {n} | none (no positives or no negatives in 'val'): 0.5 used |" in card
        auroc, ci = metrics["auroc"][n], metrics["auroc_ci95"][n]
        if auroc is not None:
            assert f"| {n} | {auroc:.3f} | {ci[0]:.3f}-{ci[1]:.3f} |" in card
    lo, hi = metrics["mean_auroc_ci95"]
    assert f"**{metrics['mean_auroc']:.3f}** | {lo:.3f}-{hi:.3f}" in card
    assert f"'val' split ({thresholds['chosen_on']['samples']} images)" in card
    assert "Youden" in card and str(d / "eval" / "test" / "metrics.json") in card
    assert manifest["synthetic"]["generator"] == "data_pipeline.synthetic"  # SYNTHETIC.json, recorded
    assert "synthetic stand-in images" in card and "for testing the system only" in card
    assert "Not for clinical use" in card
    assert "Fitted to 48x48 with fit `pad`" in card and "(batch, 1, 48, 48)" in card


@pytest.mark.slow
def test_an_explicit_metrics_file_of_other_weights_is_refused(evaluated_export, cxr_shards, tmp_path,
                                                              capsys):
    d, _ = evaluated_export
    shutil.copytree(d / "eval" / "test", tmp_path / "eval", ignore=shutil.ignore_patterns("tb"))
    doc = json.loads((tmp_path / "eval" / "thresholds.json").read_text())
    (tmp_path / "eval" / "thresholds.json").write_text(json.dumps({**doc, "fingerprint": "0" * 16}))
    rc = export.main(["--checkpoint", str(d / "model.pt"), "--out", str(tmp_path / "out"), "--shards",
                      str(cxr_shards), "--metrics", str(tmp_path / "eval" / "metrics.json"), *EXPORT_FAST])
    assert rc == 2 and "scored other weights" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_predict_uses_the_evaluated_thresholds_and_says_where_they_came_from(evaluated_export, cxr_root,
                                                                            tmp_path):
    d, exported = evaluated_export
    thresholds = json.loads((d / "thresholds.json").read_text())
    images = sorted((cxr_root / "images").iterdir())[:5]
    rc, doc = predicted(exported, images, tmp_path)
    used = {n: 0.5 if t is None else t for n, t in thresholds["thresholds"].items()}
    assert rc == 0 and doc["model"]["thresholds"] == used
    source = doc["model"]["thresholds_source"]
    assert "Youden" in source and f"'val' ({thresholds['chosen_on']['samples']} images)" in source
    missing = [n for n, t in thresholds["thresholds"].items() if t is None]
    assert missing and f"none could be chosen for {', '.join(missing)}" in source
    for r in doc["results"]:
        assert r["positive"] == {n: r["probabilities"][n] >= t for n, t in used.items()}


def test_model_card_of_unevaluated_real_data_says_so(png_export, png_shards):
    card = (png_export / "MODEL_CARD.md").read_text()
    assert "synthetic" not in card and "research model trained on the `csv` dataset" in card
    assert "not been validated for clinical use" in card
    assert "No evaluation of these weights was found" in card and "run `launcher/evaluate.py`" in card
    assert "None were stored" in card and "0.5 for every class" in card
    assert hashlib.sha256((png_export / "student.onnx").read_bytes()).hexdigest() in card
    for label in LABELS:
        assert f"| {label} |" in card
