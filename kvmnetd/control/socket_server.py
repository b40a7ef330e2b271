"""The control socket: the bus API as newline-delimited JSON, for hosts without a bus.

dbus-fast has no server side (no peer-to-peer listener, no server authentication),
so this is a small protocol of its own; docs/control.md describes it. The caller is
taken from SO_PEERCRED once per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import socket
import stat
from typing import Any

import structlog

from kvmnetd.control.api import CoreAPI
from kvmnetd.control.credentials import caller_from_socket
from kvmnetd.control.errors import classify
from kvmnetd.control.methods import BY_NAME
from kvmnetd.model.records import Caller

log = structlog.get_logger("kvmnetd.socket")

MAX_LINE = 1 << 20
INVALID_ARGS = "org.freedesktop.DBus.Error.InvalidArgs"
UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"

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
    entry = BY_NAME.get(method) if isinstance(method, str) else None
    if entry is None:
        return {**reply, "ok": False, "error": UNKNOWN_METHOD,
                "message": f"no method {str(method)[:100]!r}"}
    types = entry.arg_types
    args = req.get("args", [])
    if not _args_ok(types, args):
        sig = ", ".join(t.__name__ for t in types)
        return {**reply, "ok": False, "error": INVALID_ARGS,
                "message": f"{method} takes [{sig}]"}
    try:
        result = entry.run(core, caller, args)
        if inspect.isawaitable(result):
            result = await result
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
