"""Distillation step overhead: the project's DeepSpeed step against a hand-written PyTorch loop.

    python bench/distill_step.py                                  # demo config: batch 32, 64 px
    python bench/distill_step.py --steps 20 --rounds 21 --threads 1
    python bench/distill_step.py --steps 2 --rounds 1 --batch-size 4 --image-size 48   # smoke
    python bench/distill_step.py --compile --out bench/results/distill_step_compiled.json
    python bench/distill_step.py --zero-stages 0,1,2 --sync-audit 3      # stages side by side, host syncs

Both paths train the same models (an `rmsnet_xxs` student against a `resnet18` teacher loaded from
a random-init checkpoint written here) on the same pre-loaded batches with the same objective
(focal + multi-label KD + attention transfer + similarity preserving, the config's weights), in one
process, with the same number of torch threads:

* project: config -> `DistillTask` (launcher.trainer.build_task) -> `deepspeed.initialize` with the
  generated DeepSpeed JSON (the config's ZeRO stage, auto = 1, or one project path per stage of
  --zero-stages; fp32 or bf16, AdamW, WarmupCosineLR, gradient clipping; one process
  through `launcher.dist.init_distributed`) -> teacher in `deepspeed.init_inference`
  (launcher.distill.build_teacher) -> `launcher.engine.train_step`, as `Trainer.run_epoch` calls it.
* hand-written: the frozen teacher under no_grad, the student forward, the rmsnet.losses functions
  summed with the same weights, backward, `clip_grad_norm_`, `torch.optim.AdamW` with the same
  learning rate at every step (DeepSpeed's WarmupCosineLR, recomputed here), `zero_grad`. With
  --compile it is compiled, and the same loop uncompiled (`hand_eager`) is a second baseline.

Data loading is excluded from the ratio (both paths cycle through the same `--batches` batches,
read once with the project's loader) and timed on its own: the DALI (CPU-only mode) training
loader, a fresh one each round. After warm-up, `--rounds` rounds of `--steps` steps run each path in
turn (which path goes first rotates); `--split-rounds` rounds with per-phase timers are spread among
them (kept apart so their device syncs on a GPU cannot touch the throughput figure). Figures are
medians (docs/design.md, "Benchmarks").

Memory, CPU: resident set size (RSS) from /proc, after glibc's malloc_trim (so memory freed by one
path is not counted for the next): persistent growth of each path's setup plus first step, and the
peak above the resting RSS during one step (a sampling thread; glibc's mmap threshold is fixed at
128 KiB for that measurement so freed activations leave the RSS). GPU: torch.cuda allocator stats.
"""
from __future__ import annotations

import argparse
import atexit
import ctypes
import gc
import logging
import math
import os
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

from _common import REPO, RESULTS, machine, median, table, write_json
from hand_loop import warmup_cosine_lr

import torch  # noqa: E402  (after _common, which puts the repo on sys.path)

from data_pipeline.loader import build_loader  # noqa: E402
from data_pipeline.loader_common import AugmentSpec  # noqa: E402
from data_pipeline.manifest import MANIFEST, read_manifest  # noqa: E402
from launcher.config import load_config  # noqa: E402
from launcher.dist import init_distributed, shutdown  # noqa: E402
from launcher.host_syncs import HostSyncAudit, print_summary  # noqa: E402
from rmsnet.teachers import create_tapped_model  # noqa: E402
from step_paths import Paths, build_hand, build_projects, zero_stages  # noqa: E402

MiB = 2 ** 20


# ----------------------------------------------------------------------------------- memory
_LIBC = None
try:
    _LIBC = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim(0)
except (OSError, AttributeError):  # not glibc: RSS figures are then rough (freed memory is kept)
    _LIBC = None


