"""What the benchmarks share: the synthetic source dataset, the machine description, tables, JSON.

Every benchmark measures its ratios side by side in one run (the machines are shared and noisy,
docs/design.md, "Benchmarks"): configurations are interleaved, repeated, and reported as medians.
Nothing here asserts a timing.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/x.py` puts bench/ first on the path, not the repo
    sys.path.insert(0, str(REPO))

from data_pipeline.adapters.chestxray14 import find_label_file, image_locations  # noqa: E402
from data_pipeline.synthetic import make_cxr  # noqa: E402

RESULTS = REPO / "bench" / "results"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "rms-distill-bench"


def median(values) -> float:
    return float(statistics.median(values))


def count_rows(root: Path) -> int:
    """Images listed in a ChestX-ray14-layout label file (0 when there is none: not generated yet)."""
    try:
        label_file = find_label_file(root)
    except FileNotFoundError:
        return 0
    with label_file.open(newline="") as f:
        return max(0, sum(1 for _ in csv.reader(f)) - 1)


def ensure_cxr(data: Path | None, n: int, image_size: int, work: Path, workers: int,
               seed: int = 0) -> tuple[Path, dict]:
    """The source dataset: `data` when given (reused as is), else `work/cxr_n{n}_px{size}`,
    generated with `make_cxr` unless a complete copy is already there. Returns (root, info)."""
    if data is not None:
        n_found = count_rows(Path(data))
        if n_found == 0:
            raise SystemExit(f"error: {data}: no ChestX-ray14 label file (generate one with "
                             f"`python -m data_pipeline.synthetic --kind cxr`)")
        return Path(data), {"root": str(data), "images": n_found, "reused": True, "seconds": None}
    root = work / f"cxr_n{n}_px{image_size}" if seed == 0 else work / f"cxr_n{n}_px{image_size}_seed{seed}"
    if count_rows(root) == n:
        return root, {"root": str(root), "images": n, "reused": True, "seconds": None}
    # The label file is written last, so a directory without one is an interrupted generation.
    t0 = time.perf_counter()
    make_cxr(root, n, image_size, seed, workers)
    seconds = time.perf_counter() - t0
    return root, {"root": str(root), "images": n, "reused": False, "seconds": round(seconds, 2),
                  "workers": workers, "images_per_second": round(n / seconds, 2)}


def subset_cxr(src: Path, dst: Path, n: int) -> Path:
    """A ChestX-ray14-layout view of the first n images of `src` (symlinks, filtered label file and
    split lists), so a second benchmark reads the very same images without generating them again."""
    if count_rows(dst) == n:
        return dst
    label_file = find_label_file(src)
    lines = label_file.read_text().splitlines()
    if len(lines) - 1 < n:
        raise SystemExit(f"error: {src} has {len(lines) - 1} images, fewer than --n {n}")
    rows = lines[1:n + 1]
    names = {r.split(",", 1)[0] for r in rows}
    (dst / "images").mkdir(parents=True, exist_ok=True)
    found = image_locations(src)
    for name in sorted(names & found.keys()):
        link = dst / "images" / name
        if not link.is_symlink():
            link.symlink_to(found[name].resolve())
    for name in ("train_val_list.txt", "test_list.txt"):
        kept = [x for x in (src / name).read_text().split() if x in names]
        (dst / name).write_text("\n".join(kept) + "\n")
    (dst / label_file.name).write_text("\n".join([lines[0]] + rows) + "\n")  # last: marks complete
    return dst


def source_image_size(root: Path) -> list[int]:
    """(width, height) of the first listed image: what a reused `--data` directory holds."""
    from PIL import Image
    name = find_label_file(root).read_text().splitlines()[1].split(",", 1)[0]
    with Image.open(image_locations(root)[name]) as img:
        return list(img.size)


def warm_page_cache(root: Path) -> dict:
    """Read every source image once so that no timed run pays for the first read from disk."""
    t0, total = time.perf_counter(), 0
    for path in root.rglob("*.png"):
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                total += len(block)
    return {"bytes": total, "seconds": round(time.perf_counter() - t0, 2)}


def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"machine": platform.machine(), "cpu": model or platform.processor(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "gpu": None}
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_num_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        import nvidia.dali
        info["dali"] = nvidia.dali.__version__
    except ImportError:
        pass
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def table(headers: list[str], rows: list[list]) -> str:
    """A plain-text (also Markdown) table; floats get 3 significant figures or 1 decimal."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.1f}" if abs(v) >= 100 else f"{v:.3g}"
        return "" if v is None else str(v)
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in cells])


def write_json(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")
