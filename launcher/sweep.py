"""Experiment sweeps: every arm x hyper-parameter x seed through the real launcher, one honest table.

    python launcher/sweep.py --config launcher/configs/demo_distill.yaml --out demo_runs/sweeps/kd \\
        --arm alone="run.mode=supervised" --arm mixed="" \\
        --grid train.lr=1e-3,2e-3,5e-3 --select train.lr --seeds 0,1,2 \\
        --compare mixed alone --ranks 2
    python launcher/sweep.py --config CFG.yaml --out DIR --grid train.lr=1e-3,2e-3 \\
        --grid run.mode=supervised,distill --select train.lr --seeds 0,1,2 \\
        --compare run.mode=distill run.mode=supervised
    python launcher/sweep.py ... --slurm [--sbatch-args "--partition gpu --gpus-per-node 2"]
    python launcher/sweep.py --out DIR --report          # the table again, from DIR/sweep.json

Arms are what is compared: each `--arm NAME="key=value key=value"` (overrides separated by spaces;
an item ending in .yaml replaces --config for that arm), and every `--grid` axis that is not
`--select`ed. Axes named by `--select` are hyper-parameters: for each arm, the value with the highest
mean *validation* mean AUROC over the seeds is chosen, and only then is the test split read for the
comparison. Every run is `launcher/distill.py --resume auto` into `DIR/runs/<arm>/<hparams>/seed<k>`
(`deepspeed --num_gpus N` when --ranks > 1), one after another, or one SLURM array task each
(cluster/sweep.sbatch) with a report job after them. A run whose `metrics.json` exists is finished
and skipped; an interrupted one resumes from its newest checkpoint. The plan is written to
`DIR/sweep.json` first, and a second call with another plan for the same DIR is refused.

Writes (launcher/sweep_report.py): DIR/sweep.md (markdown table), DIR/sweep_results.json, DIR/sweep.png.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python launcher/sweep.py` from a checkout
    sys.path.insert(0, str(REPO))

from data_pipeline.cli import add_debug_flag, run_cli  # noqa: E402
from launcher import sweep_report  # noqa: E402
from launcher.config import ConfigError, load_config  # noqa: E402
from launcher.sweep_report import FINISHED  # noqa: E402

PLAN = "sweep.json"


# ------------------------------------------------------------------------------------- the plan
def parse_grid(text: str) -> tuple[str, list[str]]:
    """`train.lr=1e-3,2e-3` -> ("train.lr", ["1e-3", "2e-3"])."""
    key, sep, values = text.partition("=")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key.strip() or not items:
        raise ConfigError(f"--grid {text!r}: expected key=value1,value2,...")
    if len(set(items)) != len(items):
        raise ConfigError(f"--grid {text!r}: repeated value")
    return key.strip(), items


def parse_arm(text: str) -> tuple[str, dict]:
    """`mixed=loss.at_weight=30 loss.sp_weight=100` -> ("mixed", {"config": None, "sets": [...]})."""
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_+-]*", name):
        raise ConfigError(f"--arm {text!r}: expected NAME=\"key=value ...\" with a name of letters, "
                          f"digits, _, + or -")
    config, sets = None, []
    for item in rest.split():
        if item.endswith((".yaml", ".yml")) and "=" not in item:
            config = item
        elif "=" in item:
            sets.append(item)
        else:
            raise ConfigError(f"--arm {name}: {item!r} is neither key=value nor a .yaml config")
    return name, {"config": config, "sets": sets}


def _slug(pairs: dict) -> str:
    if not pairs:
        return "default"
    return "__".join(f"{k}-{re.sub(r'[^A-Za-z0-9._+-]', '_', str(v))}" for k, v in pairs.items())


def _label(name: str | None, pairs: dict) -> str:
    parts = ([name] if name else []) + [f"{k}={v}" for k, v in pairs.items()]
    return ",".join(parts) or "base"


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def build_plan(args) -> dict:
    """Every run of the sweep, each config checked (unknown keys, bad values) before anything runs."""
    grid = [parse_grid(g) for g in args.grid]
    keys = [k for k, _ in grid]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--grid names an axis twice: {keys}")
    select = list(args.select)
    for k in select:
        if k not in keys:
            raise ConfigError(f"--select {k}: not a --grid axis (axes: {keys})")
    arms_in = dict(parse_arm(a) for a in args.arm) if args.arm else {None: {"config": None, "sets": []}}
    if args.arm and len(arms_in) != len(args.arm):
        raise ConfigError("--arm names an arm twice")
    arm_axes = [(k, v) for k, v in grid if k not in select]
    hp_axes = [(k, v) for k, v in grid if k in select]
    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {args.seeds!r}: expected distinct integers, e.g. 0,1,2")
    for s in args.set:
        if any(c.isspace() for c in s):
            raise ConfigError(f"--set {s!r}: no spaces in sweep overrides (SLURM passes them as words)")

    arms, runs = {}, []
    for arm_name, spec in arms_in.items():
        for arm_values in itertools.product(*[v for _, v in arm_axes]):
            arm_pairs = dict(zip([k for k, _ in arm_axes], arm_values))
            label = _label(arm_name, arm_pairs)
            config = spec["config"] or args.config
            arm_sets = spec["sets"] + [f"{k}={v}" for k, v in arm_pairs.items()]
            arms[label] = {"config": config, "sets": arm_sets}
            for hp_values in itertools.product(*[v for _, v in hp_axes]):
                hp = dict(zip([k for k, _ in hp_axes], hp_values))
                for seed in seeds:
                    run_dir = Path("runs") / re.sub(r"[^A-Za-z0-9._+=,-]", "_", label).replace("=", "-") \
                        / _slug(hp) / f"seed{seed}"
                    sets = list(args.set) + arm_sets + [f"{k}={v}" for k, v in hp.items()] + [
                        f"run.seed={seed}", f"run.out_dir={Path(args.out).resolve() / run_dir.parent}",
                        f"run.name={run_dir.name}"]
                    runs.append({"index": len(runs), "arm": label, "hparams": hp, "seed": seed,
                                 "config": config, "sets": sets, "run_dir": str(run_dir)})
    if not runs:
        raise ConfigError("the sweep has no runs")
    for pair in args.compare or []:
        for a in pair:
            if a not in arms:
                raise ConfigError(f"--compare {a}: no such arm (arms: {sorted(arms)})")
    splits = set()
    for r in runs:  # every run's config must load: fail before the first run, naming the run
        try:
            cfg = load_config(r["config"], r["sets"])
        except (ConfigError, FileNotFoundError) as e:
            raise ConfigError(f"run {r['arm']} {_label(None, r['hparams'])} seed {r['seed']}: {e}") from None
        r["shards"], r["val_split"], r["test_split"] = cfg.data.shards, cfg.data.val_split, cfg.data.test_split
        splits.add((r["val_split"], r["test_split"]))
    if len(splits) != 1:
        raise ConfigError(f"every run must use the same validation and test splits, got {sorted(splits)}")
    return {"version": 1, "configs": {c: _sha256(c) for c in sorted({r["config"] for r in runs})},
            "sets": list(args.set), "arms": arms, "grid": [[k, v] for k, v in grid], "select": select,
            "seeds": seeds, "compare": [list(p) for p in args.compare or []], "ranks": args.ranks,
            "runs": runs}


def write_or_check_plan(out: Path, plan: dict) -> dict:
    """Write DIR/sweep.json, or check that the one already there describes the same sweep."""
    path = out / PLAN
    if path.is_file():
        old = json.loads(path.read_text())
        differs = [k for k in ("configs", "sets", "arms", "grid", "select", "seeds") if old.get(k) != plan.get(k)]
        if differs:
            raise ConfigError(f"{path} was written for another sweep (it differs in {', '.join(differs)});"
                              f" use another --out, or delete {path} to start this one there")
        old.update(compare=plan["compare"], ranks=plan["ranks"])  # reporting choices may change
        plan = old
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(PLAN + ".part")
    tmp.write_text(json.dumps(plan, indent=1))
    os.replace(tmp, path)
    return plan


def read_plan(out: Path) -> dict:
    path = out / PLAN
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no sweep plan (start the sweep with --config ... --out {out})")
    return json.loads(path.read_text())


def is_finished(out: Path, run: dict) -> bool:
    return (out / run["run_dir"] / FINISHED).is_file()


# ------------------------------------------------------------------------------------- running
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(run: dict, ranks: int) -> list[str]:
    script = str(REPO / "launcher" / "distill.py")
    sets = [a for s in run["sets"] for a in ("--set", s)]
    tail = [script, "--config", run["config"], *sets, "--resume", "auto"]
    if ranks <= 1:
        return [sys.executable, *tail]
    exe = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    return [exe, "--num_gpus", str(ranks), "--master_port", str(_free_port()), *tail]


def run_local(out: Path, plan: dict) -> list[dict]:
    """Run every unfinished run in turn; returns the failed ones (the sweep goes on past them)."""
    todo = [r for r in plan["runs"] if not is_finished(out, r)]
    print(f"sweep {out}: {len(plan['runs'])} runs, {len(plan['runs']) - len(todo)} finished, "
          f"{len(todo)} to run", flush=True)
    failed = []
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    for n, r in enumerate(todo, 1):
        log = logs / f"run{r['index']:03d}.log"
        resumed = (out / r["run_dir"] / "checkpoints").is_dir()
        print(f"[{n}/{len(todo)}] {r['arm']} {_label(None, r['hparams'])} seed {r['seed']}"
              f"{' (resuming)' if resumed else ''}: log {log}", flush=True)
        start = time.time()
        with open(log, "a") as f:
            rc = subprocess.run(launch_command(r, plan["ranks"]), cwd=Path.cwd(), stdout=f,
                                stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1")).returncode
        took = time.time() - start
        result = sweep_report.run_result(out, r) if rc == 0 else None
        if result is not None:
            print(f"      done in {took:.0f} s: val {result['val']:.4f}, test {result['test']:.4f}", flush=True)
        else:
            print(f"      FAILED (exit {rc}) after {took:.0f} s: see {log}", flush=True)
            failed.append(r)
    return failed


def shell_assignments(out: Path, index: int) -> str:
    """For cluster/sweep.sbatch: the variables distill.sbatch reads, for run `index` of the plan."""
    plan = read_plan(out)
    runs = [r for r in plan["runs"] if r["index"] == index]
    if not runs:
        raise ValueError(f"{out / PLAN}: no run with index {index}")
    r = runs[0]
    values = {"CONFIG": r["config"], "SET": " ".join(r["sets"])}
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in values.items())


def _without_gpus(args: list[str]) -> list[str]:
    """sbatch options minus GPU requests (--gpus*, --gres), for the CPU-only report job."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a.startswith(("--gpus", "--gres", "-G")):
            skip = "=" not in a and a in ("--gpus", "--gpus-per-node", "--gpus-per-task", "--gres", "-G")
        else:
            out.append(a)
    return out