def rss_bytes() -> int | None:
    """Current resident set size of this process, after handing freed heap memory back."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


class PeakRss:
    """Highest RSS seen (polled every 0.5 ms from a thread) while the `with` body runs."""

    def __enter__(self):
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        if self.base is not None:
            self._thread.start()
        return self

    def _poll(self):
        statm, page = Path("/proc/self/statm"), os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            self.peak = max(self.peak, int(statm.read_text().split()[1]) * page)
            time.sleep(5e-4)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def mib(n) -> float | None:
    return None if n is None else round(n / MiB, 1)


# ----------------------------------------------------------------------------------- setup
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "launcher/configs/demo_distill.yaml")
    p.add_argument("--shards", default=None,
                   help="shard directory (default: the config's data.shards when it exists); "
                        "'none' = random tensors and no data-loading figure")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=64, help="the demo's 64")
    p.add_argument("--steps", type=int, default=10, help="steps per path per round")
    p.add_argument("--rounds", type=int, default=11,
                   help="interleaved throughput rounds (short rounds, many: the load drifts)")
    p.add_argument("--split-rounds", type=int, default=3, help="interleaved rounds with phase timers")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per path")
    p.add_argument("--batches", type=int, default=4, help="distinct pre-loaded batches, cycled")
    p.add_argument("--loader-batches", type=int, default=40, help="batches timed per data-loading round")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads, both paths")
    p.add_argument("--compile", action="store_true",
                   help="both paths compiled: the project's as train.compile=on does (engine.compile(), "
                        "teacher torch.compile), the hand loop's student and teacher through torch.compile; "
                        "the first step of each (compilation included) is timed apart")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="project: train.precision and teacher.dtype; hand loop: bf16 autocast around "
                        "teacher and student forward (fp32 weights and optimizer), as a careful user writes it")
    p.add_argument("--teacher", default=None, help="teacher architecture (default: the config's), e.g. densenet121")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last images and teacher weights in both paths, and the hand loop's "
                        "student weights (the project's stay as ZeRO keeps them)")
    p.add_argument("--zero-stages", default=None,
                   help="comma-separated ZeRO stages among 0,1,2: one project path per stage, side by side "
                        "(default: the config's train.zero_stage)")
    p.add_argument("--sync-audit", type=int, default=0, metavar="N",
                   help="after the warm-up, N steps per path under launcher.host_syncs.HostSyncAudit (every "
                        "op that makes the host wait; on CUDA also torch.cuda.set_sync_debug_mode): "
                        "printed and in the JSON's host_syncs, kept out of the timed rounds")
    p.add_argument("--out", type=Path, default=RESULTS / "distill_step.json")
    a = p.parse_args(argv)
    if min(a.steps, a.rounds, a.batches, a.threads, a.batch_size) < 1 or min(a.split_rounds, a.sync_audit) < 0:
        p.error("--steps, --rounds, --batches, --threads, --batch-size must be >= 1")
    return a


def preload(cfg, shards, manifest, a, device) -> list[dict]:
    """`--batches` training batches from the project's loader (or random), cloned and on device."""
    if shards is None:
        g = torch.Generator().manual_seed(0)
        c = len(manifest["label_names"])
        batches = [{"image": torch.rand(a.batch_size, 1, a.image_size, a.image_size, generator=g),
                    "label": (torch.rand(a.batch_size, c, generator=g) < 0.2).float()}
                   for _ in range(a.batches)]
    else:
        loader = make_loader(cfg, shards, 0, device)
        batches = []
        while len(batches) < a.batches:  # a small split is read again
            for b in loader:
                if len(batches) < a.batches:
                    batches.append({"image": b["image"].clone(), "label": b["label"].clone()})
        del loader
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    return [{"image": b["image"].to(device).contiguous(memory_format=fmt), "label": b["label"].to(device)}
            for b in batches]


