"""Find the places where a training step makes the host wait for the device.

A host sync inside the step stops the host from queueing the next kernels while the GPU finishes
the current ones; for a ~1 M-parameter student, whose step is mostly kernel launches, each one
costs throughput. Two detectors, used together by `HostSyncAudit`:

* a TorchDispatchMode that sees every operator and records those whose result the host must read
  (`_local_scalar_dense`: `.item()`, `bool(t)`, `float(t)`, `if t:`), or whose output size depends
  on the data (`nonzero`, `masked_select`, `unique`, boolean-mask indexing, `equal`). It works on
  every device, so a CPU test finds the same code sites a GPU run would sync at (not the device
  copies: on a CPU `.cpu()` is no operator at all);
* on CUDA, also `torch.cuda.set_sync_debug_mode("warn")`, which warns at every synchronising CUDA
  call (device-to-host copies, pageable host-to-device copies, stream syncs) with the Python line
  that made it.

Each record names the innermost frame outside torch (the site: our code or DeepSpeed's) and the
innermost frame of this project's code on the way to it (who called it), so a sync in DeepSpeed is
told apart from one of ours. docs/design.md ("The training step's host syncs") lists what remains.
"""
from __future__ import annotations

import sys
import traceback
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
_TORCH = Path(torch.__file__).resolve().parent
_HERE = Path(__file__).resolve()
_aten = torch.ops.aten
# Operators that copy a device value to the host, or whose output size depends on the data.
_ALWAYS = {_aten._local_scalar_dense.default: "reads a value on the host (.item(), bool(), float())",
           _aten.nonzero.default: "nonzero (data-dependent size)",
           _aten.masked_select.default: "masked_select (data-dependent size)",
           _aten._unique2.default: "unique (data-dependent size)",
           _aten.unique_dim.default: "unique (data-dependent size)",
           _aten.unique_consecutive.default: "unique_consecutive (data-dependent size)",
           _aten.equal.default: "torch.equal (reads the result on the host)"}
# torch's own frames between an operator and the code that called it (dispatch, dynamo's wrappers)
_TORCH_PLUMBING = ("torch/_dynamo/", "torch/utils/_python_dispatch.py", "torch/_ops.py", "torch/overrides.py",
                   "torch/_tensor.py", "torch/utils/_contextlib.py", "torch/_compile.py")
_BOOL_INDEX = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default}


@dataclass(frozen=True)
class Sync:
    """One kind of host sync: what, where (the site), and the project code that led there."""
    what: str
    site: str  # "path:line in function", path relative to the project or to site-packages
    owner: str  # "project", "deepspeed", "torch" or another package's top-level name
    caller: str  # the innermost project frame on the way ("" when the site is ours)
    inside: str = ""  # the torch function the site called that synced ("" when the site synced itself)
    chain: tuple[str, ...] = ()  # the project's frames on the way, "path:function", outermost first


def _where(filename: str) -> tuple[str, str]:
    """(owner, short path) of a source file."""
    p = Path(filename).resolve()
    if p.is_relative_to(REPO) and ".venv" not in p.parts and "site-packages" not in p.parts:
        return "project", str(p.relative_to(REPO))
    parts = p.parts
    if "site-packages" in parts or "dist-packages" in parts:
        i = max(i for i, x in enumerate(parts) if x in ("site-packages", "dist-packages"))
        return parts[i + 1].split(".")[0], "/".join(parts[i + 1:])
    return "other", p.name


def _chain(stack) -> tuple[str, ...]:
    """The project's frames of a stack as "path:function", outermost first."""
    out = []
    for fr in stack:
        owner, short = _where(fr.filename)
        if owner == "project" and Path(fr.filename).resolve() != _HERE:
            out.append(f"{short}:{fr.name}")
    return tuple(out)


