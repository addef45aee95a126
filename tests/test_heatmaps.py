"""launcher/heatmaps.py and `predict.py --heatmaps`: Grad-CAM where the finding is, files per
positive finding, and one warning (predictions unchanged) when the PyTorch side is missing.

The localisation check trains a student here: rmsnet_xxs at 128 px (a 4x4 final feature map) on
images drawn with the synthetic generator's primitives (`patterns.blob` as `synthetic_draw` draws
a Mass, on `smooth_noise` tissue, finished by the generator's own contrast jitter and noise), so
the test knows where each finding is. It is brighter than the generator's Mass so that 200 steps
learn it. The other tests use the random student of tests/test_predict.py.
"""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline import build_shards
from data_pipeline.image_io import as_stored, fit_square, load_gray8
from data_pipeline.patterns import Canvas, blob, smooth_noise
from data_pipeline.synthetic_draw import _finish
from launcher import heatmaps, predict
from rmsnet.teachers import create_tapped_model
from test_predict import LABELS, SHARD_PX, build_csv_shards, make_inputs, run_export, save_student

REPO = Path(__file__).resolve().parents[1]
SIZE = 128  # model input = shard size: a 4x4 Grad-CAM grid, cells of 32 px
CELL = SIZE // 4


# ------------------------------------------------------------------------ the trained student
def draw(seed: int, centre: tuple[float, float] | None, size: int = SIZE) -> tuple[np.ndarray, float]:
    """A tissue-like image with a bright Mass blob at `centre` (y, x as fractions of the side; None:
    no finding); the pixels (uint8) and the blob's radius in pixels. Same background for a seed."""
    rng = np.random.default_rng(seed)
    c = Canvas(size, size, rng)
    c.img += 0.35 + 0.12 * smooth_noise(size, size, rng)
    r, amp = rng.uniform(0.06, 0.09) * size, rng.uniform(0.25, 0.4)
    if centre is not None:
        blob(c, centre[0] * size, centre[1] * size, r, r, amp, edge=0.01 * size)
    return _finish(c, noise=0.03), r


