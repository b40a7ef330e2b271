"""sd_notify over $NOTIFY_SOCKET, without libsystemd: one datagram per state change."""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self) -> None:
        self.path = os.environ.get("NOTIFY_SOCKET")
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        self.watchdog_usec = int(usec) if usec and (not pid or pid == str(os.getpid())) else 0
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.path)

    def send(self, text: str) -> None:
        if not self.path:
            return
        addr = self.path
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace socket
        try:
            if self._sock is None:
                # Non-blocking: a supervisor that stops reading must never stall the loop.
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            self._sock.sendto(text.encode(), addr)
        except OSError:
            pass  # queue full or supervisor gone: a status line is not worth waiting for

    def ready(self, status: str) -> None:
        self.send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def reloading(self) -> None:
        self.send("RELOADING=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")
