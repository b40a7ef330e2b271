"""Follows rtnetlink's tc group: qdisc and filter changes, by device.

Qdiscs are not decoded beyond their device: the reconciler re-reads them all (one
`tc -j qdisc show`) when a device with a limit of ours is touched, and the planner
compares; the default qdisc every new tap gets costs nothing. Filters are not in that
listing (it would take one tc call per port), so their events are read here: the last
one per device says whether its filter is there. Our own writes are reported too; the
pass they cause finds nothing to do. Lost events (ENOBUFS) make the loop look at all.
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


def tc_events(data: bytes) -> tuple[set[int], dict[int, bool]]:
    """(the ifindexes any tc event in `data` is about, ifindex -> whether its last filter
    event added (True) or deleted a filter)."""
    touched: set[int] = set()
    filters: dict[int, bool] = {}
    pos = 0
    while pos + _NLMSGHDR.size <= len(data):
        length, kind = _NLMSGHDR.unpack_from(data, pos)[:2]
        if length < _NLMSGHDR.size:
            break
        body = pos + _NLMSGHDR.size
        if body + _TCMSG.size <= min(len(data), pos + length):
            index = _TCMSG.unpack_from(data, body)[1]
            touched.add(index)
            if kind in (RTM_NEWTFILTER, RTM_DELTFILTER):
                filters[index] = kind == RTM_NEWTFILTER
        pos += (length + 3) & ~3
    return touched, filters


class TcMonitor:
    def __init__(self) -> None:
        self.events = 0
        self._sock: socket.socket | None = None

    @property
    def listening(self) -> bool:
        return self._sock is not None

    def start(self, on_change: Callable[[set[int] | None, dict[int, bool]], None]) -> None:
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
            touched: set[int] | None = set()
            filters: dict[int, bool] = {}
            while True:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    break
                except OSError:  # ENOBUFS: events were lost, so look at everything
                    touched = None
                    continue
                if not data:
                    break
                indexes, lost = tc_events(data)
                if touched is not None:
                    touched |= indexes
                filters.update(lost)
            if touched is None or touched:
                self.events += 1
                on_change(touched, filters)

        asyncio.get_running_loop().add_reader(sock.fileno(), readable)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
