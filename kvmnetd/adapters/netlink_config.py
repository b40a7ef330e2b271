"""Configuration writes through pyroute2's asyncio API: bridges, addresses, routes.

These are few (a handful per network). The high-rate work, events and port
enslaving, goes through netlink_raw: pyroute2 keeps every acknowledgement of a
request in a queue that is never drained, which cost ~7 kB per tap attached.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..actions import SetBridgeOptions
from ..errors import Conflict, InvalidArgument, KvmnetError
from ..observed import IPInterface, Link, Route
from .netlink_parse import IFA_F_NODAD, MAIN_TABLE, USER_HZ, kernel_error

STP_DELAY_RANGE = range(2, 31)  # seconds the kernel accepts while STP is on


class ConfigWriter:
    def __init__(self, on_write: Callable[[], None]) -> None:
        self._ipr: Any = None
        self._on_write = on_write  # each request sent, refused ones included

    async def _call(self, what: str, request: Callable[[Any], Awaitable[Any]]) -> None:
        self._on_write()
        if self._ipr is None:
            # Opened on first use, from the loop thread: it lives in the daemon's netns.
            self._ipr = AsyncIPRoute(ext_ack=True)
        try:
            await request(self._ipr)
        except NetlinkError as exc:
            reason = str(exc.args[1]) if len(exc.args) > 1 else ""
            raise kernel_error(exc.code, reason, what) from exc

    async def create_bridge(self, what: str, name: str, mtu: int | None,
                            mac: str | None) -> None:
        # STP off and no delay: a bridge without a physical port cannot loop, and a
        # guest's port should forward at once. It stays down until SetUp.
        spec: dict[str, Any] = {"ifname": name, "kind": "bridge", "br_stp_state": 0,
                                "br_forward_delay": 0}
        if mtu is not None:
            spec["mtu"] = mtu
        if mac is not None:
            spec["address"] = mac
        await self._call(what, lambda ipr: ipr.link("add", **spec))

    async def bridge_options(self, what: str, name: str, stp: int | None = None,
                             delay: int | None = None) -> None:
        spec: dict[str, Any] = {"ifname": name, "kind": "bridge"}
        if delay is not None:
            spec["br_forward_delay"] = delay
        if stp is not None:
            spec["br_stp_state"] = stp
        await self._call(what, lambda ipr: ipr.link("set", **spec))

    async def stp_and_delay(self, a: SetBridgeOptions) -> None:
        what = (f"set stp {'on' if a.stp else 'off'} and forward delay {a.forward_delay} s "
                f"on bridge {a.bridge}")
        if a.stp and a.forward_delay not in STP_DELAY_RANGE:
            # Checked here: from STP off the kernel would silently raise a delay of 0/1 to 2 s.
            raise InvalidArgument(f"{what}: with STP on the forward delay must be 2..30 s")
        delay = a.forward_delay * USER_HZ
        if a.stp or a.forward_delay in STP_DELAY_RANGE:
            # The kernel applies the delay before the STP state within one request, and this
            # delay is valid under either STP state.
            await self.bridge_options(what, a.bridge, int(a.stp), delay)
            return
        # A delay outside 2..30 s is refused while STP is on: turn STP off first.
        await self.bridge_options(what, a.bridge, stp=0)
        await self.bridge_options(what, a.bridge, delay=delay)

    async def address(self, what: str, index: int, iface: IPInterface, adding: bool) -> None:
        spec: dict[str, Any] = {"index": index, "address": str(iface.ip),
                                "prefixlen": iface.network.prefixlen}
        if adding:
            if isinstance(iface, ipaddress.IPv4Interface):
                if iface.network.prefixlen < 31:
                    spec["broadcast"] = str(iface.network.broadcast_address)
            else:
                spec["flags"] = IFA_F_NODAD  # the gateway address must work at once
        await self._call(what, lambda ipr: ipr.addr("add" if adding else "del", **spec))

    async def route(self, what: str, index: int, r: Route, adding: bool) -> None:
        spec: dict[str, Any] = {"dst": str(r.dst), "oif": index, "table": MAIN_TABLE,
                                "scope": r.scope, "proto": r.proto}
        if r.gateway is not None:
            spec["gateway"] = r.gateway
        if r.priority is not None:
            spec["priority"] = r.priority
        if adding and r.proto == 0:
            del spec["proto"]  # let it default to "static" rather than "unspec"
        # replace: moving an uplink's default route onto the bridge must not fail on the old one
        await self._call(what, lambda ipr: ipr.route("replace" if adding else "del", **spec))

    async def delete_link(self, what: str, index: int) -> None:
        await self._call(what, lambda ipr: ipr.link("del", index=index))

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None


def kind_of(link: Link) -> str:
    return f"a {link.kind} link" if link.kind else "a physical NIC"


def exists_error(what: str, link: Link) -> KvmnetError:
    if link.kind == "bridge":
        return Conflict(f"{what}: a bridge named {link.name} already exists")
    return Conflict(f"{what}: {link.name} already exists and is {kind_of(link)}, not a bridge")
