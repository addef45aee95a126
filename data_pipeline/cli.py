"""How every command of the project ends on an error: one line, not a traceback.

Each command (build_shards, distill, evaluate, export, predict, ...) turns the errors it foresees
into `error: ...` itself. `run_cli` wraps its `main` for the rest: an exception that escapes is
printed as one `error: ...` line by the process it happened in (in a multi-rank run, the rank
that failed says which rank it is; the distributed launcher then ends the others) and the exit
status is 1. A full disk names the path and the bytes free (data_pipeline/disk.py). A rank that
fails only because another rank went away (its collective lost the peer) prints a line without
the `error:` prefix, so that the one `error:` line is the cause.

`--debug` on the command line, or `RMS_DEBUG=1` in the environment, prints the traceback before
that line.
"""
from __future__ import annotations

import os
import socket
import sys
import traceback

from data_pipeline.disk import DiskFull, disk_full, is_disk_full

DEBUG_ENV = "RMS_DEBUG"
DEBUG_HINT = f"--debug or {DEBUG_ENV}=1 shows the traceback"
PROJECT_PACKAGES = ("data_pipeline", "launcher", "rmsnet", "bench")
# how gloo, NCCL and torch's TCP store report a peer that is gone
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
             "NCCL communicator was aborted", "recvValue failed", "Socket Timeout")


def add_debug_flag(parser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help=f"print the traceback of an unforeseen error (or set {DEBUG_ENV}=1)")


def debug_wanted(argv) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")


def _rank() -> tuple[int, int]:
    """(rank, world size) of this process from the launcher's environment; (0, 1) alone."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    world = os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))
    try:
        return int(rank), int(world)
    except ValueError:
        return 0, 1


def lost_peer(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another rank ended."""
    names = {type(error).__name__} | {t.__name__ for t in type(error).__mro__}
    text = str(error)
    return bool(names & {"DistBackendError", "DistNetworkError"}) or any(p in text for p in LOST_PEER)


def error_line(error: BaseException) -> str:
    """The one line a command prints for an exception it did not foresee."""
    rank, world = _rank()
    where = f"rank {rank} of {world} on {socket.gethostname()}: " if world > 1 else ""
    if world > 1 and lost_peer(error):
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        return f"{where}stopped, another rank ended first ({type(error).__name__}: {first})"
    if is_disk_full(error) and not isinstance(error, DiskFull):
        error = disk_full(getattr(error, "filename", None) or os.getcwd())
    if isinstance(error, DiskFull) or type(error).__module__.split(".")[0] in PROJECT_PACKAGES:
        return f"error: {where}{error}"  # the project's own errors say what happened in words
    first = (str(error).strip().splitlines() or [""])[0]
    text = f"{type(error).__name__}: {first[:300]}" if first else type(error).__name__
    return f"error: {where}{text} ({DEBUG_HINT})"


def fail(error: BaseException, debug: bool = False):
    """End a command on an error it foresaw: `error: <message>` and exit status 1 (with `debug`
    (--debug) or RMS_DEBUG=1, the traceback first). Call it inside the `except` block."""
    if debug or debug_wanted([]):
        traceback.print_exc()
    raise SystemExit(f"error: {error}") from None


def run_cli(main, argv=None) -> int:
    """`main(argv)`'s exit status; an exception that escapes it is one line and status 1."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = debug_wanted(args)
    try:
        return main(argv)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # noqa: BLE001 - the point: no exception leaves as a traceback
        if debug:
            traceback.print_exc()
        print(error_line(e), file=sys.stderr, flush=True)
        return 1