def _frames(stack) -> tuple[str, str, str, str]:
    """(owner, site, caller, the innermost torch frame) from a traceback stack (outermost first)."""
    site, caller, inner = None, "", ""
    for fr in reversed(stack):
        p = Path(fr.filename).resolve()
        if p == _HERE or fr.filename.startswith("<"):
            continue
        if p.is_relative_to(_TORCH):
            rel = str(p.relative_to(_TORCH.parent))
            if site is None and not inner and not rel.startswith(_TORCH_PLUMBING):
                inner = f"{rel}:{fr.lineno} in {fr.name}"
            continue
        owner, short = _where(fr.filename)
        text = f"{short}:{fr.lineno} in {fr.name}"
        if site is None:
            site = (owner, text)
            if owner == "project":
                break
        elif owner == "project":
            caller = text
            break
    if site is None:
        return "torch", inner or "(inside torch)", "", ""
    return site[0], site[1], caller, inner


def _on_host(args) -> bool:
    """Whether every tensor an operator got lives in host memory (then reading it waits for nothing)."""
    tensors = [t for t in args if isinstance(t, torch.Tensor)]
    tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
    return all(t.device.type == "cpu" for t in tensors)


class _SyncMode(TorchDispatchMode):
    def __init__(self, record, cpu_tensors: bool):
        super().__init__()
        self.record, self.cpu_tensors = record, cpu_tensors

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = _ALWAYS.get(func) if (self.cpu_tensors or func in _BOOL_INDEX or not _on_host(args)) else None
        if what is None and func in _BOOL_INDEX:
            idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if (any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (idx or ()))
                    and (self.cpu_tensors or not _on_host(args))):
                what = "boolean-mask indexing (data-dependent size)"
        if what is not None:
            self.record(what, traceback.extract_stack())
        return func(*args, **kwargs)


