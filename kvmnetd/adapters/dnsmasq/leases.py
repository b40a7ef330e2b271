"""dnsmasq lease files: parsing, and a watcher that turns their changes into events."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import stat
from collections.abc import Callable

import structlog

from kvmnetd.adapters.inotify import DirWatch
from kvmnetd.model.records import CoreEvent, Lease

log = structlog.get_logger()

POLL_INTERVAL = 0.5  # only where inotify is not available


def _field(value: str) -> str:
    return "" if value == "*" else value


def parse_leases(text: str) -> list[Lease]:
    """Lines: `expiry mac ip hostname clientid` (v4) or `expiry iaid ip hostname duid` (v6,
    after a `duid ...` line). '*' means none; expiry 0 means infinite."""
    out: list[Lease] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4 or parts[0] == "duid" or not parts[0].isdigit():
            continue
        expiry, second, ip, host = parts[:4]
        client = parts[4] if len(parts) > 4 else "*"
        v6 = ":" in ip
        out.append(Lease(
            mac="" if v6 else second.lower(),
            ip=ip,
            hostname=_field(host),
            client_id=_field(client),
            expires=int(expiry),
        ))
    return out


def read_leases(path: str) -> list[Lease]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_leases(f.read())
    except FileNotFoundError:
        return []


def _key(lease: Lease) -> tuple[str, str, str, str]:
    # Renewals only move the expiry; they are not a new lease.
    return (lease.mac, lease.ip, lease.hostname, lease.client_id)


_Stamp = tuple[int, int, int]


def _stamp(path: str) -> _Stamp | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class LeaseWatcher:
    """Reports added/removed leases as dnsmasq writes its lease files: inotify on their
    directories wakes it; without inotify, one task polls every file's stat."""

    def __init__(self, on_event: Callable[[CoreEvent], None]) -> None:
        self._on_event = on_event
        self._files: dict[str, str] = {}
        self._stamps: dict[str, _Stamp | None] = {}
        self._known: dict[str, dict[tuple[str, str, str, str], Lease]] = {}
        self._task: asyncio.Task[None] | None = None
        self._inotify: DirWatch | None = None
        self._check_due = False

    def watch(self, network: str, path: str) -> None:
        """Start watching; leases already in the file count as known (no events for them)."""
        if self._files.get(network) == path:
            return
        self._files[network] = path
        evented = self._watch_dir(os.path.dirname(path) or ".")
        self._stamps[network] = _stamp(path)
        self._known[network] = {_key(lease): lease for lease in read_leases(path)}
        if not evented and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run())

    def _watch_dir(self, directory: str) -> bool:
        """Watched by inotify from now on (added before the file is first read, so no
        change falls between); False where inotify cannot be had."""
        try:
            if self._inotify is None:
                self._inotify = DirWatch(self._changed)
                asyncio.get_running_loop().add_reader(self._inotify.fd, self._inotify.readable)
            self._inotify.add(directory)
            return True
        except OSError as e:
            log.warning("dnsmasq.lease_watch_polling", error=str(e))
            return False

    def _changed(self, _directory: str, _name: str) -> None:
        # A burst of writes makes one look at the files (cheap when unchanged: a stat).
        if not self._check_due:
            self._check_due = True
            asyncio.get_running_loop().call_soon(self._check_now)

    def _check_now(self) -> None:
        self._check_due = False
        try:
            self.check()
        except OSError as e:
            log.warning("dnsmasq.lease_check_failed", error=str(e))

    def unwatch(self, network: str) -> None:
        self._files.pop(network, None)
        self._stamps.pop(network, None)
        self._known.pop(network, None)

    def check(self) -> None:
        """One poll round; also called directly by tests."""
        for network, path in list(self._files.items()):
            stamp = _stamp(path)
            if stamp == self._stamps.get(network):
                continue
            self._stamps[network] = stamp
            current = {_key(lease): lease for lease in read_leases(path)}
            known = self._known.get(network, {})
            self._known[network] = current
            for key in known.keys() - current.keys():
                self._emit(CoreEvent(kind="lease-removed", network=network, lease=known[key]))
            for key in current.keys() - known.keys():
                self._emit(CoreEvent(kind="lease-added", network=network, lease=current[key]))

    def _emit(self, event: CoreEvent) -> None:
        log.info(f"dnsmasq.{event.kind}", network=event.network,
                 ip=event.lease.ip if event.lease else "",
                 mac=event.lease.mac if event.lease else "")
        try:
            self._on_event(event)
        except Exception:
            log.exception("dnsmasq.event_handler_failed", network=event.network)

    async def _run(self) -> None:
        while self._files:
            await asyncio.sleep(POLL_INTERVAL)
            try:
                self.check()
            except OSError as e:
                log.warning("dnsmasq.lease_poll_failed", error=str(e))

    async def close(self) -> None:
        if self._inotify is not None:
            asyncio.get_running_loop().remove_reader(self._inotify.fd)
            self._inotify.close()
            self._inotify = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


LEASE_MODE = 0o664


def prepare_lease_file(path: str, user: str) -> None:
    """Make the lease file owned by dnsmasq's user, group root, mode 0664.

    Under the unit the daemon and dnsmasq run as root without CAP_DAC_OVERRIDE: root then
    reaches a file of another user only through the group or other bits. dnsmasq opens the
    file before dropping to its user, and the daemon reads it, both through group root;
    dnsmasq's user owns it, so it can also reopen it after the drop.
    """
    pw = pwd.getpwnam(user)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     LEASE_MODE)
        try:
            os.fchmod(fd, LEASE_MODE)
            os.fchown(fd, pw.pw_uid, 0)
        finally:
            os.close(fd)
        return
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"{path} is not a regular file")
    if (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (pw.pw_uid, 0, LEASE_MODE):
        return
    # Left by an older version or another user. Without CAP_FOWNER root may chmod only
    # its own files: take it back first (CAP_CHOWN), then hand it over.
    os.chown(path, 0, 0, follow_symlinks=False)
    os.chmod(path, LEASE_MODE)  # a regular file (checked above) in a directory only root writes
    os.chown(path, pw.pw_uid, 0, follow_symlinks=False)
