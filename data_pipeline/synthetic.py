"""Synthetic stand-ins for ChestX-ray14 and FETAL_PLANES_DB, written in the real on-disk layouts.

    python -m data_pipeline.synthetic --kind cxr --out data/cxr --n 3000 --size 256 --seed 0
    python -m data_pipeline.synthetic --kind us  --out data/us  --n 1200 --size 256 --seed 0

`cxr` writes what the NIH download looks like: `images/<patient>_<followup>.png` (8-bit grayscale),
`Data_Entry_2017_v2020.csv` (real header, 11-field rows), `train_val_list.txt` / `test_list.txt`
split by patient. `us` writes the FETAL_PLANES_DB layout: `Images/<Image_name>.png` of varying
sizes and the `;`-separated `FETAL_PLANES_DB_data.csv` with its real header (trailing space after
`Train` included). The same adapters that read the real datasets read these, so every test and the
demo exercise the real parsing code.

Each finding/plane is a localised pattern (see `patterns.py` and `synthetic_draw.py`) whose position,
size and contrast vary; prevalences keep the real dataset's rank order (Infiltration most common,
Hernia rarest) but are compressed so a few thousand images still hold positives of every class.
Generation is deterministic in `--seed`.

Each dataset root also gets `SYNTHETIC.json` (what was generated, with which seed): the shard
builder copies it into `manifest.json` as `synthetic`, so whatever is trained on these images says
so (the model card of `launcher/export.py`: for testing the system only, not for clinical use).
"""
from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from data_pipeline.labels import CXR14_FINDINGS
from data_pipeline.manifest import SYNTHETIC_MARKER
from data_pipeline.synthetic_draw import draw_cxr, draw_us

# Real ChestX-ray14 prevalence rank order, compressed: (finding, probability per image).
CXR_PREVALENCE = {
    "Infiltration": 0.18, "Effusion": 0.15, "Atelectasis": 0.13, "Nodule": 0.11, "Mass": 0.10,
    "Pneumothorax": 0.09, "Consolidation": 0.08, "Pleural_Thickening": 0.07, "Cardiomegaly": 0.065,
    "Emphysema": 0.06, "Edema": 0.055, "Fibrosis": 0.05, "Pneumonia": 0.045, "Hernia": 0.03,
}
# Real FETAL_PLANES_DB class counts (of 12,400): used as sampling weights.
US_COUNTS = {"Fetal abdomen": 711, "Fetal brain": 3092, "Fetal femur": 1626, "Fetal thorax": 1040,
             "Maternal cervix": 4213, "Other": 1718}
BRAIN_PLANES = ["Trans-thalamic", "Trans-cerebellum", "Trans-ventricular"]

CXR_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
US_HEADER = "Image_name;Patient_num;Plane;Brain_plane;Operator;US_Machine;Train "


def _patients(n: int, rng: np.random.Generator, mean_images: float):
    """Split n images over patients: several images per patient, heavy-tailed like the real sets."""
    counts = []
    while sum(counts) < n:
        counts.append(int(min(1 + rng.geometric(1.0 / mean_images) - 1, 12)) or 1)
    counts[-1] -= sum(counts) - n
    return [c for c in counts if c > 0]


def _write_png(path: Path, pixels: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".part")
    Image.fromarray(pixels, mode="L").save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, path)


def _write_marker(out: Path, kind: str, n: int, size: int, seed: int) -> None:
    """SYNTHETIC.json: these images are stand-ins, not medical data (deterministic content)."""
    doc = {"generator": "data_pipeline.synthetic", "kind": kind, "images": n, "size": size, "seed": seed,
           "note": "synthetic stand-in images for exercising the system; not medical data"}
    (out / SYNTHETIC_MARKER).write_text(json.dumps(doc, indent=1) + "\n")


def _cxr_job(args):
    path, labels, size, seed = args
    _write_png(path, draw_cxr(labels, size, np.random.default_rng(seed)))


def _us_job(args):
    path, plane, size, seed = args
    _write_png(path, draw_us(plane, size, np.random.default_rng(seed)))


