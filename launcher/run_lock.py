"""One run directory, one writer: `run.lock` names the process that holds it.

A training run (rank 0) or an evaluation writing into a run directory creates `run.lock` with
O_CREAT | O_EXCL, holding the host, pid, the process's start time and the SLURM job id, and
refreshes its modification time every `HEARTBEAT_S` seconds from a daemon thread. A second writer
finds the file and stops with one line naming the holder. A lock is stale, and taken over, when

* its holder ran on this host and that process is gone (or the pid now belongs to a process that
  started later): a run killed with SIGKILL;
* it names the same SLURM job as ours: a requeued job, whose earlier incarnation is gone;
* its holder ran on another host and has not refreshed it for `STALE_AFTER_S` seconds.

Taking over renames the stale file aside (atomic: of two processes racing for it, one wins) and
creates a fresh one. `release()` removes the lock if it is still ours.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

LOCK = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class RunDirLocked(RuntimeError):
    """The run directory is in use by a live process."""


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def _alive_here(pid: int, started: str | None) -> bool:
    now = _proc_start(pid)
    if now is None:
        try:  # no /proc (not Linux): signal 0 tells whether the pid exists
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return started is None or now == started


def describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
            + (f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else "")
            + (f" ({holder['what']})" if holder.get("what") else ""))


class RunLock:
    def __init__(self, run_dir, what: str = ""):
        self.path = Path(run_dir) / LOCK
        self.what = what
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "proc_start": _proc_start(os.getpid()),
                   "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""), "what": what}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: dict | None = None

    # ------------------------------------------------------------------------------ acquire
    def acquire(self) -> "RunLock":
        """Hold the lock or raise RunDirLocked naming the live holder. `took_over` is set to the
        stale holder's record when its lock was taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read_holder()
                if holder is None:  # being written this instant, or vanished: look again
                    time.sleep(0.05)
                    continue
                why = self._stale(holder)
                if why is None:
                    raise self._in_use(holder) from None
                aside = self.path.with_name(f"{LOCK}.stale-{os.getpid()}")
                try:
                    os.rename(self.path, aside)  # only one of several racing processes succeeds
                except FileNotFoundError:
                    continue
                aside.unlink(missing_ok=True)
                self.took_over = dict(holder, why=why)
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(self.me, fh)
                fh.flush()
                os.fsync(fh.fileno())
            self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="run-lock")
            self._thread.start()
            return self
        raise RunDirLocked(f"{self.path}: could not take the lock (it keeps changing hands)")

    def check_free(self) -> None:
        """Raise RunDirLocked if a live process holds the lock; touch nothing (a stale lock stays)."""
        holder = self._read_holder()
        if holder is not None and self._stale(holder) is None:
            raise self._in_use(holder)

    def _in_use(self, holder: dict) -> RunDirLocked:
        return RunDirLocked(f"run directory {self.path.parent} is in use by {describe(holder)}: "
                            f"wait for it to end (lock file {self.path})")

    def _read_holder(self) -> dict | None:
        try:
            text = self.path.read_text()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
            if not isinstance(holder, dict):
                raise ValueError
            return holder
        except ValueError:  # empty or cut short: a writer killed between create and write
            return {"host": "?", "pid": None, "started": "?", "unreadable": True} if age > 5 else None

    def _stale(self, holder: dict) -> str | None:
        """Why the holder's lock is stale, or None while it may be alive."""
        if holder.get("unreadable"):
            return "an unreadable lock file"
        if holder.get("host") == self.me["host"] and isinstance(holder.get("pid"), int):
            if not _alive_here(holder["pid"], holder.get("proc_start")):
                return f"process {holder['pid']} is no longer running"
            return None
        if holder.get("slurm_job_id") and holder["slurm_job_id"] == self.me["slurm_job_id"]:
            return f"it names this SLURM job ({holder['slurm_job_id']}): a requeued job"
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return "it is gone"
        if age > STALE_AFTER_S:
            return f"not refreshed for {age:.0f} s"
        return None

    # ------------------------------------------------------------------------------ hold, release
    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        try:
            holder = json.loads(self.path.read_text())
            if holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
                self.path.unlink()
        except (OSError, ValueError):
            pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# ---------------------------------------------------------------------------------- a run over a run
RESULTS = ("final/model.pt", "best/model.pt", "metrics.json", "stages", "checkpoints")


def earlier_run(run_dir) -> str | None:
    """What an earlier run left in `run_dir` (its results or checkpoints), or None when nothing."""
    d = Path(run_dir)
    found = [r for r in RESULTS if (d / r).exists() and not ((d / r).is_dir() and not any((d / r).iterdir()))]
    if not found:
        return None
    when = datetime.fromtimestamp(max((d / r).stat().st_mtime for r in found), timezone.utc)
    return f"{', '.join(found)} (last written {when.isoformat(timespec='seconds')})"


def clear_run_dir(run_dir) -> None:
    """Remove everything in `run_dir` except the lock (for `--overwrite`)."""
    import shutil

    for p in Path(run_dir).iterdir():
        if p.name == LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def claim_run_dir(run_dir, resume: str, overwrite: bool, what: str) -> RunLock:
    """Lock `run_dir` for a run started with `--resume resume`; a new run (`none`) over an
    earlier one is refused unless `overwrite`, which clears the directory first."""
    def refuse_earlier_run():
        before = earlier_run(run_dir) if resume == "none" else None
        if before and not overwrite:
            raise RunDirLocked(f"run directory {run_dir} holds an earlier run: {before}. Continue it "
                               f"with --resume auto, choose another run.name, or replace it with "
                               f"--overwrite")
        return before

    lock = RunLock(run_dir, what)
    lock.check_free()  # a live holder is named first
    refuse_earlier_run()  # before taking a stale lock over: a refused run leaves everything as it was
    lock.acquire()
    try:
        if before := refuse_earlier_run():  # again under the lock: a run may have finished meanwhile
            clear_run_dir(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock
