"""A dbus-fast connection that keeps going when its socket buffer is full."""

from __future__ import annotations

import socket
from typing import Any, cast

from dbus_fast.aio import MessageBus


class _SendWithoutEAGAIN:
    """Socket proxy: a full send buffer means "sent 0 bytes", not an error.

    dbus-fast's writer treats EAGAIN from send() as fatal and drops the connection
    when many replies are queued; with 0 it waits for the socket to become writable.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def send(self, data: Any) -> int:
        try:
            return self._sock.send(data)
        except BlockingIOError:
            return 0

    def sendmsg(self, *args: Any) -> int:
        try:
            return self._sock.sendmsg(*args)
        except BlockingIOError:
            return 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class SteadyBus(MessageBus):
    """A connection that survives a full socket buffer under load."""

    async def connect(self) -> SteadyBus:
        await super().connect()
        writer = self._writer
        if writer is not None and writer.sock is not None \
                and not isinstance(writer.sock, _SendWithoutEAGAIN):
            writer.sock = cast(socket.socket, _SendWithoutEAGAIN(writer.sock))
        return self