def make_loader(cfg, shards, epoch: int, device):
    d, x = cfg.data, cfg.data.augment
    return build_loader(shards, d.train_split, backend=d.loader, batch_size=cfg.train.batch_size_per_gpu,
                        image_size=d.image_size, train=True, rank=0, world_size=1,
                        device_id=device.index if device.type == "cuda" else None,
                        num_threads=d.num_threads, seed=cfg.run.seed, epoch=epoch,
                        augment=AugmentSpec(tuple(x.crop_scale), x.hflip, x.rotate_degrees,
                                            x.brightness, x.contrast))


def time_loading(cfg, shards, epoch: int, limit: int, device) -> dict:
    """One fresh training loader: build time, first batch (pipeline start-up), then ms per batch."""
    t0 = time.perf_counter()
    loader = make_loader(cfg, shards, epoch, device)
    built = time.perf_counter() - t0
    it = iter(loader)
    t0 = time.perf_counter()
    next(it)
    first = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    for _ in range(min(limit, len(loader) - 1)):
        next(it)
        n += 1
    dt = time.perf_counter() - t0
    del it, loader
    gc.collect()  # stop DALI's threads before the compute rounds
    return {"build_s": built, "first_batch_s": first, "batches": n,
            "ms_per_batch": dt / n * 1e3 if n else None}


def _repo_relative(path) -> str:
    """Paths inside the repository are recorded relative to it (results name no machine paths)."""
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(path)


