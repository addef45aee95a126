"""The table of a sweep (launcher/sweep.py): per combination, selection on validation, paired tests.

For each arm and hyper-parameter combination: the seeds finished, mean and spread (sample standard
deviation over seeds) of the validation and test mean AUROC of the final student. Per arm, the
combination with the highest mean validation score is chosen; only combinations with every seed
finished take part (a half-finished one could win by luck of fewer seeds). Each `--compare A B`
pairs the chosen runs of A and B by seed and reports the test mean AUROC difference with a
bootstrap interval over test patients and seeds (rmsnet/paired_bootstrap.py).

Writes DIR/sweep.md, DIR/sweep_results.json and DIR/sweep.png.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from launcher.compare import paired_runs
from launcher.metrics_doc import model_result, read_metrics

FINISHED = "metrics.json"  # launcher/distill.py writes it last: a run with it is finished


def _hp_label(hp: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in hp.items()) or "-"


def run_result(out: Path, run: dict) -> dict | None:
    """Validation and test mean AUROC (student, and teacher where there is one) of a finished run."""
    path = out / run["run_dir"] / FINISHED
    if not path.is_file():
        return None
    m = read_metrics(path)
    res = {}
    for key, role, split in (("val", "student", run["val_split"]), ("test", "student", run["test_split"]),
                             ("teacher_test", "teacher", run["test_split"])):
        r = model_result(m, role, split)
        if r is None and role == "student":
            raise ValueError(f"{path}: no {role} result on split {split!r}")
        if r is not None:
            res[key] = r["mean_auroc"]
    return res


def _stats(values: list[float]) -> dict:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    return {"mean": float(v.mean()) if len(v) else None,
            "sd": float(v.std(ddof=1)) if len(v) > 1 else None, "n": int(len(v))}


def summarise(out: Path, plan: dict) -> dict:
    """Rows per (arm, hyper-parameters), the choice per arm; no test number takes part in a choice."""
    seeds = plan["seeds"]
    groups: dict[tuple[str, str], dict] = {}
    for r in plan["runs"]:
        g = groups.setdefault((r["arm"], json.dumps(r["hparams"])),
                              {"arm": r["arm"], "hparams": r["hparams"], "runs": {}})
        g["runs"][r["seed"]] = {"run_dir": r["run_dir"], **(run_result(out, r) or {})}
    rows = []
    for g in groups.values():
        done = {s: x for s, x in g["runs"].items() if "val" in x}
        rows.append({"arm": g["arm"], "hparams": g["hparams"], "seeds_done": sorted(done),
                     "complete": len(done) == len(seeds),
                     "val": _stats([x["val"] for x in done.values()]),
                     "test": _stats([x["test"] for x in done.values()]),
                     "per_seed": {str(s): {k: x.get(k) for k in ("val", "test")} for s, x in done.items()},
                     "teacher_test": _stats([x.get("teacher_test") for x in done.values()]),
                     "run_dirs": {str(s): x["run_dir"] for s, x in g["runs"].items()}})
    chosen = {}
    for arm in plan["arms"]:
        eligible = [row for row in rows if row["arm"] == arm and row["complete"]
                    and row["val"]["mean"] is not None]
        if eligible:  # first in grid order wins a tie
            best = max(eligible, key=lambda row: row["val"]["mean"])
            best["chosen"] = True
            chosen[arm] = best
    return {"rows": rows, "chosen": chosen}


def compare(out: Path, plan: dict, chosen: dict, a: str, b: str, reps: int) -> dict:
    """A minus B on the test split, chosen combinations, paired by seed."""
    if a not in chosen or b not in chosen:
        missing = [x for x in (a, b) if x not in chosen]
        return {"a": a, "b": b, "error": f"no finished combination of {missing} to choose from yet"}
    ra, rb = chosen[a], chosen[b]
    seeds = [s for s in ra["seeds_done"] if s in rb["seeds_done"]]
    first = next(r for r in plan["runs"] if r["run_dir"] == ra["run_dirs"][str(seeds[0])])
    result = paired_runs([out / ra["run_dirs"][str(s)] for s in seeds],
                         [out / rb["run_dirs"][str(s)] for s in seeds],
                         first["test_split"], reps=reps, seed=0, shards=first["shards"])
    return {"a": a, "b": b, "a_hparams": ra["hparams"], "b_hparams": rb["hparams"], "paired_seeds": seeds,
            **{k: v for k, v in result.items() if k not in ("runs_a", "runs_b")}}


def markdown(plan: dict, summary: dict, comparisons: list[dict]) -> str:
    val, test = plan["runs"][0]["val_split"], plan["runs"][0]["test_split"]
    n_seeds = len(plan["seeds"])
    fmt = lambda s: "-" if s["mean"] is None else (f"{s['mean']:.3f}" + (f" ± {s['sd']:.3f}" if s["sd"] is not None else ""))
    lines = [f"Mean AUROC of the final student (mean ± sd over seeds {plan['seeds']}); per arm the "
             f"hyper-parameters ({', '.join(plan['select']) or 'none'}) are chosen on the '{val}' split "
             f"only, and the '{test}' split is read for the chosen ones.", "",
             f"| arm | hyper-parameters | seeds | {val} mean AUROC | {test} mean AUROC | chosen on {val} |",
             "|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        lines.append(f"| {row['arm']} | {_hp_label(row['hparams'])} | {len(row['seeds_done'])}/{n_seeds} | "
                     f"{fmt(row['val'])} | {fmt(row['test'])} | {'**chosen**' if row.get('chosen') else ''} |")
    teachers = [row["teacher_test"]["mean"] for row in summary["rows"] if row["teacher_test"]["mean"] is not None]
    if teachers:
        lines += ["", f"Teacher, {test} mean AUROC: {np.mean(teachers):.3f}."]
    if comparisons:
        lines += ["", f"Paired differences on the '{test}' split, chosen hyper-parameters, paired by seed; "
                  f"95 % interval of a bootstrap over test patients and seeds:", "",
                  "| A − B | difference | 95 % interval | per seed | share of replicates ≤ 0 |",
                  "|---|---|---|---|---|"]
        for c in comparisons:
            if "error" in c:
                lines.append(f"| {c['a']} − {c['b']} | {c['error']} | | | |")
                continue
            lo, hi = c["ci95"]
            per_seed = ", ".join(f"{d:+.3f}" for d in c["per_seed"])
            lines.append(f"| {c['a']} − {c['b']} | {c['difference']:+.3f} | {lo:+.3f} to {hi:+.3f} | "
                         f"{per_seed} | {c['p_not_above_zero']:.3f} |")
        c0 = next((c for c in comparisons if "error" not in c), None)
        if c0:
            lines += ["", f"({c0['patients']} test patients, {c0['samples']} images, {c0['reps']} replicates.)"]
    return "\n".join(lines) + "\n"


def figure(plan: dict, summary: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    val, test = plan["runs"][0]["val_split"], plan["runs"][0]["test_split"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(rows) + 2), 4.2))
    x = np.arange(len(rows))
    for off, key, marker, name in ((-0.12, "val", "o", val), (0.12, "test", "s", test)):
        mean = [r[key]["mean"] if r[key]["mean"] is not None else np.nan for r in rows]
        sd = [r[key]["sd"] or 0.0 for r in rows]
        ax.errorbar(x + off, mean, yerr=sd, fmt=marker, capsize=3, label=f"{name} (mean ± sd over seeds)")
    for i, r in enumerate(rows):
        if r.get("chosen"):
            ax.axvspan(i - 0.4, i + 0.4, color="gold", alpha=0.25, lw=0)
    teachers = [r["teacher_test"]["mean"] for r in rows if r["teacher_test"]["mean"] is not None]
    if teachers:
        ax.axhline(np.mean(teachers), ls="--", color="grey", label=f"teacher, {test}")
    ax.set_xticks(x, [f"{r['arm']}\n{_hp_label(r['hparams'])}" for r in rows], rotation=60, ha="right",
                  fontsize=7)
    ax.set_ylabel("mean AUROC")
    ax.set_title(f"sweep: chosen on {val} (shaded)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(out: Path, plan: dict, reps: int = 2000) -> dict:
    """Table, JSON and plot of the finished runs; prints the table."""
    out = Path(out)
    summary = summarise(out, plan)
    comparisons = [compare(out, plan, summary["chosen"], a, b, reps) for a, b in plan["compare"]]
    doc = {"select": plan["select"], "seeds": plan["seeds"], "rows": summary["rows"],
           "chosen": {arm: {"hparams": row["hparams"], "val": row["val"], "test": row["test"]}
                      for arm, row in summary["chosen"].items()},
           "comparisons": comparisons}
    text = markdown(plan, summary, comparisons)
    _atomic_write(out / "sweep_results.json", json.dumps(doc, indent=1))
    _atomic_write(out / "sweep.md", text)
    if any(r["val"]["mean"] is not None for r in summary["rows"]):
        fig = figure(plan, summary)
        fig.savefig(out / "sweep.part.png", dpi=110)
        os.replace(out / "sweep.part.png", out / "sweep.png")
    print(text, flush=True)
    print(f"wrote {out / 'sweep.md'}, {out / 'sweep_results.json'}, {out / 'sweep.png'}", flush=True)
    return doc
