"""Fixtures: a private system-like dbus-daemon, and the real core (over fakes) served on it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from kvmnetd import logsetup
from kvmnetd.control.server import serve
from tests.support.core import Served, served_core
from tests.support.dbus import PrivateBus, start_bus, stop_bus


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


@pytest.fixture
async def served(private_bus: PrivateBus, scratch: str) -> AsyncIterator[Served]:
    rig = await served_core(Path(scratch) / "core")
    server = await serve(rig.core, private_bus.address, f"{scratch}/control.sock",
                         retry_interval=0.2)
    try:
        assert await server.wait_for_bus(10), server.bus_error
        yield Served(rig, server, private_bus, f"{scratch}/control.sock")
    finally:
        await server.close()
        logsetup.set_level("info")  # as a SetLogLevel call may have left it