def main(argv=None) -> int:
    a = parse_args(argv)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="distill_step_"))
    atexit.register(shutil.rmtree, work, True)  # the 45 MB teacher checkpoint
    base_cfg = load_config(a.config, [f"teacher.checkpoint={work / 'teacher.pt'}"])
    shards = a.shards if a.shards is not None else base_cfg.data.shards
    if shards in ("none", "") or not (Path(shards) / MANIFEST).is_file():
        if a.shards not in (None, "none"):
            raise SystemExit(f"error: --shards {shards}: no manifest.json")
        shards = None
    manifest = read_manifest(shards) if shards else {
        "label_names": [f"class{i}" for i in range(14)], "multilabel": True}
    classes = len(manifest["label_names"])
    warmup_total = 1 + a.warmup
    total_steps = warmup_total + a.sync_audit + (a.rounds + a.split_rounds) * a.steps + 1  # +1: the memory step
    overrides = ([f"teacher.checkpoint={work / 'teacher.pt'}", f"train.batch_size_per_gpu={a.batch_size}",
                  f"data.image_size={a.image_size}", f"train.precision={a.precision}",
                  f"teacher.dtype={a.precision}", f"run.out_dir={work}"]
                 + ([f"teacher.name={a.teacher}"] if a.teacher else [])
                 + ([f"data.shards={shards}"] if shards else []))
    cfg = load_config(a.config, overrides)
    stage = cfg.resolved_stages()[0]
    if stage.loss.hint_weight > 0 or stage.loss.sp_global_batch:
        raise SystemExit("error: the hand-written loop covers focal + KD + AT + SP (no hint, no global SP)")
    zero_stages(a, cfg)  # a bad --zero-stages fails before anything is built

    env = init_distributed()  # world 1, gloo on CPU / nccl on a GPU
    torch.set_num_threads(a.threads)  # init_distributed sets cores // local ranks; every path gets this
    info = machine()
    cuda = env.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    # The teacher checkpoint: random weights, written and strictly read back like a trained one.
    torch.manual_seed(cfg.run.seed)
    t = create_tapped_model(cfg.teacher.name, classes, in_chans=cfg.teacher.in_chans)
    torch.save(t.model.state_dict(), work / "teacher.pt")
    del t
    batches = preload(cfg, shards, manifest, a, env.device)
    mem = {"rss_start": rss_bytes(), "cuda_start": torch.cuda.memory_allocated() if cuda else None}
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def usage():
        return torch.cuda.memory_allocated() if cuda else rss_bytes()

    i = {}  # next batch index per path: every path sees the same sequence

    def first_step(name):  # compilation included; the GPU's queued work counted
        t0 = time.perf_counter()
        paths.first[name] = {k: v.item() for k, v in paths.step[name](batches[0]).items()}
        sync()
        paths.first_s[name] = time.perf_counter() - t0
        i[name] = 1

    # (a) the project path(s), (b) the hand-written loop(s): built and first-stepped in turn, so
    # each one's persistent memory is what it added.
    paths, persistent = Paths(), {}
    before = usage()
    teacher_dtype, ds_config, student_init = build_projects(paths, a, overrides, manifest, env, total_steps)
    for name in paths.projects:
        first_step(name)
        persistent[name] = None if before is None else usage() - before  # the first includes the teacher
        before = usage()
    hands = {"hand": build_hand(cfg, stage, manifest, a, env, ds_config, student_init, a.compile)}
    paths.add("hand", "hand-written torch loop" + (", compiled" if a.compile else ""),
              lambda b, timings=None: hands["hand"].step(b, timings))
    first_step("hand")
    persistent["hand"] = None if before is None else usage() - before
    if a.compile:  # the eager baseline beside the compiled one
        before = usage()
        hands["hand_eager"] = build_hand(cfg, stage, manifest, a, env, ds_config, student_init, False)
        paths.add("hand_eager", "hand-written torch loop, eager",
                  lambda b, timings=None: hands["hand_eager"].step(b, timings))
        first_step("hand_eager")
        persistent["hand_eager"] = None if before is None else usage() - before
    hand = hands["hand"]
    base_lr, schedule = ds_config["optimizer"]["params"]["lr"], ds_config["scheduler"]["params"]

    def lr_check():  # every project engine's learning rate against the hand loop's, same step count
        return [(paths.engine[p].get_lr()[0], hand.lr()) for p in paths.projects]
    lr_checks = [[(paths.engine[p].get_lr()[0], warmup_cosine_lr(1, base_lr, schedule)) for p in paths.projects],
                 lr_check()]

    def run(path, n, timings_list=None):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            timings = {} if timings_list is not None else None
            paths.step[path](batches[i[path] % len(batches)], timings)
            i[path] += 1
            if timings is not None:
                timings_list.append(timings)
        sync()
        return time.perf_counter() - t0

    for path in paths.names:
        run(path, a.warmup)
    lr_checks.append(lr_check())
    syncs = {}
    for path in paths.names if a.sync_audit else ():  # outside the timed rounds: the audit is slow
        with HostSyncAudit(dispatch=not a.compile) as audit:  # compiled: CUDA's sync debug mode only
            run(path, a.sync_audit)
        syncs[path] = audit.summary(a.sync_audit)

    print(f"{cfg.student.name} <- {cfg.teacher.name} | batch {a.batch_size} x {a.image_size} px | "
          f"{'shards ' + shards if shards else 'random tensors'} | {a.threads} threads | "
          f"{a.rounds} x {a.steps} steps per path | {env.device}"
          + (f" | compiled ({a.compile_backend})" if a.compile else "")
          + (" | channels-last" if a.channels_last else "") + f" | {a.precision}", flush=True)
    print("first step (compilation included): "
          + ", ".join(f"{p} {paths.first_s[p]:.2f} s" for p in paths.names), flush=True)
    rounds, loading = [], []
    split = {p: [] for p in paths.names}
    n = max(a.rounds, a.split_rounds)
    split_at = {j * n // a.split_rounds for j in range(a.split_rounds)}  # spread over the run
    names = paths.names
    for r in range(n):
        order = names[r % len(names):] + names[:r % len(names)]  # each path leads in turn
        if r < a.rounds:
            if shards:
                loading.append(time_loading(cfg, shards, r + 1, a.loader_batches, env.device))
            row = {"round": r, "load_1min": round(os.getloadavg()[0], 2)}
            for path in order:
                row[f"{path}_samples_per_s"] = a.steps * a.batch_size / run(path, a.steps)
            row["ratio"] = row[f"{paths.projects[0]}_samples_per_s"] / row["hand_samples_per_s"]
            rounds.append(row)
            print(f"  round {r}: " + ", ".join(f"{p} {row[p + '_samples_per_s']:.1f}" for p in names)
                  + f" samples/s; {paths.projects[0]} / hand {row['ratio']:.3f}", flush=True)
        if r in split_at:  # phase timers: kept out of the throughput rounds, but beside them
            for path in order:
                run(path, a.steps, split[path])
    lr_checks.append(lr_check())

    # Peak memory of one step per path (after the timing: this changes glibc's malloc behaviour).
    if _LIBC is not None:
        _LIBC.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, so big freed blocks leave the RSS
    step_peak, cuda_peak = {}, torch.cuda.max_memory_allocated() if cuda else None
    for path in names:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run(path, 1)
            step_peak[path] = torch.cuda.max_memory_allocated() - base
        else:
            with PeakRss() as pk:
                run(path, 1)
            step_peak[path] = None if pk.base is None else pk.peak - pk.base

    # ---------------------------------------------------------------------------- report
    sps = {p: [r[f"{p}_samples_per_s"] for r in rounds] for p in names}
    med = {p: median(sps[p]) for p in names}
    pairs = {f"{p}_over_{b}": median([r[f"{p}_samples_per_s"] / r[f"{b}_samples_per_s"] for r in rounds])
             for p in paths.projects for b in paths.baselines}  # paired per round: the rounds share the load
    main_path = paths.projects[0]
    ratio = pairs[f"{main_path}_over_hand"]
    overhead = (1 / ratio - 1) * 100  # extra time per step of the project path
    phases = ("teacher_s", "student_s", "forward_s", "backward_s", "optimizer_s")
    split_ms = {p: {k: median([t[k] for t in split[p]]) * 1e3
                    for k in phases if split[p] and k in split[p][0]} for p in names}
    load_ms = median([x["ms_per_batch"] for x in loading if x["ms_per_batch"]]) if loading else None
    rows = [[paths.label[p], med[p], a.batch_size / med[p] * 1e3, min(sps[p]), max(sps[p])] for p in names]
    print("\n" + table(["path", "samples/s (median)", "ms/step", "min", "max"], rows))
    print("\n" + table(["ratio (median of the paired rounds)"] + paths.baselines,
                       [[paths.label[p]] + [round(pairs[f"{p}_over_{b}"], 3) for b in paths.baselines]
                        for p in paths.projects]))
    best = max(sps[main_path]) / max(sps["hand"])  # the least disturbed round of each path
    print(f"\n{main_path} / hand-written = {ratio:.3f} (median of {a.rounds} paired rounds); "
          f"overhead {overhead:+.1f} % of step time (target < 5 %); best round / best round {best:.3f}")
    spread = max(max(v) / min(v) for v in sps.values())
    if spread > 1.5:
        print(f"warning: samples/s varied {spread:.1f}x between rounds (other load on the machine): "
              f"see the per-round ratios in the JSON, or run again on a quieter machine")
    if split_ms[main_path]:
        def cell(p, k):
            return split_ms[p].get(k)
        rows = [["data loading (DALI CPU, per batch; excluded above)"] + [load_ms] * len(names),
                ["teacher forward"] + [cell(p, "teacher_s") for p in names],
                ["student forward + loss"] + [cell(p, "forward_s") for p in names],
                ["student backward"] + [cell(p, "backward_s") for p in names],
                ["clip + optimizer step + zero_grad"] + [cell(p, "optimizer_s") for p in names],
                ["student total (fwd + bwd + step)"] + [cell(p, "student_s") for p in names]]
        print("\n" + table(["phase (median ms per step)"] + names, rows))
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    kind = "CUDA allocated" if cuda else "RSS"
    print("\n" + table([f"memory (MiB, {kind})", "setup + first step (persistent)", "peak during a step"],
                       [[paths.label[p], mib(persistent[p]), mib(step_peak[p])] for p in names]))
    if cuda:
        print(f"peak GPU memory of the process (torch.cuda.max_memory_allocated, every path built): "
              f"{mib(cuda_peak)} MiB")
    print(f"process peak RSS (ru_maxrss): {mib(maxrss)} MiB")
    for path in syncs:
        print_summary(syncs[path], f"\nhost syncs per step, {paths.label[path]} "
                                   f"({a.sync_audit} steps audited, launcher/host_syncs.py):")
    ref = paths.first[main_path]["loss"]
    loss_diff = max(abs(paths.first[p]["loss"] - ref) for p in names)
    print(f"first-step loss: " + ", ".join(f"{p} {paths.first[p]['loss']:.6f}" for p in names)
          + f" (max |diff| {loss_diff:.2e}); lr project/hand at steps 1, {warmup_total}, "
          f"{i['hand'] - 1}: {[[(round(x, 8), round(y, 8)) for x, y in c] for c in lr_checks]}")

    result = {
        "machine": info,
        "config": {"config": _repo_relative(a.config), "student": cfg.student.name, "teacher": cfg.teacher.name,
                   "batch_size": a.batch_size, "image_size": a.image_size, "steps": a.steps,
                   "rounds": a.rounds, "split_rounds": a.split_rounds, "warmup": a.warmup,
                   "batches": a.batches, "threads": a.threads, "data": shards or "random",
                   "compile": a.compile_backend if a.compile else False, "channels_last": a.channels_last,
                   "precision": a.precision, "zero_stages": zero_stages(a, cfg), "sync_audit_steps": a.sync_audit,
                   "device": str(env.device), "loss_weights": {k: getattr(stage.loss, k) for k in (
                       "task_weight", "kd_weight", "at_weight", "sp_weight", "temperature",
                       "focal_alpha", "focal_gamma")},
                   "deepspeed": ds_config},
        "paths": {p: paths.label[p] for p in names},
        "rounds": rounds,
        "first_step_s": {p: round(paths.first_s[p], 3) for p in names},
        "summary": {p: {"median_samples_per_s": round(med[p], 2),
                        "ms_per_step": round(a.batch_size / med[p] * 1e3, 2),
                        "min_samples_per_s": round(min(sps[p]), 2),
                        "max_samples_per_s": round(max(sps[p]), 2)} for p in names},
        "ratio": {"project_over_hand": round(ratio, 4), "overhead_pct": round(overhead, 2),
                  **{k: round(v, 4) for k, v in pairs.items()},
                  "ratio_of_medians": round(med[main_path] / med["hand"], 4),
                  "ratio_of_best_rounds": round(best, 4), "max_over_min_samples_per_s": round(spread, 2),
                  "target_overhead_pct": 5.0},
        "split_ms": {p: {k: round(v, 3) for k, v in split_ms[p].items()} for p in names},
        "data_loading": {"loader": cfg.data.loader, "num_threads": cfg.data.num_threads,
                         "median_ms_per_batch": None if load_ms is None else round(load_ms, 3),
                         "images_per_s": None if not load_ms else round(a.batch_size / load_ms * 1e3, 1),
                         "rounds": loading},
        "memory": {"kind": kind, "persistent_mib": {p: mib(persistent[p]) for p in names},
                   "step_peak_mib": {p: mib(step_peak[p]) for p in names},
                   "process_max_rss_mib": mib(maxrss),
                   "cuda_max_allocated_mib": mib(cuda_peak)},
        "host_syncs": syncs,
        "checks": {"first_step_terms": paths.first, "first_step_loss_abs_diff": loss_diff,
                   "lr_project_vs_hand": lr_checks,
                   "lr_matches": all(math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-12)
                                     for c in lr_checks for x, y in c)},
    }
    write_json(result, a.out)
    shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
