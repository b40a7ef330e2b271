"""Lease changes are pushed by inotify as dnsmasq writes its file, not found by a poll."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kvmnetd.adapters.dnsmasq.leases import LeaseWatcher
from kvmnetd.model.records import CoreEvent

pytestmark = pytest.mark.integration

LINE = "1900000000 52:54:00:aa:bb:01 10.0.0.50 guest1 *\n"


async def test_a_written_lease_is_reported_without_polling(tmp_path: Path) -> None:
    path = tmp_path / "nat.leases"
    path.write_text("")
    events: list[CoreEvent] = []
    got = asyncio.Event()

    def on_event(ev: CoreEvent) -> None:
        events.append(ev)
        got.set()

    watcher = LeaseWatcher(on_event)
    watcher.watch("nat", str(path))
    try:
        assert watcher._task is None, "inotify watches: no poll task"
        with path.open("a") as f:  # dnsmasq rewrites its file in place
            f.write(LINE)
        await asyncio.wait_for(got.wait(), 10)
        assert [(e.kind, e.lease.ip if e.lease else "") for e in events] == [
            ("lease-added", "10.0.0.50")]
        got.clear()
        path.write_text("")
        await asyncio.wait_for(got.wait(), 10)
        assert events[-1].kind == "lease-removed"
    finally:
        await watcher.close()
