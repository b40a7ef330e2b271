"""Links, addresses and routes through rtnetlink: a mirror kept current from events, and writes."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_IPV6_IFADDR,
    RTMGRP_IPV6_ROUTE,
    RTMGRP_LINK,
)

from .. import actions as act
from ..errors import Conflict, InvalidArgument, KvmnetError, NoSuchPort
from ..observed import Link, ObservedState, Route
from .netlink_parse import IFA_F_NODAD, MAIN_TABLE, USER_HZ, Mirror, Msg, kernel_error, parse_link

log = structlog.get_logger(__name__)

GROUPS = (RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
          | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE)
STP_DELAY_RANGE = range(2, 31)  # seconds the kernel accepts while STP is on
RESYNC_BACKOFF = 1.0


class NetlinkAdapter:
    def __init__(self) -> None:
        self.writes = 0  # mutating requests sent (refused ones included: they cost the same)
        self.observed = ObservedState()
        self._mirror = Mirror(self.observed)
        self._ipr: Any = None
        self._ev: Any = None
        self._task: asyncio.Task[None] | None = None
        # While a dump runs, events wait here and are replayed after it, in order.
        self._pending: list[Msg] | None = None
        self._on_change: Callable[[], None] = lambda: None
        self._dump_lock = asyncio.Lock()
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self, on_change: Callable[[], None]) -> None:
        """Subscribe, dump, then follow events. Sockets live in the caller's network namespace."""
        self._on_change = on_change
        self._closed = False
        self._ipr = AsyncIPRoute(ext_ack=True)
        await self._subscribe()
        await self._dump()
        self._task = asyncio.create_task(self._pump(), name="netlink-events")

    async def refresh(self) -> None:
        await self._dump()
        self._notify()

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for sock in (self._ev, self._ipr):
            if sock is not None:
                sock.close()
        self._ev = self._ipr = None

    # -- lookups -----------------------------------------------------------------------------

    def link_by_name(self, name: str) -> Link | None:
        """O(1), unlike ObservedState.link()."""
        return self._mirror.link(name)

    async def tap_info(self, ifname: str) -> tuple[int | None, int | None] | None:
        """(owner uid, group gid) of a tun/tap, None when there is no such tun/tap.

        Read from the kernel each time: it announces no owner change on a tap that is down,
        and `ip tuntap add ... user U` sets the owner only after the creation event.
        The answer also refreshes the observed link.
        """
        try:
            msgs = await self._ipr.link("get", ifname=ifname)
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return None
            raise kernel_error(exc.code, "", f"look up {ifname}") from exc
        for msg in msgs:
            if self._mirror.apply(msg):
                self._notify()
        link = parse_link(msgs[0]) if msgs else None
        if link is None or link.kind != "tun":
            return None
        return link.tun_owner, link.tun_group

    # -- events ------------------------------------------------------------------------------

    async def _subscribe(self) -> None:
        ev = AsyncIPRoute(groups=GROUPS)
        await ev.bind(GROUPS)
        self._ev = ev

    async def _dump(self) -> None:
        async with self._dump_lock:
            self._pending = []
            try:
                links = [m async for m in await self._ipr.link("dump")]
                addrs = [m async for m in await self._ipr.addr("dump")]
                routes = [m async for m in await self._ipr.route("dump")]
                self._mirror.load(links, addrs, routes)
            finally:
                # Replayed even when the dump failed: the old state plus every event stays right.
                pending, self._pending = self._pending, None
                for msg in pending:
                    self._mirror.apply(msg)

    async def _pump(self) -> None:
        while not self._closed:
            try:
                changed = False
                async for msg in self._ev.get():
                    if self._pending is not None:
                        self._pending.append(msg)
                    else:
                        changed = self._mirror.apply(msg) or changed
                if changed:
                    self._notify()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # ENOBUFS and friends: the stream has a gap
                if self._closed:
                    return
                log.warning("netlink events lost; re-reading all links", error=str(exc))
                await self._restart()

    async def _restart(self) -> None:
        with contextlib.suppress(Exception):
            self._ev.close()
        try:
            await self._subscribe()
            await self.refresh()
        except Exception as exc:
            log.error("netlink resync failed; retrying", error=str(exc))
            await asyncio.sleep(RESYNC_BACKOFF)

    def _notify(self) -> None:
        try:
            self._on_change()
        except Exception:
            log.exception("on_change callback failed")

    # -- writes ------------------------------------------------------------------------------

    async def apply(self, action: act.Action) -> None:
        match action:
            case act.CreateBridge():
                await self._create_bridge(action)
            case act.SetBridgeOptions():
                await self._bridge_options(action)
            case act.SetMtu(ifname=name, mtu=mtu):
                await self._write(f"set mtu {mtu} on {name}",
                                  self._ipr.link("set", ifname=name, mtu=mtu))
            case act.SetUp(ifname=name):
                await self._write(f"bring up {name}",
                                  self._ipr.link("set", ifname=name, state="up"))
            case act.Enslave(ifname=name, bridge=bridge):
                what = f"attach {name} to bridge {bridge}"
                master = await self._index(bridge, what)
                # One request: a port moved between bridges never goes down.
                await self._write(what, self._ipr.link("set", ifname=name, master=master,
                                                       state="up"))
            case act.Release(ifname=name):
                await self._write(f"detach {name} from its bridge",
                                  self._ipr.link("set", ifname=name, master=0))
            case act.AddAddress() | act.RemoveAddress():
                await self._address(action)
            case act.AddRoute() | act.RemoveRoute():
                await self._route(action)
            case act.DeleteBridge(bridge=name):
                await self._delete_bridge(name)
            case _:
                name = type(action).__name__
                raise InvalidArgument(f"the netlink adapter does not handle {name}")
        await self._read_back(action)

    async def _read_back(self, action: act.Action) -> None:
        """Put what a write changed into the mirror now: the next plan must not wait for events."""
        if isinstance(action, act.DeleteBridge):
            index = self._mirror.by_name.get(action.bridge)
            if index is not None:
                self._mirror.apply_deleted(index)
            return
        if isinstance(action, act.AddAddress | act.RemoveAddress):
            index = self._mirror.by_name.get(action.ifname)
            if index is not None:
                self._mirror.set_address(index, action.address, isinstance(action, act.AddAddress))
            return
        if isinstance(action, act.AddRoute | act.RemoveRoute):
            return  # the kernel fills in proto and scope; its event is the true copy
        name = getattr(action, "ifname", None) or getattr(action, "bridge", None)
        if name is None:
            return
        with contextlib.suppress(NetlinkError):
            for msg in await self._ipr.link("get", ifname=name):
                self._mirror.apply(msg)

    async def _write(self, what: str, request: Awaitable[Any]) -> Any:
        self.writes += 1
        try:
            return await request
        except NetlinkError as exc:
            reason = str(exc.args[1]) if len(exc.args) > 1 else ""
            raise kernel_error(exc.code, reason, what) from exc

    async def _lookup(self, name: str) -> Link | None:
        link = self._mirror.link(name)
        if link is not None:
            return link
        try:
            msgs = await self._ipr.link("get", ifname=name)
        except NetlinkError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return None
            raise kernel_error(exc.code, "", f"look up {name}") from exc
        return parse_link(msgs[0]) if msgs else None

    async def _index(self, name: str, what: str) -> int:
        index = self._mirror.by_name.get(name)
        if index is not None:
            return index
        # Not seen yet (its event may still be queued): ask the kernel.
        link = await self._lookup(name)
        if link is None:
            raise NoSuchPort(f"{what}: there is no link named {name}")
        return link.index

    async def _create_bridge(self, a: act.CreateBridge) -> None:
        what = f"create bridge {a.bridge}"
        existing = self._mirror.link(a.bridge)
        if existing is not None:
            raise _exists(what, existing)
        # STP off and no delay: a bridge without a physical port cannot loop, and a guest's
        # port should forward at once. It stays down until SetUp.
        spec: dict[str, Any] = {"ifname": a.bridge, "kind": "bridge",
                                "br_stp_state": 0, "br_forward_delay": 0}
        if a.mtu is not None:
            spec["mtu"] = a.mtu
        if a.mac is not None:
            spec["address"] = a.mac
        try:
            await self._write(what, self._ipr.link("add", **spec))
        except Conflict:
            existing = await self._lookup(a.bridge)
            if existing is not None:
                raise _exists(what, existing) from None
            raise

    async def _bridge_options(self, a: act.SetBridgeOptions) -> None:
        what = (f"set stp {'on' if a.stp else 'off'} and forward delay {a.forward_delay} s "
                f"on bridge {a.bridge}")
        if a.stp and a.forward_delay not in STP_DELAY_RANGE:
            # Checked here: from STP off the kernel would silently raise a delay of 0/1 to 2 s.
            raise InvalidArgument(f"{what}: with STP on the forward delay must be 2..30 s")
        delay = a.forward_delay * USER_HZ
        if a.stp or a.forward_delay in STP_DELAY_RANGE:
            # The kernel applies the delay before the STP state within one request, and this
            # delay is valid under either STP state.
            await self._write(what, self._ipr.link("set", ifname=a.bridge, kind="bridge",
                                                   br_forward_delay=delay, br_stp_state=int(a.stp)))
            return
        # A delay outside 2..30 s is refused while STP is on: turn STP off first.
        await self._write(what, self._ipr.link("set", ifname=a.bridge, kind="bridge",
                                               br_stp_state=0))
        await self._write(what, self._ipr.link("set", ifname=a.bridge, kind="bridge",
                                               br_forward_delay=delay))

    async def _address(self, a: act.AddAddress | act.RemoveAddress) -> None:
        adding = isinstance(a, act.AddAddress)
        what = f"{'add' if adding else 'remove'} address {a.address} {'on' if adding else 'from'} "
        what += a.ifname
        index = await self._index(a.ifname, what)
        spec: dict[str, Any] = {"index": index, "address": str(a.address.ip),
                                "prefixlen": a.address.network.prefixlen}
        if adding:
            if isinstance(a.address, ipaddress.IPv4Interface):
                if a.address.network.prefixlen < 31:
                    spec["broadcast"] = str(a.address.network.broadcast_address)
            else:
                spec["flags"] = IFA_F_NODAD  # the gateway address must work at once
        try:
            await self._write(what, self._ipr.addr("add" if adding else "del", **spec))
        except KvmnetError as exc:
            # Already so (a late event made us plan it twice): the goal holds.
            code = getattr(exc.__cause__, "code", None)
            if code not in (errno.EEXIST, errno.EADDRNOTAVAIL):
                raise

    async def _route(self, a: act.AddRoute | act.RemoveRoute) -> None:
        adding = isinstance(a, act.AddRoute)
        r: Route = a.route
        what = f"{'add' if adding else 'remove'} route {r.dst}"
        what += f" via {r.gateway}" if r.gateway else ""
        what += f" dev {a.ifname}"
        index = await self._index(a.ifname, what)
        spec: dict[str, Any] = {"dst": str(r.dst), "oif": index, "table": MAIN_TABLE,
                                "scope": r.scope, "proto": r.proto}
        if r.gateway is not None:
            spec["gateway"] = r.gateway
        if r.priority is not None:
            spec["priority"] = r.priority
        if adding and r.proto == 0:
            del spec["proto"]  # let it default to "static" rather than "unspec"
        # replace: moving an uplink's default route onto the bridge must not fail on the old one
        await self._write(what, self._ipr.route("replace" if adding else "del", **spec))

    async def _delete_bridge(self, name: str) -> None:
        what = f"delete bridge {name}"
        link = await self._lookup(name)
        if link is None:
            raise NoSuchPort(f"{what}: there is no link named {name}")
        if link.kind != "bridge":
            raise Conflict(f"{what}: refusing, {name} is {_kind(link)}, not a bridge")
        await self._write(what, self._ipr.link("del", index=link.index))


def _kind(link: Link) -> str:
    return f"a {link.kind} link" if link.kind else "a physical NIC"


def _exists(what: str, link: Link) -> KvmnetError:
    if link.kind == "bridge":
        return Conflict(f"{what}: a bridge named {link.name} already exists")
    return Conflict(f"{what}: {link.name} already exists and is {_kind(link)}, not a bridge")
