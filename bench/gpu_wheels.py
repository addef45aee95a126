"""The wheels bench/gpu_check.sh installs on a GPU machine that has no package registry: `.whl/`.

    python bench/gpu_wheels.py             # fills .whl/ (needs the registry; run where there is one)
    python bench/gpu_wheels.py --list      # only says what it would put there, and why
    python bench/gpu_wheels.py --python 3.12 --have tensorboard,matplotlib,psutil   # for that machine

Which: the distributions of every third-party module that gpu_check.sh's steps import, found by
importing those modules in a child process (DeepSpeed and TensorBoard included, which the project
imports late), together with everything those distributions require, as installed here. From
that set it removes what the GPU machine is expected to have (gpu_check.sh's header: torch,
torchvision, timm, numpy, pillow, and everything they require) and NVIDIA DALI (far too large to
carry; the script's GPU runs use the torch loader). Each one is taken at the version installed
here, through `pip wheel --no-deps` (a wheel where the registry has one, else built from the
source distribution). `--python X.Y` fetches the compiled ones (those not `py3-none-any`) for that
CPython on x86_64 Linux instead; `--have` names distributions the machine already has. The total
must fit the 64 MiB that one device call carries.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ON_DEVICE = ("torch", "torchvision", "timm", "numpy", "pillow")
NOT_CARRIED = ("nvidia-dali-cuda130", "nvidia-dali-cuda120")
LIMIT_MIB = 64
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")
# What gpu_check.sh's steps import: the benchmark, the demo path end to end, the audit.
IMPORTS = """
import deepspeed
from torch.utils.tensorboard import SummaryWriter
import launcher.distill, launcher.report, launcher.plots, launcher.host_syncs, launcher.evaluate
import data_pipeline.build_shards, data_pipeline.synthetic, data_pipeline.torch_loader
import rmsnet.teachers, rmsnet.model
"""


def _name(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def imported_distributions() -> set[str]:
    """Distributions whose modules a child process has loaded after IMPORTS."""
    code = IMPORTS + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    if proc.returncode:
        raise SystemExit(f"error: importing gpu_check.sh's modules failed:\n{proc.stderr[-2000:]}")
    modules = json.loads(proc.stdout.strip().splitlines()[-1])
    owners = metadata.packages_distributions()
    return {_name(d) for m in modules for d in owners.get(m, ())}


def requirement_closure(roots) -> set[str]:
    """`roots` and every installed distribution they require (extras and other platforms left out)."""
    seen, todo = set(), [_name(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # required only on another platform or Python, and not installed here
        seen.add(name)
        for req in dist.requires or ():
            if "extra ==" in req:
                continue
            todo.append(_name(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0]))
    return seen


def plan(have=()) -> dict:
    on_device = requirement_closure(ON_DEVICE) | {_name(h) for h in have}
    needed = requirement_closure(imported_distributions() - {"rms-distill"}) - {"rms-distill"}
    carried = sorted(needed - on_device - set(NOT_CARRIED))
    return {"carry": {d: metadata.version(d) for d in carried}, "on_device": sorted(needed & on_device),
            "left_out": sorted(needed & set(NOT_CARRIED))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="say what would be carried, fetch nothing")
    p.add_argument("--out", type=Path, default=REPO / ".whl")
    p.add_argument("--python", default=None, metavar="X.Y",
                   help="the GPU machine's CPython version, when it differs from this one's")
    p.add_argument("--have", default="", help="comma-separated distributions the GPU machine already has")
    a = p.parse_args(argv)
    what = plan([h for h in a.have.split(",") if h.strip()])
    print(f"carry ({len(what['carry'])}): " + ", ".join(f"{d}=={v}" for d, v in what["carry"].items()))
    print(f"expected on the GPU machine: {', '.join(what['on_device'])}")
    if what["left_out"]:
        print(f"not carried: {', '.join(what['left_out'])} (the GPU runs use the torch loader)")
    if a.list:
        return 0
    tmp = Path(tempfile.mkdtemp(dir=a.out.parent, prefix=".whl."))
    try:
        specs = [f"{d}=={v}" for d, v in what["carry"].items()]
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp), *specs])
        if proc.returncode:
            raise SystemExit(f"error: pip wheel failed for {' '.join(specs)}")
        here = f"{sys.version_info.major}.{sys.version_info.minor}"
        if a.python and a.python != here:  # compiled wheels for the other CPython
            for whl in [w for w in tmp.glob("*.whl") if not w.name.endswith("-none-any.whl")]:
                dist, version = whl.name.split("-")[:2]
                whl.unlink()
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "--only-binary=:all:",
                       "--python-version", a.python, "--implementation", "cp", "-d", str(tmp),
                       *[x for pl in PLATFORMS for x in ("--platform", pl)], f"{dist}=={version}"]
                if subprocess.run(cmd).returncode:
                    raise SystemExit(f"error: no wheel of {dist}=={version} for CPython {a.python} on x86_64 Linux")
        size = sum(f.stat().st_size for f in tmp.glob("*.whl")) / 2 ** 20
        if size > LIMIT_MIB:
            raise SystemExit(f"error: the wheels come to {size:.1f} MiB, over the {LIMIT_MIB} MiB a device call carries")
        shutil.rmtree(a.out, ignore_errors=True)
        tmp.rename(a.out)  # the whole folder or nothing
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {len(list(a.out.glob('*.whl')))} wheels, {size:.1f} MiB, to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