class HostSyncAudit:
    """`with HostSyncAudit() as audit: ...` records the host syncs of the body; `audit.counts`
    maps each `Sync` to how often it happened, `audit.summary()` is a JSON-ready list.

    `cuda_debug=None` (default) adds torch.cuda.set_sync_debug_mode("warn") when CUDA is in use;
    `dispatch=False` leaves the operator detector out (around compiled code, whose graphs it would
    only see from outside). `cpu_tensors=None` (default) counts operators on host tensors only on
    a machine without CUDA, where every tensor is one and the code sites are what is looked for; on
    a GPU machine reading a CPU tensor (torch.optim's step counter, the stop flag) waits for nothing."""

    def __init__(self, cuda_debug: bool | None = None, dispatch: bool = True, cpu_tensors: bool | None = None):
        self.cuda_debug = torch.cuda.is_available() if cuda_debug is None else cuda_debug
        self.cpu_tensors = not torch.cuda.is_available() if cpu_tensors is None else cpu_tensors
        self.dispatch = dispatch
        self.counts: Counter[Sync] = Counter()

    def _record(self, what: str, stack) -> None:
        owner, site, caller, inside = _frames(stack)
        self.counts[Sync(what, site, owner, caller, inside, _chain(stack))] += 1

    def __enter__(self):
        if self.cuda_debug:
            self._warnings = warnings.catch_warnings(record=True)
            self._caught = self._warnings.__enter__()
            warnings.simplefilter("always")
            self._mode_before = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
        self._mode = _SyncMode(self._record, self.cpu_tensors) if self.dispatch else None
        if self._mode is not None:
            self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self._mode is not None:
            self._mode.__exit__(*exc)
        if self.cuda_debug:
            torch.cuda.set_sync_debug_mode(self._mode_before)
            self._warnings.__exit__(*exc)
            for w in self._caught:
                if "synchroniz" not in str(w.message):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)  # not ours: pass on
                    continue
                owner, short = _where(w.filename)
                self.counts[Sync("CUDA: " + str(w.message).split("\n")[0][:120],
                                 f"{short}:{w.lineno}", owner, "", "", ())] += 1
        return False

    def by_owner(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for s, n in self.counts.items():
            out[s.owner] += n
        return dict(out)

    def summary(self, steps: int = 1, keep=None) -> list[dict]:
        """Every kind of sync (those `keep(sync)` accepts) with its count per step (`steps` steps
        were audited), most frequent first; the same site reached by several paths is one row."""
        merged: Counter[tuple] = Counter()
        for s, n in self.counts.items():
            if keep is None or keep(s):
                merged[(s.what, s.site, s.owner, s.caller, s.inside)] += n
        return [{"what": k[0], "site": k[1], "owner": k[2], "caller": k[3], "inside": k[4],
                 "per_step": round(n / steps, 3)}
                for k, n in sorted(merged.items(), key=lambda kv: (-kv[1], kv[0][1]))]


# The training loop's per-step code, and what in it is not per-step (logging steps, checkpoints,
# validation, the first step's compile report) or not on the device (the loaders' host side).
STEP = "launcher/trainer.py:run_epoch"
NOT_STEADY = ("launcher/trainer.py:_log", "launcher/trainer.py:_check_finite", "launcher/trainer.py:_compile_done",
              "launcher/trainer.py:_check_recompiles", "launcher/engine.py:log_grad_shares",
              "launcher/checkpoints.py:save", "launcher/trainer.py:validate", "launcher/trainer.py:average_batchnorm_stats",
              "launcher/read_faults.py:__iter__")  # the last: the loader's iteration, its host side
HOST_SIDE = {"launcher/preemption.py:agreed":
             "the stop flag: a CPU tensor all-reduced over a gloo group, no device involved"}
"""Project sites that read a tensor the code keeps on the CPU by design: no host-device sync."""


def in_steady_step(s: Sync) -> bool:
    """Whether a sync happened in the per-step code of Trainer.run_epoch, outside its logging
    steps, checkpoints and validation, and outside the loaders."""
    return (STEP in s.chain and not any(c in s.chain for c in NOT_STEADY)
            and not any(c.startswith("data_pipeline/") for c in s.chain))


def host_side(row: dict) -> str | None:
    """Why a project site of a summary row is no host-device sync, or None."""
    site = row["site"].split(":")[0] + ":" + row["site"].rsplit(" in ", 1)[-1]
    return HOST_SIDE.get(site)


def print_summary(rows: list[dict], title: str, file=None) -> None:
    file = file or sys.stdout
    print(title, file=file)
    if not rows:
        print("  none", file=file)
    for r in rows:
        via = f" (from {r['caller']})" if r["caller"] else ""
        inside = f", inside {r['inside']}" if r["inside"] else ""
        why = host_side(r)
        note = f" [host side: {why}]" if why else ""
        print(f"  {r['per_step']:g}/step  [{r['owner']}] {r['site']}{via}: {r['what']}{inside}{note}", file=file)
    file.flush()


def audit_run(argv) -> dict:
    """Run launcher/distill.py's main with `argv` in this process under the audit; returns its exit
    status, its optimizer steps and the syncs of the steady-state step per optimizer step."""
    import launcher.trainer as trainer
    from launcher import distill

    calls = [0]
    step = trainer.train_step

    def counted(*a, **k):
        calls[0] += 1
        return step(*a, **k)

    trainer.train_step = counted
    try:
        with HostSyncAudit() as audit:
            rc = distill.main(argv)
    finally:
        trainer.train_step = step
    steps = max(calls[0], 1)
    rows = audit.summary(steps, keep=in_steady_step)
    return {"rc": rc, "train_steps": calls[0], "in_step": rows,
            "project_in_step": [r for r in rows if r["owner"] == "project" and not host_side(r)],
            "elsewhere_total": sum(n for s, n in audit.counts.items() if not in_steady_step(s))}


def main(argv=None) -> int:
    """python -m launcher.host_syncs [--out F.json] -- DISTILL_ARGS...: a single-process distill.py
    run (the same arguments) under the audit; prints the steady-state step's host syncs per step and
    exits 1 when the project's own code syncs there."""
    import json

    argv = list(sys.argv[1:] if argv is None else argv)
    out = None
    if argv[:1] == ["--out"] and len(argv) > 1:
        out, argv = Path(argv[1]), argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(main.__doc__)
        return 0 if argv else 2
    result = audit_run(argv)
    print_summary(result["in_step"], f"host syncs per optimizer step in Trainer.run_epoch's steady state "
                                     f"({result['train_steps']} steps audited):")
    mine = result["project_in_step"]
    print(f"of them the project's own (no host-side flag): {len(mine)}")
    if out is not None:
        out.write_text(json.dumps(result, indent=1) + "\n")
    return result["rc"] or (1 if mine else 0)


if __name__ == "__main__":
    sys.exit(main())

