"""Follows `nft monitor ruleset`: every changed table, chain, set or rule is a trigger.

The reconciler coalesces triggers, so no filtering beyond set elements of other
tables (which other daemons, e.g. fail2ban, may churn) is needed; elements of our own
table (the port forwards' maps) are ours to heal.
Our own applies are reported too; the pass they cause finds nothing to do.
nft runs in the daemon's network namespace (it inherits it). If it dies it is
started again with a growing delay; a restart also triggers, since changes made
while nobody listened are not reported.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import structlog

from kvmnetd.adapters.nft_run import NFT, spawn_monitor

log = structlog.get_logger("kvmnetd.nftmonitor")

FIRST_BACKOFF = 0.1
MAX_BACKOFF = 30.0
# A monitor that ran this long before dying was healthy: start again quickly.
STABLE_AFTER = 10.0
_IGNORED = ("add element ", "delete element ", "destroy element ")


def is_change(line: str, table: str | None = None) -> bool:
    """Does this monitor line change the ruleset in a way we may care about?"""
    line = line.strip()
    if line.startswith(_IGNORED):
        return table is not None and line.split()[2:4] == ["inet", table]
    return bool(line) and not line.startswith("#")


class NftMonitor:
    def __init__(self, nft: str = NFT) -> None:
        self.nft = nft
        self.table: str | None = None  # our table: its set elements count as changes
        self.events = 0
        self.restarts = 0
        self._task: asyncio.Task[None] | None = None
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def listening(self) -> bool:
        """A monitor process is running (it may still die and be started again)."""
        return self._proc is not None and self._proc.returncode is None

    async def start(self, on_change: Callable[[], None]) -> None:
        """Returns once the first monitor is listening (or has failed to start)."""
        ready = asyncio.get_running_loop().create_future()
        self._task = asyncio.ensure_future(self._run(on_change, ready))
        await ready

    async def _spawn(self) -> asyncio.subprocess.Process:
        return await spawn_monitor(self.nft)

    async def _run(self, on_change: Callable[[], None], ready: asyncio.Future[None]) -> None:
        loop = asyncio.get_running_loop()
        delay = FIRST_BACKOFF
        first = True
        while True:
            started = loop.time()
            try:
                self._proc = proc = await self._spawn()
            except OSError as e:
                log.warning("nftmonitor.spawn_failed", error=str(e))
                proc = None
            if not ready.done():
                ready.set_result(None)
            if proc is not None:
                if not first:
                    on_change()  # whatever changed while we were not listening
                first = False
                await self._follow(proc, on_change)
                err = (await proc.stderr.read()).decode().strip() if proc.stderr else ""
                rc = await proc.wait()
                log.warning("nftmonitor.exited", status=rc, error=err[-200:])
            if loop.time() - started > STABLE_AFTER:
                delay = FIRST_BACKOFF
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF)
            self.restarts += 1

    async def _follow(self, proc: asyncio.subprocess.Process,
                      on_change: Callable[[], None]) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            if is_change(line.decode(errors="replace"), self.table):
                self.events += 1
                on_change()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
