"""Files kvmnetd writes: whole or not at all.

Every state, config and listing file goes through atomic_write: a reader (dnsmasq, a
restarted daemon, an admin's editor) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import os


def atomic_write(path: str, data: str | bytes, mode: int = 0o644, *,
                 durable: bool = False, owner: tuple[int, int] | None = None,
                 make_dir: bool = False) -> None:
    """Write `data` to `path` through a temporary file in the same directory and a rename.

    durable: fsync before the rename, for files that must survive a power cut (under
    /var/lib or /etc); files on /run (tmpfs) need only the rename to survive a kill.
    owner: (uid, gid) to give the file before it appears. make_dir: create the directory
    (0755) first.
    """
    directory = os.path.dirname(path) or "."
    if make_dir:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    raw = data.encode() if isinstance(data, str) else data
    # O_EXCL|O_NOFOLLOW: never write through a link someone planted at the temporary name.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, mode)
    except FileExistsError:  # left by a killed process that had our pid
        os.unlink(tmp)
        fd = os.open(tmp, flags, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask must not narrow it
            if owner is not None:
                os.fchown(fd, *owner)
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