def submit_slurm(out: Path, plan: dict, sbatch_args: str, argv_report: list[str]) -> None:
    """One array task per unfinished run (cluster/sweep.sbatch), then a report job after them."""
    todo = [r["index"] for r in plan["runs"] if not is_finished(out, r)]
    extra = shlex.split(sbatch_args)
    env = dict(os.environ, SWEEP=str(out.resolve()), RMS_HOME=str(REPO))
    if todo:
        cmd = ["sbatch", "--parsable", f"--array={','.join(map(str, todo))}",
               f"--ntasks-per-node={plan['ranks']}", f"--gpus-per-node={plan['ranks']}",
               f"--output={out.resolve()}/logs/slurm-%A_%a.out",  # --sbatch-args come later and win
               *extra, str(REPO / "cluster" / "sweep.sbatch")]
        (out / "logs").mkdir(exist_ok=True)
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise RuntimeError(f"sbatch refused the sweep array: {res.stderr.strip()}")
        array = res.stdout.strip().split(";")[0]
        print(f"submitted array job {array}: {len(todo)} runs", flush=True)
    report = [sys.executable, str(REPO / "launcher" / "sweep.py"), "--out", str(out.resolve()), "--report",
              *argv_report]
    dep = [f"--dependency=afterany:{array}"] if todo else []
    cmd = ["sbatch", "--parsable", *dep, "--job-name=rms-sweep-report", "--ntasks=1",
           f"--output={out.resolve()}/logs/slurm-report-%j.out", *_without_gpus(extra),
           "--wrap", shlex.join(report)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if res.returncode != 0:
        raise RuntimeError(f"sbatch refused the report job: {res.stderr.strip()}")
    print(f"submitted report job {res.stdout.strip().split(';')[0]} (writes {out / 'sweep.md'})", flush=True)


# ---------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", help="experiment YAML every run starts from")
    p.add_argument("--out", required=True, help="sweep directory (plan, runs, logs, table)")
    p.add_argument("--arm", action="append", default=[], metavar='NAME="key=value ..."',
                   help="a compared arm: overrides separated by spaces (repeatable)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="an axis crossed with every arm (repeatable)")
    p.add_argument("--select", action="append", default=[], metavar="KEY",
                   help="a --grid axis chosen per arm on validation (a hyper-parameter; repeatable)")
    p.add_argument("--seeds", default="0", help="run.seed values, comma-separated (default 0)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every run (repeatable)")
    p.add_argument("--compare", action="append", nargs=2, metavar=("A", "B"),
                   help="report A minus B with a paired bootstrap interval (repeatable)")
    p.add_argument("--ranks", type=int, default=1, help="processes per run (deepspeed --num_gpus)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates (default 2000)")
    p.add_argument("--slurm", action="store_true", help="submit an array job instead of running here")
    p.add_argument("--sbatch-args", default="", help="extra sbatch options for --slurm, one string")
    p.add_argument("--report", action="store_true", help="only (re)write the table from DIR/sweep.json")
    p.add_argument("--shell-run", type=int, default=None, help=argparse.SUPPRESS)  # cluster/sweep.sbatch
    add_debug_flag(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    try:
        if args.shell_run is not None:
            print(shell_assignments(out, args.shell_run))
            return 0
        if args.report:
            plan = read_plan(out)
            if args.compare:
                plan["compare"] = [list(p) for p in args.compare]
            sweep_report.write_report(out, plan, reps=args.bootstrap)
            return 0
        if not args.config:
            raise ConfigError("--config is needed to start or continue a sweep (or --report)")
        if args.ranks < 1:
            raise ConfigError("--ranks must be >= 1")
        plan = write_or_check_plan(out, build_plan(args))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.slurm:
        try:
            submit_slurm(out, plan, args.sbatch_args, [f"--bootstrap={args.bootstrap}"])
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0
    failed = run_local(out, plan)
    sweep_report.write_report(out, plan, reps=args.bootstrap)
    if failed:
        print(f"error: {len(failed)} run(s) failed: " + ", ".join(
            f"run{r['index']:03d} ({r['arm']} {_label(None, r['hparams'])} seed {r['seed']})" for r in failed),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
