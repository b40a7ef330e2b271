"""zebra and bgpd exiting, as events: a pidfd per daemon, from the pid files FRR writes.

A daemon that is killed leaves its vty socket file behind, so inotify on FRR's run
directory sees nothing; its pidfd becomes readable the moment it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

import structlog

log = structlog.get_logger("kvmnetd.frr")

DAEMONS = ("zebra", "bgpd")


def daemon_pid(run_dir: str, name: str) -> int | None:
    """The pid in RUN_DIR/NAME.pid (FRR writes it once the daemon runs), or None."""
    try:
        with open(os.path.join(run_dir, f"{name}.pid")) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def _runs(pid: int, name: str) -> bool:
    """The process is that daemon, not another that got a stale pid file's number."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == name
    except FileNotFoundError:
        return False
    except OSError:
        return True  # a /proc we may not read proves nothing either way


class DaemonWatch:
    """Calls on_exit(name, pid) once when a watched daemon exits."""

    def __init__(self, on_exit: Callable[[str, int], None]) -> None:
        self._on_exit = on_exit
        self._armed: dict[str, tuple[int, int]] = {}  # name -> (pid, pidfd)
        self.unavailable = ""  # why pidfds cannot be had here (then nothing is armed)

    @property
    def armed(self) -> dict[str, int]:
        return {name: pid for name, (pid, _fd) in self._armed.items()}

    def arm(self, run_dir: str) -> None:
        """Watch the daemons whose pid files name a running process; a daemon that
        restarted (a new pid) is watched anew."""
        if self.unavailable:
            return
        for name in DAEMONS:
            pid = daemon_pid(run_dir, name)
            if pid is not None and self._armed.get(name, (0, -1))[0] == pid:
                continue
            self.disarm(name)
            if pid is None:
                continue
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue  # a stale pid file: the daemon's next start rewrites it
            except OSError as e:  # ENOSYS, EPERM: the slow sweep notices a dead daemon
                self.unavailable = e.strerror or str(e)
                log.info("frr.no_pidfd", error=self.unavailable)
                return
            # Checked after opening, so the pid cannot be recycled under us.
            if not _runs(pid, name):
                os.close(fd)
                continue
            self._armed[name] = (pid, fd)
            asyncio.get_running_loop().add_reader(fd, self._exited, name)

    def _exited(self, name: str) -> None:
        pid = self._armed[name][0]
        self.disarm(name)
        self._on_exit(name, pid)

    def disarm(self, name: str | None = None) -> None:
        for n in [name] if name is not None else list(self._armed):
            armed = self._armed.pop(n, None)
            if armed is None:
                continue
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(armed[1])
            os.close(armed[1])
