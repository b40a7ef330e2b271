"""LibvirtWatcher against a real, private libvirtd (own network and mount namespace, tmp state).

The watcher runs in the test process and needs only libvirtd's socket; the guests are TCG
qemus that boot nothing. Run with -s to see the measured latencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from structlog.testing import capture_logs

import kvmnetd.adapters.libvirt.watcher as lvmod
from kvmnetd.adapters.libvirt.watcher import KVMNET_XMLNS, DomainEvent, LibvirtWatcher
from tests.support.libvirtd import Libvirtd, bridge_nic, domain_xml, ethernet_nic, private_libvirtd

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAC1, MAC2, MAC3 = "52:54:00:aa:00:01", "52:54:00:aa:00:02", "52:54:00:aa:00:03"


class Seen:
    """The watcher's callback: records events, when they came, and on which thread."""

    def __init__(self) -> None:
        self.events: list[tuple[float, DomainEvent]] = []
        self.threads: set[int] = set()

    def __call__(self, ev: DomainEvent) -> None:
        self.events.append((time.monotonic(), ev))
        self.threads.add(threading.get_ident())

    async def first(self, pred: Callable[[DomainEvent], bool], after: int = 0,
                    timeout: float = 30) -> tuple[float, DomainEvent]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, ev in self.events[after:]:
                if pred(ev):
                    return at, ev
            await asyncio.sleep(0.01)
        raise AssertionError(f"no matching event within {timeout}s; seen: {self.events}")


async def until(cond: Callable[[], bool], timeout: float = 30) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
    return time.monotonic()


@pytest.fixture
def timings() -> list[str]:
    return []


@pytest.fixture
def lvd(capfd: pytest.CaptureFixture[str], timings: list[str]) -> Iterator[Libvirtd]:
    with private_libvirtd() as daemon:
        yield daemon
    with capfd.disabled():  # seen with -s
        for line in timings:
            print(f"\nlibvirt timing: {line}")
    # libvirt prints (and otherwise ignores) exceptions raised in its event-loop hooks.
    assert "Traceback" not in capfd.readouterr().err


@contextlib.asynccontextmanager
async def watching(uri: str, seen: Seen, reconnect_max: float = 1.0
                   ) -> AsyncIterator[LibvirtWatcher]:
    asyncio.get_running_loop().set_debug(True)  # asyncio objects touched off-thread now raise
    w = LibvirtWatcher(uri, seen, reconnect_max=reconnect_max)
    t0 = time.monotonic()
    await w.start()
    assert time.monotonic() - t0 < 0.1  # connecting happens in the background
    try:
        yield w
    finally:
        await w.close()
        assert not w.connected


async def create(lvd: Libvirtd, xml: str) -> float:
    """`virsh create` off the loop (events keep flowing meanwhile); returns when it returned."""
    await asyncio.to_thread(lvd.create, xml)
    return time.monotonic()


async def test_ethernet_guest_start_and_stop(lvd: Libvirtd, caplog: pytest.LogCaptureFixture,
                                             timings: list[str]) -> None:
    asyncio.get_running_loop().slow_callback_duration = 0.05
    caplog.set_level(logging.WARNING, logger="asyncio")
    seen = Seen()
    t0 = time.monotonic()
    async with watching(lvd.uri, seen) as w:
        connected_at = await until(lambda: w.connected)
        lvd.sh("ip", "tuntap", "add", "kvt0", "mode", "tap")
        called = time.monotonic()
        returned = await create(lvd, domain_xml("g1", ethernet_nic("kvt0", MAC1)))
        at, ev = await seen.first(lambda e: e.name == "g1" and e.started)
        (nic,) = ev.nics
        assert (nic.tap, nic.mac, nic.kind, nic.bridge, nic.network) == (
            "kvt0", MAC1, "ethernet", None, None)
        assert [e.name for e in w.running()] == ["g1"]
        timings.append(f"connected {1000 * (connected_at - t0):.0f} ms after start(); "
              f"`virsh create` took {1000 * (returned - called):.0f} ms, started event "
              f"{1000 * (at - called):.0f} ms after the call, {1000 * (at - returned):+.0f} ms "
              "after it returned")

        n = len(seen.events)
        await asyncio.to_thread(lvd.virsh, "destroy", "g1")
        returned = time.monotonic()
        at, stopped = await seen.first(lambda e: e.name == "g1" and not e.started, after=n)
        assert stopped.nics == ev.nics and stopped.uuid == ev.uuid
        assert w.running() == []
        timings.append(f"stopped event {1000 * (at - returned):+.0f} ms after `virsh destroy`")
        await asyncio.sleep(0.3)
        assert [e.started for _, e in seen.events] == [True, False]  # no duplicates
    assert seen.threads == {threading.get_ident()}  # delivered on the loop's thread
    slow = [r.getMessage() for r in caplog.records if "took" in r.getMessage()]
    assert not slow, slow  # nothing blocked the loop
    # libvirt prints (and otherwise ignores) exceptions raised in its event-loop hooks.


