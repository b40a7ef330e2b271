"""Running libvirt domains and their NICs, followed through lifecycle events.

Subscribe first, then list, so no domain falls between; on a lost connection reconnect with
backoff and list again, reporting what changed meanwhile. Every blocking libvirt call runs in a
thread; libvirt's event callbacks are dispatched on the asyncio loop (libvirtaio).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import threading
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from kvmnetd.model.domxml import (
    KVMNET_XMLNS,
    DomainEvent,
    DomainNic,
    ParsedDomain,
    parse_domain,
    parse_domain_xml,
)
from kvmnetd.plan.libvirt_networks import plan_networks

try:
    import libvirt
    import libvirtaio

    _MISSING: str | None = None
except ImportError as exc:  # optional dependency: the daemon runs without the feature
    _MISSING = f"libvirt-python not importable: {exc}"

__all__ = ["KVMNET_XMLNS", "DomainEvent", "DomainNic", "LibvirtWatcher", "parse_domain_xml"]

log = structlog.get_logger("kvmnetd.libvirt")

RECONNECT_MIN = 0.5
NET_RETRY = 5.0  # seconds before a failed network action is tried again
KEEPALIVE = (5, 3)  # seconds between probes, probes missed before the connection counts as dead
_LIFECYCLE_STARTED = (2, 4)  # VIR_DOMAIN_EVENT_STARTED, _RESUMED
_LIFECYCLE_STOPPED = (5, 8)  # VIR_DOMAIN_EVENT_STOPPED, _CRASHED
_SHUTDOWN, _SHUTDOWN_FINISHED = 6, 0


class _LoopBridge:
    """libvirt's event-loop hooks, safe to call from any thread.

    libvirt calls them from whichever thread runs an API call (that thread also reads incoming
    events while it waits for its reply), but libvirtaio touches asyncio objects, which only the
    loop's thread may do. Calls from other threads are queued to the loop, in order; ids are
    handed out at once so libvirt never waits for the loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._queue: collections.deque[Callable[[], None]] = collections.deque()
        self.bind(loop)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        # One registration per process, but tests run one loop after another.
        self.loop = loop
        self._thread = threading.get_ident()
        self._impl = libvirtaio.virEventAsyncIOImpl(loop=loop)
        self._real: dict[int, int] = {}
        with self._lock:
            self._queue.clear()  # left by a loop that stopped: they name dead connections' fds

    def register(self) -> None:
        libvirt.virEventRegisterImpl(self._add_handle, self._update_handle, self._remove_handle,
                                     self._add_timeout, self._update_timeout, self._remove_timeout)

    def _run(self, op: Callable[[], None]) -> None:
        with self._lock:
            self._queue.append(op)
        if threading.get_ident() == self._thread:
            self._drain()
        else:
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    return
                op = self._queue.popleft()
            op()

    def _add_handle(self, fd: int, event: int, cb: Any, opaque: Any) -> int:
        ours = next(self._ids)

        def add() -> None:
            self._real[ours] = self._impl._add_handle(
                fd, event, lambda _w, f, e, o: cb(ours, f, e, o), opaque)

        self._run(add)
        return ours

    def _update_handle(self, watch: int, event: int) -> None:
        self._run(lambda: self._with(watch, lambda real: self._impl._update_handle(real, event)))

    def _remove_handle(self, watch: int) -> int:
        self._run(lambda: self._with(watch, self._impl._remove_handle, remove=True))
        return 0

    def _add_timeout(self, timeout: int, cb: Any, opaque: Any) -> int:
        ours = next(self._ids)

        def add() -> None:
            self._real[ours] = self._impl._add_timeout(timeout, lambda _t, o: cb(ours, o), opaque)

        self._run(add)
        return ours

    def _update_timeout(self, timer: int, timeout: int) -> None:
        self._run(lambda: self._with(timer, lambda real: self._impl._update_timeout(real, timeout)))

    def _remove_timeout(self, timer: int) -> int:
        self._run(lambda: self._with(timer, self._impl._remove_timeout, remove=True))
        return 0

    def _with(self, ours: int, fn: Callable[[int], Any], remove: bool = False) -> None:
        real = self._real.pop(ours, None) if remove else self._real.get(ours)
        if real is not None:
            fn(real)


_bridge: _LoopBridge | None = None


def _event_loop_ready(loop: asyncio.AbstractEventLoop) -> None:
    """libvirt's event implementation must be in place before the first connection opens."""
    global _bridge
    if _bridge is None:
        _bridge = _LoopBridge(loop)
        _bridge.register()
        # libvirt prints every error to stderr by default; ours are logged where handled.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    elif _bridge.loop is not loop:
        _bridge.bind(loop)


class _ConnectionLost(Exception):
    pass