def make_cxr(out: Path, n: int, size: int, seed: int, workers: int = 1, *,
             label_file: str = "Data_Entry_2017_v2020.csv", trailing_comma: bool = False,
             archive_folders: bool = False, test_fraction: float = 0.23) -> None:
    """Write a ChestX-ray14-layout dataset of n images."""
    rng = np.random.default_rng(seed)
    per_patient = _patients(n, rng, mean_images=3.6)
    test_patients = set(np.flatnonzero(rng.random(len(per_patient)) < test_fraction) + 1)
    rows, jobs, train_val, test = [], [], [], []
    for pid, count in enumerate(per_patient, start=1):
        age, sex = int(rng.integers(1, 95)), ("M" if rng.random() < 0.56 else "F")
        for follow_up in range(count):
            name = f"{pid:08d}_{follow_up:03d}.png"
            labels = [f for f in CXR14_FINDINGS if rng.random() < CXR_PREVALENCE[f]]
            folder = f"images_{1 + (len(jobs) * 12) // n:03d}/images" if archive_folders else "images"
            (out / folder).mkdir(parents=True, exist_ok=True)
            jobs.append((out / folder / name, labels, size, int(rng.integers(2**63))))
            finding = "|".join(sorted(labels)) or "No Finding"
            view = "PA" if rng.random() < 0.6 else "AP"
            rows.append(f"{name},{finding},{follow_up},{pid},{age},{sex},{view},"
                        f"{size},{size},{0.143 * 1024 / size:.3f},{0.143 * 1024 / size:.3f}"
                        + ("," if trailing_comma else ""))
            (test if pid in test_patients else train_val).append(name)
    _run(_cxr_job, jobs, workers)
    (out / label_file).write_text(CXR_HEADER + ("," if trailing_comma else "") + "\n"
                                  + "\n".join(rows) + "\n")
    (out / "train_val_list.txt").write_text("\n".join(train_val) + "\n")
    (out / "test_list.txt").write_text("\n".join(test) + "\n")
    _write_marker(out, "cxr", n, size, seed)


def make_us(out: Path, n: int, size: int, seed: int, workers: int = 1,
            test_fraction: float = 0.4) -> None:
    """Write a FETAL_PLANES_DB-layout dataset of n images."""
    rng = np.random.default_rng(seed)
    planes, weights = list(US_COUNTS), np.array(list(US_COUNTS.values()), dtype=float)
    per_patient = _patients(n, rng, mean_images=6.9)  # 12,400 images / 1,792 patients
    (out / "Images").mkdir(parents=True, exist_ok=True)
    rows, jobs = [], []
    for pid, count in enumerate(per_patient, start=1):
        train = int(rng.random() >= test_fraction)
        operator = rng.choice(["Op. 1", "Op. 2", "Op. 3", "Other"])
        machine = rng.choice(["Voluson E6", "Voluson S10", "Aloka", "Other"])
        for k in range(count):
            plane = planes[rng.choice(len(planes), p=weights / weights.sum())]
            name = f"Patient{pid:05d}_Plane{planes.index(plane) + 1}_{k + 1}_of_{count}"
            brain = rng.choice(BRAIN_PLANES) if plane == "Fetal brain" else "Not A Brain"
            jobs.append((out / "Images" / f"{name}.png", plane, size, int(rng.integers(2**63))))
            rows.append(f"{name};{pid};{plane};{brain};{operator};{machine};{train}")
    _run(_us_job, jobs, workers)
    (out / "FETAL_PLANES_DB_data.csv").write_text(US_HEADER + "\n" + "\n".join(rows) + "\n")
    _write_marker(out, "us", n, size, seed)


def _run(fn, jobs, workers: int) -> None:
    if workers <= 1:
        for job in jobs:
            fn(job)
        return
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(fn, jobs, chunksize=16))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=["cxr", "us"], required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=2000, help="number of images")
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (real CXR: 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--label-file", default="Data_Entry_2017_v2020.csv",
                   choices=["Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv"], help="cxr only")
    p.add_argument("--trailing-comma", action="store_true", help="cxr: end every CSV line with ','")
    p.add_argument("--archive-folders", action="store_true",
                   help="cxr: images under images_001/images/ ... images_012/images/")
    a = p.parse_args(argv)
    if a.n < 1 or a.size < 32:
        p.error("--n must be >= 1 and --size >= 32")
    a.out.mkdir(parents=True, exist_ok=True)
    if a.kind == "cxr":
        make_cxr(a.out, a.n, a.size, a.seed, a.workers, label_file=a.label_file,
                 trailing_comma=a.trailing_comma, archive_folders=a.archive_folders)
    else:
        make_us(a.out, a.n, a.size, a.seed, a.workers)
    print(f"wrote {a.n} synthetic {a.kind} images to {a.out}")


if __name__ == "__main__":
    main()
