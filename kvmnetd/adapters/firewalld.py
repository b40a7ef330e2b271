"""Follow firewalld on the system bus: after it reloads (or restarts) our rules are checked.

firewalld's reload rebuilds its own rules and, with the iptables backend, the chains
our coexistence accepts live in; so each reload triggers a re-read of the ruleset.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import structlog
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

log = structlog.get_logger("kvmnetd.firewalld")

FIREWALLD = "org.fedoraproject.FirewallD1"
RELOADED = f"type='signal',sender='{FIREWALLD}',interface='{FIREWALLD}',member='Reloaded'"
OWNER = ("type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
         f"member='NameOwnerChanged',arg0='{FIREWALLD}'")


class FirewalldWatcher:
    def __init__(self, bus_address: str | None, on_change: Callable[[str], None],
                 retry: float = 2.0) -> None:
        self.bus_address = bus_address
        self.on_change = on_change
        self.retry = retry
        self.reloads = 0
        self._bus: MessageBus | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="firewalld-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._bus is not None:
            self._bus.disconnect()

    async def _run(self) -> None:
        while True:
            try:
                await self._watch()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # no bus yet, or it went away: try again later
                log.debug("firewalld.watch_retry", error=str(e))
            self._bus = None
            await asyncio.sleep(self.retry)

    async def _watch(self) -> None:
        kw: dict[str, Any] = {"bus_type": BusType.SYSTEM}
        if self.bus_address:
            kw["bus_address"] = self.bus_address
        bus = self._bus = await MessageBus(**kw).connect()
        bus.add_message_handler(self._on_message)
        for rule in (RELOADED, OWNER):
            reply = await bus.call(Message(
                destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus", member="AddMatch", signature="s",
                body=[rule]))
            if reply is None or reply.message_type == MessageType.ERROR:
                raise RuntimeError(f"AddMatch refused: {reply.body if reply else None}")
        await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]

    def _on_message(self, msg: Message) -> bool:
        if msg.message_type != MessageType.SIGNAL:
            return False
        if msg.member == "Reloaded" and msg.interface == FIREWALLD:
            self.reloads += 1
            log.info("firewalld.reloaded")
            self.on_change("reloaded")
        elif msg.member == "NameOwnerChanged" and msg.body and msg.body[0] == FIREWALLD:
            state = "started" if msg.body[2] else "stopped"
            log.info("firewalld.owner_changed", state=state)
            self.on_change(state)
        return False
