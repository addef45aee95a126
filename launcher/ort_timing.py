"""ONNX Runtime sessions and side-by-side timing, shared by launcher/export.py and launcher/int8.py.

Times are medians of repeated runs; the callables being compared take turns, so that a loaded
machine slows them alike and their ratio stays meaningful.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

THROUGHPUT_BATCH = 32
LATENCY = "latency_ms_batch1"
THROUGHPUT = f"throughput_ips_batch{THROUGHPUT_BATCH}"


def ort_session(path: Path, threads: int):
    """A CPU session with `threads` intra-op threads, one inter-op thread, all graph optimisations."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def median_times(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median wall time of each callable; the callables take turns, so they share the load."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def onnx_timing(paths: dict, image_size: int, threads: list[int], repeats: int,
                throughput_repeats: int) -> dict:
    """ONNX Runtime latency (ms, batch 1) and throughput (images/s, batch 32) of each file (name ->
    path) at each thread count (intra_op_num_threads), medians, the files timed alternately."""
    result = {key: {k: {} for k in paths} for key in (LATENCY, THROUGHPUT)}
    rng = np.random.default_rng(0)
    for n in threads:
        sessions = {k: ort_session(p, n) for k, p in paths.items()}
        for batch, reps, key in ((1, repeats, LATENCY), (THROUGHPUT_BATCH, throughput_repeats, THROUGHPUT)):
            x = rng.random((batch, 1, image_size, image_size), dtype=np.float32)
            fns = {k: (lambda s=s, x=x: s.run(["logits"], {"image": x})) for k, s in sessions.items()}
            for k, sec in median_times(fns, reps).items():
                result[key][k][str(n)] = 1000 * sec if batch == 1 else batch / sec
    return result
