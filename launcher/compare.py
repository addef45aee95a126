"""Compare two training recipes from their finished runs: paired difference in test mean AUROC.

    python launcher/compare.py --a demo_runs/demo/student --b demo_runs/demo/student_alone
    python launcher/compare.py --a runs/kd/seed0 runs/kd/seed1 runs/kd/seed2 \\
        --b runs/alone/seed0 runs/alone/seed1 runs/alone/seed2 --names kd alone --out kd_vs_alone.json

The i-th run of --a is paired with the i-th of --b (same seed); each run's
`predictions/student_<split>.npz` (written by launcher/distill.py) is read, the patients of the
split come from the shards' sample metadata, and rmsnet/paired_bootstrap.py resamples patients
(and seeds, when there are several pairs). With a single pair the interval covers the test
patients only, not the seed-to-seed spread: a claim needs several seeds (launcher/sweep.py).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python launcher/compare.py` from a checkout
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from data_pipeline.cli import add_debug_flag, run_cli  # noqa: E402
from data_pipeline.loader_common import split_patients  # noqa: E402
from launcher.config import ConfigError, load_config  # noqa: E402
from rmsnet.paired_bootstrap import paired_difference  # noqa: E402


def load_predictions(run_dir: Path, split: str):
    path = Path(run_dir) / "predictions" / f"student_{split}.npz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no predictions (is {run_dir} a finished run of launcher/distill.py?)")
    with np.load(path) as z:
        return z["sid"], z["probs"], z["targets"]


def run_shards(run_dir: Path) -> str:
    cfg = Path(run_dir) / "config.yaml"
    if not cfg.is_file():
        raise FileNotFoundError(f"{cfg}: not found (is {run_dir} a run directory?)")
    return load_config(cfg).data.shards


def paired_runs(runs_a: list, runs_b: list, split: str = "test", reps: int = 2000, seed: int = 0,
                shards: str | None = None) -> dict:
    """A minus B over paired runs (the i-th of each list), every run scored on the same samples."""
    if len(runs_a) != len(runs_b) or not runs_a:
        raise ValueError(f"pair the runs: {len(runs_a)} given for A, {len(runs_b)} for B")
    scores_a, scores_b, sids, targets = [], [], None, None
    for run, dest in [(r, scores_a) for r in runs_a] + [(r, scores_b) for r in runs_b]:
        sid, probs, tg = load_predictions(run, split)
        if sids is None:
            sids, targets = sid, tg
        elif not (np.array_equal(sid, sids) and np.array_equal(tg, targets)):
            raise ValueError(f"{run}: its '{split}' predictions are of other samples than {runs_a[0]}'s "
                             f"(runs on different shards cannot be paired)")
        dest.append(probs)
    patients = split_patients(shards or run_shards(runs_a[0]), split)
    missing = [int(s) for s in sids if int(s) not in patients]
    if missing:
        raise ValueError(f"sample ids {missing[:5]} of the runs' '{split}' split are not in the shards' "
                         f"split (other shards?)")
    result = paired_difference(scores_a, scores_b, targets, [patients[int(s)] for s in sids], reps, seed)
    return {"runs_a": [str(r) for r in runs_a], "runs_b": [str(r) for r in runs_b], "split": split, **result}


def describe(result: dict, name_a: str = "A", name_b: str = "B") -> str:
    lo, hi = result["ci95"]
    what = "test patients" + (" and seeds" if result["seeds"] > 1 else " (one seed: no seed spread)")
    return (f"{name_a} - {name_b} mean AUROC on '{result['split']}': {result['difference']:+.3f} "
            f"(95% interval {lo:+.3f} to {hi:+.3f}, paired bootstrap over {result['patients']} {what}, "
            f"{result['reps']} replicates)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--a", nargs="+", required=True, metavar="RUN_DIR", help="runs of recipe A")
    p.add_argument("--b", nargs="+", required=True, metavar="RUN_DIR", help="runs of recipe B, paired in order")
    p.add_argument("--names", nargs=2, default=("A", "B"), metavar=("A", "B"))
    p.add_argument("--split", default="test")
    p.add_argument("--bootstrap", type=int, default=2000, help="replicates (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", default=None, help="also write the result as JSON here")
    add_debug_flag(p)
    a = p.parse_args(argv)
    try:
        result = paired_runs([Path(r) for r in a.a], [Path(r) for r in a.b], a.split, a.bootstrap, a.seed)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(result, *a.names))
    if a.out:
        Path(a.out).write_text(json.dumps({"names": list(a.names), **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
