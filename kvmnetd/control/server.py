"""Serves the control API: always on the Unix socket, on the bus whenever one is there."""

from __future__ import annotations

import asyncio
import contextlib
import os

import structlog
from dbus_fast import BusType, Message, MessageType, NameFlag, RequestNameReply

from kvmnetd.control.api import CoreAPI
from kvmnetd.control.credentials import NAME_OWNER_MATCH
from kvmnetd.control.dbus_objects import BusService, ServiceBus
from kvmnetd.control.names import BUS_NAME
from kvmnetd.control.socket_server import SocketServer

log = structlog.get_logger("kvmnetd.bus")

SYSTEM_BUS_DEFAULT = "unix:path=/run/dbus/system_bus_socket"


def system_bus_address() -> str:
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or SYSTEM_BUS_DEFAULT


def bus_socket_present(address: str) -> bool:
    """Cheap check before a connection attempt: does any unix:path= socket exist?"""
    for part in address.split(";"):
        transport, _, opts = part.partition(":")
        if transport != "unix":
            return True  # abstract, tcp, ...: only a connection attempt can tell
        options = dict(opt.partition("=")[::2] for opt in opts.split(","))
        if "path" not in options or os.path.exists(options["path"]):
            return True
    return False


class ControlServer:
    def __init__(self, core: CoreAPI, bus_address: str | None, socket_path: str,
                 retry_interval: float = 1.0, use_bus: bool = True) -> None:
        self.core = core
        self.use_bus = use_bus
        self.bus_address = bus_address
        self.socket = SocketServer(core, socket_path)
        self.service = BusService(core)
        self.retry_interval = retry_interval
        self.bus: ServiceBus | None = None
        self.bus_error: str | None = None  # why we are not on the bus, for status
        self._name_owned = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def bus_connected(self) -> bool:
        return self.bus is not None and self._name_owned.is_set()

    async def wait_for_bus(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._name_owned.wait(), timeout)
        return self.bus_connected

    async def start(self) -> None:
        await self.socket.start()
        if self.use_bus:
            self._task = asyncio.create_task(self._bus_loop(), name="kvmnetd-bus")

    def bus_expected(self) -> bool:
        """Is there a bus whose name we should own before calling ourselves ready?"""
        return self.use_bus and bus_socket_present(self.bus_address or system_bus_address())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._drop_bus()
        await self.socket.close()

    def _drop_bus(self) -> None:
        self._name_owned.clear()
        self.service.detach()
        bus, self.bus = self.bus, None
        if bus is not None:
            bus.disconnect()

    async def _bus_loop(self) -> None:
        while True:
            address = self.bus_address or system_bus_address()
            delay = self.retry_interval
            if bus_socket_present(address):
                try:
                    delay = await self._serve_bus(address)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._note(f"bus {address}: {str(exc) or type(exc).__name__}")
                finally:
                    self._drop_bus()
            elif self.bus_error is None:
                self._note(f"no bus at {address} yet; serving the control socket only")
            await asyncio.sleep(delay)

    def _note(self, why: str) -> None:
        if why != self.bus_error:
            log.warning("not on the bus", reason=why)
        self.bus_error = why

    async def _serve_bus(self, address: str) -> float:
        """Connect, export, own the name, stay until the bus goes. Returns the retry delay."""
        bus = ServiceBus(bus_address=address, bus_type=BusType.SYSTEM)
        await bus.connect()
        self.bus = bus
        bus.add_message_handler(self.service.callers.on_message)
        await bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="AddMatch", signature="s",
            body=[NAME_OWNER_MATCH]))
        self.service.attach(bus)
        try:
            reply = await bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE)
        except Exception as exc:
            # Typically AccessDenied: the policy file is not installed.
            self._note(f"may not own {BUS_NAME} on {address}: {exc}"
                       " (is dbus/kvmnetd.conf installed?)")
            return self.retry_interval * 5
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            self._note(f"{BUS_NAME} is owned by {await self._owner(bus)} on {address}")
            return self.retry_interval * 5
        self.bus_error = None
        self._name_owned.set()
        log.info("on the bus", name=BUS_NAME, address=address)
        await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
        self._note(f"bus {address} went away")
        return self.retry_interval

    @staticmethod
    async def _owner(bus: ServiceBus) -> str:
        reply = await bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="GetConnectionUnixProcessID",
            signature="s", body=[BUS_NAME]))
        if reply.message_type is MessageType.METHOD_RETURN:
            return f"another process (pid {reply.body[0]})"
        return "another connection"


async def serve(core: CoreAPI, bus_address: str | None, socket_path: str,
                retry_interval: float = 1.0, use_bus: bool = True) -> ControlServer:
    """Start serving; the bus is joined in the background and rejoined after it restarts."""
    server = ControlServer(core, bus_address, socket_path, retry_interval, use_bus)
    await server.start()
    return server
