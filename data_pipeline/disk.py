"""Writing files so that a failure loses nothing and leaves nothing half-written, and a full disk
reads as one line.

`write_atomic` writes `<name>.part` and renames it into place: a reader sees the old file or the
new one. On any failure the `.part` is removed. `DiskFull` is the error a build or a run reports
when the device is full (errno ENOSPC): it names the path, the bytes free there and, when the
writer can tell, the bytes still needed.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


class DiskFull(ValueError):
    """No space left on the device being written: the message names the path and the bytes."""


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


# torch.save's zip writer reports a short write as a RuntimeError, not an OSError
TORCH_SHORT_WRITE = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")


def out_of_space(error: BaseException, path: Path, margin: int = 64 << 20) -> bool:
    """Whether writing under `path` failed for want of space: ENOSPC/EDQUOT, or torch.save's
    short write with less than `margin` bytes left there."""
    if is_disk_full(error):
        return True
    if isinstance(error, RuntimeError) and any(p in str(error) for p in TORCH_SHORT_WRITE):
        free = free_bytes(path)
        return free is not None and free < margin
    return False


def free_bytes(path: Path) -> int | None:
    """Bytes free on the file system holding `path` (its nearest existing parent), or None."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def disk_full(path: Path, needed: int | None = None, what: str = "") -> DiskFull:
    """The DiskFull error for a write to `path` that found the device full."""
    free = free_bytes(path)
    parts = [f"{free:,} bytes free there" if free is not None else None,
             f"about {needed:,} more bytes needed{what}" if needed else None]
    detail = "; ".join(p for p in parts if p)
    return DiskFull(f"{path}: no space left on the device" + (f" ({detail})" if detail else ""))


def write_atomic(path: Path, data: str | bytes, fsync: bool = False) -> None:
    """Write `data` to `path` through `<name>.part` and a rename; the part is removed on failure
    (a full disk raises DiskFull naming `path`)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            size = len(data.encode() if isinstance(data, str) else data)
            raise disk_full(path, size) from None
        raise
