"""A dnsmasq process handle and the run files next to it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
from collections import deque
from collections.abc import Callable

import structlog

log = structlog.get_logger()

Digests = tuple[str, str]


class Proc:
    """A running dnsmasq, child or adopted, watched through a pidfd (no SIGCHLD, no pid reuse)."""

    def __init__(self, pid: int, pidfd: int, network: str, stderr: int | None,
                 on_exit: Callable[[Proc], None] | None) -> None:
        self.pid, self.pidfd, self.network, self.stderr = pid, pidfd, network, stderr
        self.tail: deque[str] = deque(maxlen=5)
        self.code: int | None = None  # exit code, -N for signal N; None: unknown
        self._buf = b""
        self._on_exit = on_exit
        self._loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[None] = self._loop.create_future()
        self._loop.add_reader(pidfd, self._exit)
        if stderr is not None:
            os.set_blocking(stderr, False)
            self._loop.add_reader(stderr, self._read)

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    def _read(self) -> bool:
        """Read once; True if something came."""
        assert self.stderr is not None
        try:
            chunk = os.read(self.stderr, 65536)
        except BlockingIOError:
            return False
        except OSError:
            chunk = b""
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        if not chunk and self._buf:
            lines.append(self._buf)
            self._buf = b""
        for raw in lines:
            line = raw.decode(errors="replace").strip()
            if line:
                self.tail.append(line)
                log.warning("dnsmasq.stderr", network=self.network, pid=self.pid, line=line)
        if not chunk:
            self._loop.remove_reader(self.stderr)
            os.close(self.stderr)
            self.stderr = None
        return bool(chunk)

    def _exit(self) -> None:
        self._loop.remove_reader(self.pidfd)
        # Its last words (usually why it quit) are in the pipe by now.
        while self.stderr is not None and self._read():
            pass
        try:
            res = os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG)
            if res is not None:
                self.code = res.si_status if res.si_code == os.CLD_EXITED else -res.si_status
        except ChildProcessError:
            pass  # adopted: its parent reaps it, the exit code is not ours to see
        os.close(self.pidfd)
        self.exited.set_result(None)
        if self._on_exit is not None:
            self._on_exit(self)

    def send(self, sig: signal.Signals) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, sig)

    def detach(self) -> None:
        """Forget the process but leave it running."""
        if self.alive:
            self._loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self._on_exit = None
            self.exited.cancel()
        if self.stderr is not None:
            self._loop.remove_reader(self.stderr)
            os.close(self.stderr)
            self.stderr = None

    def describe(self) -> str:
        if self.code is None:
            what = "exited (status unknown)"
        elif self.code < 0:
            what = f"killed by signal {-self.code}"
        else:
            what = f"exit code {self.code}"
        return f"{what}: {self.tail[-1]}" if self.tail else what


def read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def read_digests(path: str) -> Digests | None:
    try:
        with open(path) as f:
            parts = f.read().split()
    except OSError:
        return None
    return (parts[0], parts[1]) if len(parts) == 2 else None


def user_can_reach(path: str, user: str) -> bool:
    """Rough check (mode bits only) that `user` can read `path` after dnsmasq drops root."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return False
    checks = [(path, 0o4)]
    d = path
    while d not in ("/", ""):
        d = os.path.dirname(d)
        checks.append((d, 0o1))
    for p, bit in checks:
        try:
            st = os.stat(p)
        except OSError:
            return False
        shift = 6 if st.st_uid == pw.pw_uid else 3 if st.st_gid == pw.pw_gid else 0
        if not (st.st_mode >> shift) & bit:
            return False
    return True