async def test_domain_running_before_the_watcher_is_resynced(lvd: Libvirtd) -> None:
    lvd.sh("ip", "tuntap", "add", "kvt1", "mode", "tap")
    await create(lvd, domain_xml("early", ethernet_nic("kvt1", MAC2)))
    seen = Seen()
    async with watching(lvd.uri, seen) as w:
        _, ev = await seen.first(lambda e: e.name == "early")
        assert ev.started and ev.nics[0].tap == "kvt1" and ev.nics[0].mac == MAC2
        assert w.connected and [e.uuid for e in w.running()] == [ev.uuid]


async def test_bridge_interface_with_our_metadata(lvd: Libvirtd) -> None:
    lvd.sh("ip", "link", "add", "brk0", "type", "bridge")
    lvd.sh("ip", "link", "set", "brk0", "up")
    meta = (f"<metadata><kvmnet:network xmlns:kvmnet='{KVMNET_XMLNS}'>lab</kvmnet:network>"
            "</metadata>")
    xml = domain_xml("br1", bridge_nic("brk0", MAC3)).replace("<devices>", meta + "<devices>")
    seen = Seen()
    async with watching(lvd.uri, seen):
        await create(lvd, xml)
        _, ev = await seen.first(lambda e: e.name == "br1" and e.started)
        (nic,) = ev.nics
        assert (nic.kind, nic.bridge, nic.mac, nic.network) == ("bridge", "brk0", MAC3, "lab")
        assert nic.tap.startswith("vnet")  # libvirt made and enslaved this tap itself
        assert "master brk0" in lvd.sh("ip", "link", "show", nic.tap)


async def test_libvirtd_restart(lvd: Libvirtd, timings: list[str]) -> None:
    for tap in ("kvt2", "kvt3"):
        lvd.sh("ip", "tuntap", "add", tap, "mode", "tap")
    await create(lvd, domain_xml("gone", ethernet_nic("kvt2", MAC1)))
    seen = Seen()
    async with watching(lvd.uri, seen, reconnect_max=1.0) as w:
        _, gone = await seen.first(lambda e: e.name == "gone")
        await until(lambda: w.connected)

        killed = time.monotonic()
        await asyncio.to_thread(lvd.stop)
        lost_at = await until(lambda: not w.connected, timeout=10)
        # While libvirtd is down its guest dies: only the resync after reconnecting can tell.
        os.kill(lvd.qemu_pid("gone"), signal.SIGKILL)
        n = len(seen.events)
        await asyncio.sleep(1.5)  # let the backoff grow past its first step
        up_in = await asyncio.to_thread(lvd.start)
        answering = time.monotonic()
        back_at = await until(lambda: w.connected, timeout=15)
        _, ev = await seen.first(lambda e: e.name == "gone" and not e.started, after=n)
        assert ev.nics == gone.nics and w.running() == []
        timings.append(f"loss seen {1000 * (lost_at - killed):.0f} ms after the kill; "
              f"libvirtd answering {up_in * 1000:.0f} ms after its restart, watcher connected "
              f"{1000 * (back_at - answering):.0f} ms later (backoff, reconnect_max 1 s)")

        returned = await create(lvd, domain_xml("after", ethernet_nic("kvt3", MAC2)))
        at, ev = await seen.first(lambda e: e.name == "after" and e.started)
        assert ev.nics[0].tap == "kvt3"
        timings.append(f"after reconnect, started event {1000 * (at - returned):+.0f} ms "
              "after `virsh create` returned")


async def test_unreachable_at_start_logs_once_and_connects_later() -> None:
    with private_libvirtd(started=False) as lvd:
        seen = Seen()
        with capture_logs() as logs:
            async with watching(lvd.uri, seen, reconnect_max=0.5) as w:
                await asyncio.sleep(1.6)  # several tries
                assert not w.connected and w.available
                await asyncio.to_thread(lvd.start)
                await until(lambda: w.connected, timeout=10)
        events = [e["event"] for e in logs if e["log_level"] != "debug"]
        assert events.count("libvirt.unavailable") == 1
        assert "libvirt.connected" in events


async def test_without_the_binding_the_watcher_only_logs(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    monkeypatch.setattr(lvmod, "_MISSING", "libvirt-python not importable: test")
    seen = Seen()
    with capture_logs() as logs:
        w = LibvirtWatcher("qemu:///system", seen)
        await w.start()
        await asyncio.sleep(0.05)
        assert not w.available and not w.connected and w.running() == []
        await w.close()
    assert [e["event"] for e in logs] == ["libvirt.unavailable"]