def training_set(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    x, y = np.zeros((n, 1, SIZE, SIZE), np.float32), np.zeros(n, np.float32)
    for i in range(n):
        y[i] = i % 2 == 0
        x[i, 0] = draw(seed * 100_000 + i, tuple(rng.uniform(0.2, 0.8, 2)) if y[i] else None)[0] / 255.0
    return torch.from_numpy(x), torch.from_numpy(y)


@pytest.fixture(scope="module")
def mass_student():
    """rmsnet_xxs trained to say whether an image holds the Mass: fixed seeds, 200 steps of 16 on one
    CPU thread (about a minute; one thread also keeps the run the same on any core count)."""
    x, y = training_set(800, seed=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        tapped = create_tapped_model("rmsnet_xxs", 1)
        opt = torch.optim.AdamW(tapped.parameters(), lr=2e-3, weight_decay=0.01)
        g = torch.Generator().manual_seed(0)
        tapped.train()
        for _ in range(200):
            idx = torch.randint(0, len(x), (16,), generator=g)
            logits = tapped.forward_logits(x[idx])[:, 0]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return tapped.eval()


def peak(heat: np.ndarray) -> np.ndarray:
    """(y, x) centre of mass of the top 5 % of a map."""
    w = np.where(heat >= np.quantile(heat, 0.95), heat, 0.0)
    yy, xx = np.mgrid[:heat.shape[0], :heat.shape[1]]
    return np.array([(w * yy).sum(), (w * xx).sum()]) / w.sum()


@pytest.mark.slow
def test_grad_cam_peaks_where_the_finding_was_drawn(mass_student):
    # the model must really detect the finding, or where it looks says nothing
    from sklearn.metrics import roc_auc_score
    x, y = training_set(64, seed=2)
    with torch.no_grad():
        p = torch.sigmoid(mass_student.forward_logits(x)[:, 0]).numpy()
    assert roc_auc_score(y.numpy(), p) >= 0.95
    # Each background twice: the Mass at a point off the centre, then at its mirror image through
    # the centre. The map must follow the finding, not the background or the image centre.
    angles = np.arange(8) * np.pi / 4
    points = [(0.5 + 0.3 * np.sin(a), 0.5 + 0.3 * np.cos(a)) for a in angles]
    images, truth = [], []
    for k, (py, px) in enumerate(points):
        for centre in ((py, px), (1 - py, 1 - px)):
            pixels, r = draw(500 + k, centre)
            images.append(pixels / np.float32(255.0))
            truth.append((np.array(centre) * SIZE, r))
    batch = torch.from_numpy(np.stack(images)[:, None].astype(np.float32))
    logits, cams = heatmaps.grad_cam(mass_student, batch, [0])
    assert (logits[:, 0] > 0).all()  # every one of them is called positive
    beyond, margins = [], []  # how far each peak lies outside the finding; nearer it than its mirror
    for cam, (centre, r) in zip(cams[0], truth):
        assert cam.shape == (4, 4) and cam.max() > 0
        heat = heatmaps.to_original(cam / cam.max(), SIZE, SIZE, "pad", (SIZE, SIZE))
        at = peak(heat)
        near, decoy = np.hypot(*(at - centre)), np.hypot(*(at - (SIZE - centre)))
        beyond.append(near - r)
        margins.append(decoy - near)
    # A 4x4 map places the finding to about half a cell. Over five training seeds: median distance
    # outside the finding 7 to 11 px, largest 19 to 22 px, margin at least 17 px. A map that peaked
    # at the image centre would lie ~28 px outside, with margin 0; on the background, it would be as
    # near the mirrored spot, where the other image of the pair has the finding.
    assert np.median(beyond) <= CELL / 2, beyond
    assert max(beyond) <= CELL, beyond
    assert min(margins) > 0, margins


def write_mass_dataset(root: Path, n: int) -> list[str]:
    """PNGs of 128 px and a CSV table (one label, Mass), in train / val / test."""
    root.mkdir(parents=True, exist_ok=True)
    rows, names = [], []
    for i in range(n):
        centre = (0.3, 0.3) if i % 2 == 0 else None
        Image.fromarray(draw(9000 + i, centre)[0]).save(root / f"m{i:03d}.png")
        rows.append(f"m{i:03d}.png,{int(centre is not None)},{('train', 'val', 'test')[i % 3]}")
        names.append(f"m{i:03d}.png")
    (root / "table.csv").write_text("path,Mass,split\n" + "\n".join(rows) + "\n")
    return names


@pytest.mark.slow
def test_predict_writes_an_overlay_per_positive_finding_at_the_original_size(mass_student,
                                                                             tmp_path):
    data = tmp_path / "data"
    write_mass_dataset(data, 12)
    shards = tmp_path / "shards"
    build_shards.main(["--dataset", "csv", "--root", str(data), "--out", str(shards), "--csv", "table.csv",
                       "--label-columns", "Mass", "--split-column", "split", "--size", str(SIZE),
                       "--shard-size", "8", "--workers", "1", "--quiet"])
    meta = {"arch": "rmsnet_xxs", "num_classes": 1, "in_chans": 1,
            "feature_indices": mass_student.feature_indices, "image_size": SIZE, "label_names": ["Mass"],
            "multilabel": True, "step": 200, "mode": "supervised"}
    torch.save({"model": mass_student.model.state_dict(), "adapters": {}, "meta": meta},
               tmp_path / "model.pt")
    exported = run_export(tmp_path / "model.pt", tmp_path / "export", shards)
    # inputs larger than the shards (the overlay keeps their size) and one without the finding
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, centre in (("left", (0.35, 0.27)), ("right", (0.65, 0.73)), ("none", None)):
        Image.fromarray(draw(77, centre, size=4 * SIZE)[0]).save(inputs / f"{name}.png")
    out, maps = tmp_path / "r.json", tmp_path / "maps"
    assert predict.main(["--model", str(exported), str(inputs), "--out", str(out),
                         "--heatmaps", str(maps)]) == 0
    doc = json.loads(out.read_text())
    assert doc["heatmaps"]["max_abs_prob_diff_pytorch_onnx"] <= heatmaps.PROB_TOLERANCE
    assert doc["heatmaps"]["weights"] == str(tmp_path / "model.pt")
    rows = {Path(r["path"]).stem: r for r in doc["results"]}
    assert [rows[n]["positive"]["Mass"] for n in ("left", "right", "none")] == [True, True, False]
    assert rows["none"]["heatmaps"] == []
    for name in ("left", "right"):
        (path,) = rows[name]["heatmaps"]
        p = rows[name]["probabilities"]["Mass"]
        assert Path(path).parent == maps and Path(path).name.endswith(f"_{name}__Mass_p{p:.3f}.png")
        img = Image.open(path)
        assert img.mode == "RGB" and img.size == (4 * SIZE, 4 * SIZE)
    assert sorted(p.name for p in maps.iterdir()) == sorted(Path(rows[n]["heatmaps"][0]).name
                                                            for n in ("left", "right"))


# ------------------------------------------------------------------ the layer and the geometry
def test_grad_cam_is_that_of_final_conv_with_gradients_through_the_whole_network():
    """The shortcut (backbone without autograd, only the head differentiated) gives textbook
    Grad-CAM on rmsnet_xxs's final_conv, and the logits of the model."""
    torch.manual_seed(3)
    tapped = create_tapped_model("rmsnet_xxs", 3).eval()
    x = torch.rand(2, 1, 64, 64)
    logits, cams = heatmaps.grad_cam(tapped, x, [0, 2])
    np.testing.assert_allclose(logits, tapped.forward_logits(x).detach().numpy(), atol=1e-5)
    seen = {}
    hook = tapped.model.final_conv.register_forward_hook(lambda m, i, o: seen.update(a=o))
    try:
        for c in (0, 2):
            out = tapped.forward_logits(x.clone().requires_grad_(True))
            grad, = torch.autograd.grad(out[:, c].sum(), seen["a"])
            ref = torch.relu((grad.mean((2, 3), keepdim=True) * seen["a"]).sum(1)).detach().numpy()
            assert ref.shape == (2, 2, 2)  # 1/32 of the input side
            np.testing.assert_allclose(cams[c], ref, rtol=1e-4, atol=1e-6)
    finally:
        hook.remove()


@pytest.mark.parametrize("fit", ["pad", "crop", "stretch"])
@pytest.mark.parametrize("shape", [(60, 90), (90, 60), (70, 70)])
def test_maps_are_put_back_over_the_original_image_through_the_fit(fit, shape):
    """The model input itself, mapped back as if it were a map, lands on the original image."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    original = (127 + 100 * np.sin(yy / 9.0) * np.cos(xx / 13.0)).astype(np.uint8)
    img = Image.fromarray(original)
    side, size = 48, 32
    model_in = predict.resize_like_loader(np.asarray(as_stored(fit_square(img, side, fit), "png")), size)
    back = heatmaps.to_original(model_in.astype(np.float64), size, side, fit, img.size)
    assert back.shape == shape
    seen = np.ones(shape, bool)
    if fit == "crop" and shape[0] != shape[1]:
        s = min(shape)
        seen[:] = False
        seen[(shape[0] - s) // 2:(shape[0] - s) // 2 + s, (shape[1] - s) // 2:(shape[1] - s) // 2 + s] = True
        assert (back[~seen] == 0).all()
    inner = seen.copy()  # the outermost pixels blur with the padding
    inner[:3], inner[-3:], inner[:, :3], inner[:, -3:] = False, False, False, False
    corr = np.corrcoef(back[inner], original[inner].astype(np.float64))[0, 1]
    assert corr > 0.95, corr
    # a wrong inverse (e.g. the padding kept) would shift it: compare with a plain resize
    if fit == "pad" and shape[0] != shape[1]:
        naive = np.asarray(Image.fromarray(model_in.astype(np.float32)).resize(img.size, Image.BILINEAR))
        assert np.corrcoef(naive[inner], original[inner].astype(np.float64))[0, 1] < corr - 0.1


# ------------------------------------------------------------------ predict.py with --heatmaps
@pytest.fixture(scope="module")
def random_export(tmp_path_factory):
    """tests/test_predict.py's random student on its images, exported; the weights stay beside."""
    root = tmp_path_factory.mktemp("heat_inputs")
    files = make_inputs(root)
    shards = build_csv_shards(root, files, tmp_path_factory.mktemp("heat_shards"))
    d = tmp_path_factory.mktemp("heat_model")
    return root, files, run_export(save_student(d, LABELS, SHARD_PX), d / "export", shards), d / "model.pt"


def test_heatmaps_for_every_positive_finding_and_listed_in_the_rows(random_export, tmp_path):
    root, files, exported, weights = random_export
    out, maps = tmp_path / "r.csv", tmp_path / "maps"
    assert predict.main(["--model", str(exported), str(root), "--out", str(out),
                         "--heatmaps", str(maps)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(files) and list(rows[0])[-1] == "heatmaps"
    written = 0
    for r in rows:
        positives = r["positives"].split("|") if r["positives"] else []
        listed = r["heatmaps"].split("|") if r["heatmaps"] else []
        assert [Path(p).name.split("__")[1].rsplit("_p", 1)[0] for p in listed] == positives
        w, h = load_gray8(Path(r["path"])).size
        for p in listed:
            img = Image.open(p)
            assert img.mode == "RGB" and max(img.size) == max(heatmaps.MIN_SIDE, w, h)
            assert abs(img.size[0] / img.size[1] - w / h) < 0.02  # the original's shape
        written += len(listed)
    assert written > 0 and len(list(maps.iterdir())) == written


def _predict_cli(exported: Path, inputs, out: Path, *extra: str, pre: str = ""):
    """predict.py in a fresh interpreter (`pre`: Python run first); (exit status, stderr)."""
    code = (f"import runpy, sys\n{pre}"
            f"sys.argv = ['predict.py', '--model', {str(exported)!r}, *{[str(i) for i in inputs]!r}, "
            f"'--out', {str(out)!r}, *{list(extra)!r}]\n"
            "try:\n"
            f"    runpy.run_path({str(REPO / 'launcher' / 'predict.py')!r}, run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    sys.exit(e.code)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=out.parent)
    return proc.returncode, proc.stderr


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:") and "synthetic" not in line]


@pytest.mark.parametrize("case", ["no such weights", "no torch", "other weights"])
def test_without_usable_torch_weights_one_warning_and_the_same_predictions(random_export, tmp_path, case):
    root, _, original, _ = random_export
    exported = tmp_path / "export"
    shutil.copytree(original, exported)
    plain = tmp_path / "plain.json"
    assert predict.main(["--model", str(exported), str(root), "--out", str(plain)]) == 0
    out, maps = tmp_path / "r.json", tmp_path / "maps"
    extra, pre = ["--heatmaps", str(maps)], ""
    if case == "no such weights":
        extra += ["--heatmap-weights", str(tmp_path / "missing.pt")]
    elif case == "no torch":
        pre = "sys.modules['torch'] = None  # `import torch` raises ImportError\n"
    else:  # a model.pt beside the ONNX file comes first: here, another student's
        save_student(exported, LABELS, SHARD_PX, seed=1)
    rc, stderr = _predict_cli(exported, [root], out, *extra, pre=pre)
    assert rc == 0, stderr
    (line,) = _warnings(stderr)
    needle = {"no such weights": "no such file or directory",
              "no torch": "needs PyTorch, which is not installed",
              "other weights": "not the weights of this export"}[case]
    assert needle in line, line
    doc, ref = json.loads(out.read_text()), json.loads(plain.read_text())
    assert [r["probabilities"] for r in doc["results"]] == [r["probabilities"] for r in ref["results"]]
    assert all(r["heatmaps"] == [] for r in doc["results"]) and not list(maps.glob("*.png"))


def test_recorded_weights_that_are_gone_are_named_in_the_warning(random_export, tmp_path):
    """The export records the checkpoint it came from; when that file is gone, the warning says
    where it looked and how to point at the weights."""
    import onnx
    root, _, original, _ = random_export
    gone = tmp_path / "run" / "final" / "model.pt"
    model = onnx.load(str(original / "student.onnx"))
    for prop in model.metadata_props:
        if prop.key == "source_checkpoint":
            prop.value = str(gone)
    (tmp_path / "export").mkdir()
    onnx.save(model, str(tmp_path / "export" / "student.onnx"))
    out = tmp_path / "r.csv"
    rc, stderr = _predict_cli(tmp_path / "export", [root / "gray8.png"], out,
                              "--heatmaps", str(tmp_path / "m"))
    assert rc == 0, stderr
    (line,) = _warnings(stderr)
    assert "were not found" in line and str(gone) in line and "--heatmap-weights" in line
    (row,) = csv.DictReader(out.open())
    assert row["status"] == "ok" and row["heatmaps"] == ""


def test_the_heatmaps_module_imports_no_torch_until_asked(tmp_path):
    code = ("import sys\nimport launcher.heatmaps\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'timm'))))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_heatmap_weights_without_heatmaps_is_a_usage_error(random_export, capsys):
    root, _, exported, weights = random_export
    assert predict.main(["--model", str(exported), str(root / "gray8.png"), "--heatmap-weights",
                         str(weights)]) == 2
    assert "only used with --heatmaps" in capsys.readouterr().err
