"""The control socket: the bus API as newline-delimited JSON, for hosts without a bus.

dbus-fast has no server side (no peer-to-peer listener, no server authentication),
so this is a small protocol of its own; docs/control.md describes it. The caller is
taken from SO_PEERCRED once per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from ..api import CoreAPI
from ..status import Caller
from .credentials import caller_from_socket
from .errors import classify
from .names import network_path
from .service import network_properties

log = structlog.get_logger("kvmnetd.socket")

MAX_LINE = 1 << 20
INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"

Handler = Callable[[CoreAPI, Caller, list[Any]], Awaitable[Any]]


async def _list_networks(core: CoreAPI, _c: Caller, _a: list[Any]) -> Any:
    return [[n.name, n.mode, n.bridge, n.state] for n in core.list_networks()]


async def _describe(core: CoreAPI, _c: Caller, _a: list[Any]) -> Any:
    return json.dumps(core.describe(), sort_keys=True, default=str)


async def _doctor(core: CoreAPI, _c: Caller, _a: list[Any]) -> Any:
    return json.dumps(await core.doctor(), sort_keys=True)


async def _get_network(core: CoreAPI, _c: Caller, a: list[Any]) -> Any:
    return network_path(core.network(a[0]).name)


async def _network(core: CoreAPI, _c: Caller, a: list[Any]) -> Any:
    return network_properties(core.network(a[0]))


async def _list_ports(core: CoreAPI, _c: Caller, _a: list[Any]) -> Any:
    return [[p.ifname, p.network, p.state] for p in core.list_ports()]


async def _leases(core: CoreAPI, _c: Caller, a: list[Any]) -> Any:
    return [[le.mac, le.ip, le.hostname, le.client_id, max(0, int(le.expires))]
            for le in core.leases(a[0])]


async def _version(core: CoreAPI, _c: Caller, _a: list[Any]) -> Any:
    return core.version


async def _define(core: CoreAPI, c: Caller, a: list[Any]) -> Any:
    return network_path(await core.define_network(c, a[0], a[1]))


async def _undefine(core: CoreAPI, c: Caller, a: list[Any]) -> Any:
    await core.undefine_network(c, a[0], a[1])


async def _start(core: CoreAPI, c: Caller, a: list[Any]) -> Any:
    await core.start_network(c, a[0])


async def _stop(core: CoreAPI, c: Caller, a: list[Any]) -> Any:
    await core.stop_network(c, a[0])


async def _attach(core: CoreAPI, c: Caller, a: list[Any]) -> Any:
    await core.attach_port(c, a[0], a[1], a[2])


async def _detach(core: CoreAPI, c: Caller, a: list[Any]) -> Any:
    await core.detach_port(c, a[0])


async def _move(core: CoreAPI, c: Caller, a: list[Any]) -> Any:
    await core.move_port(c, a[0], a[1])


async def _reload(core: CoreAPI, c: Caller, _a: list[Any]) -> Any:
    await core.reload(c)


async def _set_log_level(core: CoreAPI, c: Caller, a: list[Any]) -> Any:
    await core.set_log_level(c, a[0])


# name -> (argument types, handler); names and order as on the bus.
METHODS: dict[str, tuple[tuple[type, ...], Handler]] = {
    "ListNetworks": ((), _list_networks),
    "Describe": ((), _describe),
    "Doctor": ((), _doctor),
    "GetNetwork": ((str,), _get_network),
    "ListPorts": ((), _list_ports),
    "DefineNetwork": ((str, bool), _define),
    "UndefineNetwork": ((str, bool), _undefine),
    "StartNetwork": ((str,), _start),
    "StopNetwork": ((str,), _stop),
    "AttachPort": ((str, str, bool), _attach),
    "DetachPort": ((str,), _detach),
    "MovePort": ((str, str), _move),
    "Reload": ((), _reload),
    "SetLogLevel": ((str,), _set_log_level),
    # The bus reaches these through the network object and the Version property.
    "Network": ((str,), _network),
    "Leases": ((str,), _leases),
    "Version": ((), _version),
}


def _args_ok(types: tuple[type, ...], args: Any) -> bool:
    if not isinstance(args, list) or len(args) != len(types):
        return False
    for t, v in zip(types, args, strict=True):
        # bool is an int subclass and vice versa checks must be exact.
        if type(v) is not t or (isinstance(v, str) and "\0" in v):
            return False
    return True


async def handle_request(core: CoreAPI, caller: Caller, req: Any) -> dict[str, Any]:
    reply: dict[str, Any] = {}
    if isinstance(req, dict) and "id" in req:
        reply["id"] = req["id"]
    method = req.get("method") if isinstance(req, dict) else None
    entry = METHODS.get(method) if isinstance(method, str) else None
    if entry is None:
        return {**reply, "ok": False, "error": UNKNOWN_METHOD,
                "message": f"no method {str(method)[:100]!r}"}
    types, handler = entry
    args = req.get("args", [])
    if not _args_ok(types, args):
        sig = ", ".join(t.__name__ for t in types)
        return {**reply, "ok": False, "error": INVALID_ARGS,
                "message": f"{method} takes [{sig}]"}
    try:
        result = await handler(core, caller, args)
    except Exception as exc:
        name, message = classify(exc, str(method))
        return {**reply, "ok": False, "error": name, "message": message}
    return {**reply, "ok": True, "result": result}


class SocketServer:
    def __init__(self, core: CoreAPI, path: str, mode: int = 0o666) -> None:
        self.core = core
        self.path = path
        self.mode = mode
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)  # left over from an earlier run
        self._server = await asyncio.start_unix_server(self._serve, self.path, limit=MAX_LINE)
        # Anyone may connect; every request is judged by the peer's credentials.
        os.chmod(self.path, self.mode)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._conns):
                task.cancel()
            await asyncio.gather(*self._conns, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        try:
            sock: socket.socket = writer.get_extra_info("socket")
            caller = caller_from_socket(sock)
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    break
                except asyncio.LimitOverrunError:
                    await self._send(writer, {"ok": False, "error": INVALID_ARGS,
                                              "message": f"request longer than {MAX_LINE} bytes"})
                    break
                if not line.strip():
                    continue
                try:
                    req = json.loads(line)
                except (ValueError, UnicodeDecodeError):
                    await self._send(writer, {"ok": False, "error": INVALID_ARGS,
                                              "message": "request is not JSON"})
                    continue
                await self._send(writer, await handle_request(self.core, caller, req))
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("control connection failed")
        finally:
            if task is not None:
                self._conns.discard(task)
            writer.close()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        writer.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
        await writer.drain()
