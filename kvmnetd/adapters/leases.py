"""dnsmasq lease files: parsing, and one cheap poll loop that turns changes into events."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
from collections.abc import Callable

import structlog

from ..status import CoreEvent, Lease

log = structlog.get_logger()

POLL_INTERVAL = 0.5


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
    """Polls the lease files' stat (one task for all networks) and reports added/removed leases."""

    def __init__(self, on_event: Callable[[CoreEvent], None]) -> None:
        self._on_event = on_event
        self._files: dict[str, str] = {}
        self._stamps: dict[str, _Stamp | None] = {}
        self._known: dict[str, dict[tuple[str, str, str, str], Lease]] = {}
        self._task: asyncio.Task[None] | None = None

    def watch(self, network: str, path: str) -> None:
        """Start watching; leases already in the file count as known (no events for them)."""
        if self._files.get(network) == path:
            return
        self._files[network] = path
        self._stamps[network] = _stamp(path)
        self._known[network] = {_key(lease): lease for lease in read_leases(path)}
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

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
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def prepare_lease_file(path: str, user: str) -> None:
    """Create the lease file owned by dnsmasq's user.

    dnsmasq opens it as root before dropping privileges and keeps that descriptor,
    but owning it keeps things working should it ever be reopened (and shows whose it is).
    """
    pw = pwd.getpwnam(user)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
    try:
        st = os.fstat(fd)
        if (st.st_uid, st.st_gid) != (pw.pw_uid, pw.pw_gid):
            os.fchown(fd, pw.pw_uid, pw.pw_gid)
    finally:
        os.close(fd)