class LibvirtWatcher:
    """Reports domains starting and stopping, with their NICs, to `on_event` (on the loop)."""

    def __init__(self, uri: str, on_event: Callable[[DomainEvent], None],
                 reconnect_max: float = 10.0,
                 networks: Callable[[], Mapping[str, str]] | None = None) -> None:
        self.uri = uri
        self.reconnect_max = max(reconnect_max, RECONNECT_MIN)
        self.connected = False
        self.available = _MISSING is None
        self._on_event = on_event
        self._running: dict[str, DomainEvent] = {}  # by UUID: names can be reused
        self._task: asyncio.Task[None] | None = None
        self._outage_logged = False
        # Network name -> bridge that libvirt should list (None: leave libvirt's networks be).
        self._networks = networks
        self._net_dirty = asyncio.Event()
        self.clashes: list[str] = []  # foreign libvirt networks named like ours
        self.net_syncs = 0  # completed syncs, for tests and status

    async def start(self) -> None:
        """Returns at once; connecting (and retrying) happens in a background task."""
        if _MISSING is not None:
            log.warning("libvirt.unavailable", reason=_MISSING, uri=self.uri)
            return
        if self._task is None:
            _event_loop_ready(asyncio.get_running_loop())
            self._task = asyncio.create_task(self._supervise(), name="libvirt-watcher")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def networks_changed(self) -> None:
        """The desired networks changed: sync libvirt's (now, or once connected)."""
        self._net_dirty.set()

    def running(self) -> list[DomainEvent]:
        """The domains last known to run."""
        return list(self._running.values())

    # -- connection --------------------------------------------------------------------------

    async def _supervise(self) -> None:
        delay = 0.0  # the first try, and the first after a loss, go at once
        while True:
            if delay:
                await asyncio.sleep(delay)
            try:
                conn = await asyncio.to_thread(self._open)
            except libvirt.libvirtError as exc:
                self._unavailable(_message(exc))
                delay = min(max(delay * 2, RECONNECT_MIN), self.reconnect_max)
                continue
            try:
                await self._follow(conn)
                delay = 0.0
            except Exception:  # a bug here must not end the watching for good
                log.exception("libvirt.watcher_failed", uri=self.uri)
                delay = self.reconnect_max

    def _open(self) -> Any:
        conn = libvirt.open(self.uri)
        with contextlib.suppress(libvirt.libvirtError):  # not every driver has keepalive
            conn.setKeepAlive(*KEEPALIVE)
        return conn

    def _unavailable(self, reason: str) -> None:
        if not self._outage_logged:
            self._outage_logged = True
            log.warning("libvirt.unavailable", reason=reason, uri=self.uri)
        else:
            log.debug("libvirt.retry_failed", reason=reason, uri=self.uri)

    async def _follow(self, conn: Any) -> None:
        """Subscribe, list, then follow events until the connection is lost."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[Any, int, int]] = asyncio.Queue()
        lost = asyncio.Event()

        # libvirt may call these from a worker thread: hop to the loop.
        def on_close(_conn: Any, reason: int, _opaque: Any) -> None:
            loop.call_soon_threadsafe(lost.set)
            log.debug("libvirt.close_callback", reason=reason)

        def on_lifecycle(_conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (dom, event, detail))

        def on_network(_conn: Any, _net: Any, _event: int, _detail: int, _opaque: Any) -> None:
            loop.call_soon_threadsafe(self._net_dirty.set)

        def subscribe() -> tuple[int, int | None]:
            conn.registerCloseCallback(on_close, None)
            dom_id = int(conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle, None))
            net_id = None
            if self._networks is not None:
                net_id = int(conn.networkEventRegisterAny(
                    None, libvirt.VIR_NETWORK_EVENT_ID_LIFECYCLE, on_network, None))
            return dom_id, net_id

        callback_id: int | None = None
        net_callback: int | None = None
        consumer: asyncio.Task[None] | None = None
        syncer: asyncio.Task[None] | None = None
        try:
            callback_id, net_callback = await asyncio.to_thread(subscribe)
            await self._resync(conn)
            if self._networks is not None:
                # Whatever happened while we were away: look again now.
                self._net_dirty.set()
                syncer = asyncio.create_task(self._sync_networks(conn), name="libvirt-networks")
            # Connected means in step too: running() is current from here on.
            self.connected, self._outage_logged = True, False
            log.info("libvirt.connected", uri=self.uri, running=len(self._running))
            consumer = asyncio.create_task(self._consume(conn, events), name="libvirt-events")
            waiter = asyncio.create_task(lost.wait())
            tasks = {consumer, waiter} | ({syncer} if syncer else set())
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            for task in (consumer, syncer):
                if task is not None and task.done():
                    task.result()  # raises what ended it
        except (_ConnectionLost, libvirt.libvirtError) as exc:
            log.debug("libvirt.connection_error", reason=_message(exc))
        finally:
            was_connected, self.connected = self.connected, False
            for task in (consumer, syncer):
                if task is not None:
                    task.cancel()
            await asyncio.shield(asyncio.to_thread(_release, conn, callback_id, net_callback))
        if was_connected:
            log.warning("libvirt.disconnected", uri=self.uri)
        else:
            self._unavailable("connection lost while subscribing")

    # -- networks ---------------------------------------------------------------------------

    async def _sync_networks(self, conn: Any) -> None:
        """Make libvirt's networks match ours, whenever asked or libvirt reports a change.

        Our own changes come back as events and cause one more look, which finds nothing to do.
        """
        from kvmnetd.adapters.libvirt.networks import apply, list_networks

        assert self._networks is not None
        while True:
            await self._net_dirty.wait()
            self._net_dirty.clear()
            desired = dict(self._networks())
            try:
                seen = await asyncio.to_thread(list_networks, conn)
                actions, clashes = plan_networks(desired, seen)
                if clashes != self.clashes:
                    for name in clashes:
                        log.warning("libvirt.network_clash", network=name,
                                    hint="a libvirt network not defined by kvmnetd has this name")
                self.clashes = clashes
                failed = await asyncio.to_thread(apply, conn, actions) if actions else []
                if failed:
                    # Failed ones are tried again later, as any other drift.
                    asyncio.get_running_loop().call_later(NET_RETRY, self._net_dirty.set)
            except libvirt.libvirtError as exc:
                if not await asyncio.to_thread(conn.isAlive):
                    raise _ConnectionLost(_message(exc)) from None
                log.warning("libvirt.network_sync_failed", reason=_message(exc))
            self.net_syncs += 1

    # -- domains -----------------------------------------------------------------------------

    async def _resync(self, conn: Any) -> None:
        """Report what changed while we were not listening: stops first, then starts."""
        now = {d.uuid: d for d in await asyncio.to_thread(self._list_running, conn)}
        for uuid in [u for u in self._running if u not in now]:
            self._stopped(uuid)
        for dom in now.values():
            self._started(dom.name, dom.uuid, dom.nics)

    def _list_running(self, conn: Any) -> list[ParsedDomain]:
        found = []
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            parsed = self._read(conn, dom)
            if parsed is not None:
                found.append(parsed)
        return found

    def _read(self, conn: Any, dom: Any) -> ParsedDomain | None:
        """The live XML parsed, or None if the domain is gone. Blocking: call in a thread."""
        try:
            xml = dom.XMLDesc(0)
        except libvirt.libvirtError as exc:
            if not conn.isAlive():
                raise _ConnectionLost(_message(exc)) from None
            if exc.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN,
                                             libvirt.VIR_ERR_OPERATION_INVALID):
                log.warning("libvirt.domain_xml_failed", domain=dom.name(), reason=_message(exc))
            return None
        try:
            parsed = parse_domain(xml)
        except ValueError as exc:
            log.warning("libvirt.domain_xml_invalid", domain=dom.name(), reason=str(exc))
            return None
        return parsed if parsed.live else None  # stopped after the event: its stop is queued

    async def _consume(self, conn: Any, events: asyncio.Queue[tuple[Any, int, int]]) -> None:
        # One at a time, in order: a stop is never reported before the start it follows.
        while True:
            dom, event, detail = await events.get()
            uuid = dom.UUIDString().lower()  # name and UUID are local: no round trip
            if event in _LIFECYCLE_STARTED:
                parsed = await asyncio.to_thread(self._read, conn, dom)
                if parsed is not None:
                    self._started(parsed.name, parsed.uuid or uuid, parsed.nics)
            elif event in _LIFECYCLE_STOPPED or (event, detail) == (_SHUTDOWN, _SHUTDOWN_FINISHED):
                self._stopped(uuid)

    def _started(self, name: str, uuid: str, nics: tuple[DomainNic, ...]) -> None:
        ev = DomainEvent(name, uuid, True, nics)
        if self._running.get(uuid) == ev:
            return  # seen already (an event replayed after the listing, or a resume)
        self._running[uuid] = ev
        log.info("libvirt.domain_started", domain=name, uuid=uuid,
                 ifname=",".join(n.tap for n in nics if n.tap))
        self._emit(ev)

    def _stopped(self, uuid: str) -> None:
        known = self._running.pop(uuid, None)
        if known is None:
            return  # never reported as running: nothing to take back
        log.info("libvirt.domain_stopped", domain=known.name, uuid=uuid,
                 ifname=",".join(n.tap for n in known.nics if n.tap))
        self._emit(DomainEvent(known.name, uuid, False, known.nics))

    def _emit(self, ev: DomainEvent) -> None:
        try:
            self._on_event(ev)
        except Exception:
            log.exception("libvirt.callback_failed", domain=ev.name)


def _release(conn: Any, callback_id: int | None, net_callback: int | None = None) -> None:
    # On a dead connection each step may fail; all that matters is that the next one runs.
    if callback_id is not None:
        with contextlib.suppress(libvirt.libvirtError):
            conn.domainEventDeregisterAny(callback_id)
    if net_callback is not None:
        with contextlib.suppress(libvirt.libvirtError):
            conn.networkEventDeregisterAny(net_callback)
    with contextlib.suppress(libvirt.libvirtError):
        conn.unregisterCloseCallback()
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()


def _message(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__
