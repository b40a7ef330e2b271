"""Follows rtnetlink's tc group: any qdisc, class or filter change is a trigger.

What changed is not decoded: the reconciler re-reads the qdiscs once per burst (one
`tc -j qdisc show`) and the planner compares. Our own writes are reported too; the pass
they cause finds nothing to do. A dropped event (ENOBUFS) is a trigger as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

import structlog

log = structlog.get_logger("kvmnetd.tcmonitor")

RTNLGRP_TC = 4


class TcMonitor:
    def __init__(self) -> None:
        self.events = 0
        self._sock: socket.socket | None = None

    @property
    def listening(self) -> bool:
        return self._sock is not None

    def start(self, on_change: Callable[[], None]) -> None:
        """Subscribe in the caller's network namespace; without rtnetlink, log and go on
        (the safety sweep still finds what changed)."""
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                 socket.NETLINK_ROUTE)
            sock.bind((0, 1 << (RTNLGRP_TC - 1)))
        except OSError as e:
            log.warning("tcmonitor.unavailable", error=str(e))
            return
        self._sock = sock

        def readable() -> None:
            changed = False
            while True:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    break
                except OSError:  # ENOBUFS: events were lost, so look at everything
                    changed = True
                    continue
                if not data:
                    break
                changed = True
            if changed:
                self.events += 1
                on_change()

        asyncio.get_running_loop().add_reader(sock.fileno(), readable)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
