"""Follows rtnetlink's tc group: any qdisc, class or filter change is a trigger.

Qdiscs are not decoded: the reconciler re-reads them once per burst (one `tc -j qdisc
show`) and the planner compares. Filters are not in that listing (it would take one tc
call per port), so their events are read here: which devices lost or gained one, the
last event per device winning. Our own writes are reported too; the pass they cause
finds nothing to do. A dropped event (ENOBUFS) is a trigger as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable

import structlog

log = structlog.get_logger("kvmnetd.tcmonitor")

RTNLGRP_TC = 4
RTM_NEWTFILTER, RTM_DELTFILTER = 44, 45
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info


def filter_events(data: bytes) -> dict[int, bool]:
    """ifindex -> whether its last filter event in `data` added (True) or deleted one."""
    out: dict[int, bool] = {}
    pos = 0
    while pos + _NLMSGHDR.size <= len(data):
        length, kind = _NLMSGHDR.unpack_from(data, pos)[:2]
        if length < _NLMSGHDR.size:
            break
        body = pos + _NLMSGHDR.size
        if kind in (RTM_NEWTFILTER, RTM_DELTFILTER) and body + _TCMSG.size <= len(data):
            index = _TCMSG.unpack_from(data, body)[1]
            out[index] = kind == RTM_NEWTFILTER
        pos += (length + 3) & ~3
    return out


class TcMonitor:
    def __init__(self) -> None:
        self.events = 0
        self._sock: socket.socket | None = None

    @property
    def listening(self) -> bool:
        return self._sock is not None

    def start(self, on_change: Callable[[dict[int, bool]], None]) -> None:
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
            filters: dict[int, bool] = {}
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
                filters.update(filter_events(data))
            if changed:
                self.events += 1
                on_change(filters)

        asyncio.get_running_loop().add_reader(sock.fileno(), readable)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
