"""Turn rtnetlink messages into observed-state records and keep a mirror current from them.

Pure: no sockets here, so the mirror logic can be fed recorded messages.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Iterable
from typing import Any, TypeVar

from ..errors import (
    Busy,
    Conflict,
    InvalidArgument,
    KvmnetError,
    NoSuchPort,
    NotSupported,
    PermissionDenied,
)
from ..observed import IPInterface, Link, ObservedState, Route

RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWADDR, RTM_DELADDR = 20, 21
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
NLM_F_REPLACE = 0x100
IFF_UP = 0x1
IFA_F_NODAD = 0x02
RTN_UNICAST = 1
RTM_F_CLONED = 0x200
MAIN_TABLE = 254
USER_HZ = 100  # IFLA_BR_FORWARD_DELAY is in clock_t units

_LINK_LOCAL6 = ipaddress.IPv6Network("fe80::/10")

Msg = Any  # a pyroute2 nlmsg; untyped upstream

RouteKey = tuple[Any, int, int | None]
K = TypeVar("K")


def msg_type(msg: Msg) -> int:
    # pyroute2 sometimes fills 'event' with a number instead of a name; the header is reliable.
    return int(msg["header"]["type"])


def parse_link(msg: Msg) -> Link | None:
    # AF_BRIDGE copies (family 7) describe a port's bridge view, not the device; a port's
    # release even comes as an AF_BRIDGE RTM_DELLINK while the device lives on.
    if msg.get("family", 0) != socket.AF_UNSPEC:
        return None
    name = msg.get("ifname")
    if name is None:
        return None
    info = msg.get("IFLA_LINKINFO")
    kind = info.get("IFLA_INFO_KIND") if info is not None else None
    data = info.get("IFLA_INFO_DATA") if info is not None else None
    stp = delay = owner = group = None
    if kind == "bridge" and data is not None:
        state = data.get("IFLA_BR_STP_STATE")
        stp = bool(state) if state is not None else None
        cs = data.get("IFLA_BR_FORWARD_DELAY")
        # Jiffies to clock_t can lose one tick (15 s reads as 1499).
        delay = round(cs / USER_HZ) if cs is not None else None
    elif kind == "tun" and data is not None:
        owner = data.get("IFLA_TUN_OWNER")
        group = data.get("IFLA_TUN_GROUP")
    master = msg.get("master") or None
    return Link(
        index=int(msg["index"]),
        name=str(name),
        kind=kind,
        master=master,
        up=bool(msg["flags"] & IFF_UP),
        mtu=int(msg.get("mtu") or 0),
        mac=str(msg.get("address") or "").lower(),
        stp=stp,
        forward_delay=delay,
        tun_owner=owner,
        tun_group=group,
    )


def parse_addr(msg: Msg) -> tuple[int, IPInterface] | None:
    family = msg.get("family")
    if family == socket.AF_INET:
        # IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on p2p links.
        addr = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
    elif family == socket.AF_INET6:
        addr = msg.get("IFA_ADDRESS")
    else:
        return None
    if addr is None:
        return None
    iface = ipaddress.ip_interface(f"{addr}/{msg['prefixlen']}")
    if iface.version == 6 and iface.ip in _LINK_LOCAL6:
        return None
    return int(msg["index"]), iface


def parse_route(msg: Msg) -> Route | None:
    family = msg.get("family")
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None
    table = msg.get("RTA_TABLE") or msg.get("table")
    if table != MAIN_TABLE or msg.get("type") != RTN_UNICAST:
        return None
    if msg.get("flags", 0) & RTM_F_CLONED:
        return None
    dst = msg.get("RTA_DST") or ("0.0.0.0" if family == socket.AF_INET else "::")
    net = ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False)
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_LINK_LOCAL6):
        return None  # the kernel adds fe80::/64 on every link; never ours
    gateway = msg.get("RTA_GATEWAY")
    return Route(
        dst=net,
        oif=msg.get("RTA_OIF"),
        gateway=str(gateway) if gateway is not None else None,
        table=MAIN_TABLE,
        proto=int(msg.get("proto", 0)),
        scope=int(msg.get("scope", 0)),
        priority=msg.get("RTA_PRIORITY"),
    )


def _route_key(route: Route) -> RouteKey:
    # What the kernel treats as the same route when NLM_F_REPLACE swaps one silently.
    return (route.dst, route.table, route.priority)


class Mirror:
    """Applies rtnetlink messages to an ObservedState with O(1) work per message."""

    def __init__(self, state: ObservedState) -> None:
        self.state = state
        self.by_name: dict[str, int] = state.by_name
        self._by_key: dict[RouteKey, set[Route]] = {}
        self._by_oif: dict[int | None, set[Route]] = {}

    def load(self, links: Iterable[Msg], addrs: Iterable[Msg], routes: Iterable[Msg]) -> None:
        """Replace links, addresses and routes with a dump's content (other fields untouched)."""
        self.state.links = {}
        self.state.addresses = {}
        self.state.routes = set()
        self.by_name = {}
        self.state.by_name = self.by_name  # shared: ObservedState.link() is O(1)
        self._by_key = {}
        self._by_oif = {}
        for msg in (*links, *addrs, *routes):
            self.apply(msg)

    def link(self, name: str) -> Link | None:
        index = self.by_name.get(name)
        return self.state.links.get(index) if index is not None else None

    def apply(self, msg: Msg) -> bool:
        """Apply one message; True when observed state changed."""
        kind = msg_type(msg)
        if kind == RTM_NEWLINK:
            link = parse_link(msg)
            return link is not None and self._put_link(link)
        if kind == RTM_DELLINK:
            link = parse_link(msg)
            return link is not None and self._drop_link(link.index)
        if kind in (RTM_NEWADDR, RTM_DELADDR):
            parsed = parse_addr(msg)
            if parsed is None:
                return False
            index, iface = parsed
            addrs = self.state.addresses.setdefault(index, set())
            if kind == RTM_NEWADDR:
                if iface in addrs:
                    return False
                addrs.add(iface)
                return True
            if iface not in addrs:
                return False
            addrs.discard(iface)
            if not addrs:
                del self.state.addresses[index]
            return True
        if kind in (RTM_NEWROUTE, RTM_DELROUTE):
            route = parse_route(msg)
            if route is None:
                return False
            if kind == RTM_DELROUTE:
                return self._drop_route(route)
            changed = False
            if msg["header"].get("flags", 0) & NLM_F_REPLACE:
                for old in tuple(self._by_key.get(_route_key(route), ())):
                    changed |= old != route and self._drop_route(old)
            return self._put_route(route) or changed
        return False

    def apply_deleted(self, index: int) -> bool:
        return self._drop_link(index)

    def set_address(self, index: int, iface: IPInterface, present: bool) -> None:
        if iface.version == 6 and iface.ip.is_link_local:
            return
        addrs = self.state.addresses.setdefault(index, set())
        if present:
            addrs.add(iface)
        else:
            addrs.discard(iface)

    def _put_link(self, link: Link) -> bool:
        old = self.state.links.get(link.index)
        if old == link:
            return False
        if old is not None and old.name != link.name and self.by_name.get(old.name) == link.index:
            del self.by_name[old.name]
        self.state.links[link.index] = link
        self.by_name[link.name] = link.index
        if not link.up and (old is None or old.up):
            # The kernel flushes IPv4 routes of a downed link without RTM_DELROUTE.
            for route in tuple(self._by_oif.get(link.index, ())):
                if route.dst.version == 4:
                    self._drop_route(route)
        return True

    def _drop_link(self, index: int) -> bool:
        old = self.state.links.pop(index, None)
        if old is None:
            return False
        if self.by_name.get(old.name) == index:
            del self.by_name[old.name]
        self.state.addresses.pop(index, None)
        # Not every route of a deleted link is announced as deleted.
        for route in tuple(self._by_oif.get(index, ())):
            self._drop_route(route)
        return True

    def _put_route(self, route: Route) -> bool:
        if route in self.state.routes:
            return False
        self.state.routes.add(route)
        self._by_key.setdefault(_route_key(route), set()).add(route)
        self._by_oif.setdefault(route.oif, set()).add(route)
        return True

    def _drop_route(self, route: Route) -> bool:
        if route not in self.state.routes:
            return False
        self.state.routes.discard(route)
        _discard(self._by_key, _route_key(route), route)
        _discard(self._by_oif, route.oif, route)
        return True


def _discard(index: dict[K, set[Route]], key: K, route: Route) -> None:
    bucket = index.get(key)
    if bucket is not None:
        bucket.discard(route)
        if not bucket:
            del index[key]


_ERRORS: dict[int, type[KvmnetError]] = {
    errno.EEXIST: Conflict,
    errno.ENOTEMPTY: Conflict,
    errno.ENODEV: NoSuchPort,
    errno.EBUSY: Busy,
    errno.EPERM: PermissionDenied,
    errno.EACCES: PermissionDenied,
    errno.EOPNOTSUPP: NotSupported,
    errno.EINVAL: InvalidArgument,
    errno.ERANGE: InvalidArgument,
}


def kernel_error(code: int, reason: str, what: str) -> KvmnetError:
    """A typed error naming the request and the kernel's reason (its extended ack if any)."""
    generic = os.strerror(code) if code > 0 else "unknown error"
    detail = reason if reason and reason != generic else generic
    name = errno.errorcode.get(code, str(code))
    return _ERRORS.get(code, KvmnetError)(f"{what}: the kernel refused it: {detail} ({name})")
