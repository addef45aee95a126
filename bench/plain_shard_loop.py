"""The baseline for `build_shards_scaling.py`: the shortest single-process shard writer.

    python bench/plain_shard_loop.py --root DATA --out SHARDS --size 256

For every image of a ChestX-ray14-layout dataset, in label-file order: PIL open + convert('L')
-> resize to size x size with the same PIL call as `data_pipeline.image_io.fit_square` (square
inputs) -> PNG encode at the builder's compression level -> `webdataset.ShardWriter` writes
`<key>.png` + `<key>.cls` (the 14 findings as a bit mask). No validation, no global shuffle, no
labels/ids/metadata members, no atomic rename, no DALI index, no sha256, no manifest: what is left
is the work every shard builder must do, so our builder's time over this one is its overhead.
(Importing webdataset imports torch: a few seconds of start-up, excluded from the loop's own time.)
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import time
from pathlib import Path

import webdataset as wds
from PIL import Image

FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
            "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
            "Hernia")
PNG_COMPRESS_LEVEL = 3  # as data_pipeline.image_io.encode


def label_rows(root: Path):
    """(image name, findings bit mask) per row of the label file."""
    label_file = next(p for p in (root / "Data_Entry_2017_v2020.csv", root / "Data_Entry_2017.csv")
                      if p.is_file())
    with label_file.open(newline="") as f:
        reader = csv.reader(f)
        next(reader)
        for row in reader:
            if row:
                names = row[1].split("|")
                yield row[0], sum(1 << i for i, f in enumerate(FINDINGS) if f in names)


def run(root: Path, out: Path, size: int, maxcount: int = 1000) -> int:
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    # images/ or the NIH download's images_001/images/ ... images_012/images/
    paths = {p.name: p for p in root.glob("images*/**/*.png")}
    with wds.ShardWriter(str(out / "plain-%06d.tar"), maxcount=maxcount, verbose=0) as sink:
        for name, mask in label_rows(root):
            img = Image.open(paths[name]).convert("L")
            img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
            buf = io.BytesIO()
            img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
            sink.write({"__key__": name.rsplit(".", 1)[0], "png": buf.getvalue(), "cls": mask})
            n += 1
    return n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, required=True, help="a dataset in the ChestX-ray14 layout")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", type=int, default=256)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    n = run(a.root, a.out, a.size)
    seconds = time.perf_counter() - t0
    # The last line is JSON for build_shards_scaling.py: the loop's own time, without start-up.
    print(f"plain loop: {n} images in {seconds:.2f} s, {n / seconds:.1f} img/s")
    print(json.dumps({"images": n, "seconds": round(seconds, 3)}))


if __name__ == "__main__":
    main()
