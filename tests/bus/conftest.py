"""Fixtures: a private system-like dbus-daemon, and a core served on it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmnetd.bus.server import ControlServer, serve
from kvmnetd.status import Lease
from tests.support.dbus import NOBODY, PrivateBus, start_bus, stop_bus
from tests.support.fakecore import FakeCore


@pytest.fixture
def scratch(scratch_dir: Path) -> str:
    # Reachable by nobody (see scratch_dir): the clients of some tests run unprivileged.
    return str(scratch_dir)


@pytest.fixture
def private_bus(scratch: str) -> Iterator[PrivateBus]:
    bus = start_bus(scratch)
    try:
        yield bus
    finally:
        stop_bus(bus)


def make_core() -> FakeCore:
    core = FakeCore()
    core.add_network("default", "nat", "virbr-kt", addresses=("192.0.2.1/24",))
    core.add_network("lab", "isolated", "br-lab", state="inactive", allow={NOBODY})
    core.add_lease("default", Lease("52:54:00:00:00:01", "192.0.2.10", "guest1", "", 1700000000))
    return core


@dataclass
class Served:
    core: FakeCore
    server: ControlServer
    bus: PrivateBus | None
    socket_path: str


@pytest.fixture
async def served(private_bus: PrivateBus, scratch: str) -> AsyncIterator[Served]:
    core = make_core()
    server = await serve(core, private_bus.address, f"{scratch}/control.sock",
                         retry_interval=0.2)
    try:
        assert await server.wait_for_bus(10), server.bus_error
        yield Served(core, server, private_bus, f"{scratch}/control.sock")
    finally:
        await server.close()
