"""Keep an ObservedState current from decoded rtnetlink records, O(1) work per record."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, TypeVar

from kvmnetd.adapters.rtnl.decode import AddrRec, FdbRec, LinkRec, NeighRec, PortRec, Record
from kvmnetd.model.observed import IPInterface, Link, ObservedState, Route

RouteKey = tuple[Any, int, int | None]
K = TypeVar("K")


def _route_key(route: Route) -> RouteKey:
    # What the kernel treats as the same route when NLM_F_REPLACE swaps one silently.
    return (route.dst, route.table, route.priority)


class Mirror:
    def __init__(self, state: ObservedState) -> None:
        self.state = state
        self.by_name: dict[str, int] = state.by_name
        self._by_key: dict[RouteKey, set[Route]] = {}
        self._by_oif: dict[int | None, set[Route]] = {}

    def load(self, records: Iterable[Record]) -> None:
        """Replace links, addresses and routes with a dump's content (other fields untouched)."""
        self.state.links = {}
        self.state.addresses = {}
        self.state.routes = set()
        self.state.fdb = {}
        self.state.neighbours = {}
        self.by_name = {}
        self.state.by_name = self.by_name  # shared: ObservedState.link() is O(1)
        self._by_key = {}
        self._by_oif = {}
        for rec in records:
            self.apply(rec)

    def forget_port_flags(self) -> None:
        """No longer followed: ports' isolated and neigh_suppress flags read as unknown."""
        for index, link in list(self.state.links.items()):
            if link.isolated is not None or link.neigh_suppress is not None:
                self.state.links[index] = dataclasses.replace(link, isolated=None,
                                                              neigh_suppress=None)

    def forget_fdb(self) -> None:
        self.state.fdb = {}

    def link(self, name: str) -> Link | None:
        index = self.by_name.get(name)
        return self.state.links.get(index) if index is not None else None

    def apply(self, rec: Record) -> bool:
        """Apply one record; True when observed state changed."""
        if isinstance(rec, LinkRec):
            return self._put_link(rec.link) if rec.new else self._drop_link(rec.link.index)
        if isinstance(rec, AddrRec):
            return self.set_address(rec.ifindex, rec.iface, rec.new)
        if isinstance(rec, PortRec):
            port = self.state.links.get(rec.ifindex)
            if port is None or port.master is None:
                return False
            suppress = port.neigh_suppress if rec.neigh_suppress is None else rec.neigh_suppress
            if (port.isolated, port.neigh_suppress) == (rec.isolated, suppress):
                return False
            return self._put_link(dataclasses.replace(port, isolated=rec.isolated,
                                                      neigh_suppress=suppress))
        if isinstance(rec, FdbRec):
            return self.set_fdb(rec.ifindex, rec.mac, rec.dst, rec.new)
        if isinstance(rec, NeighRec):
            return self.set_neighbour(rec.ifindex, rec.ip, rec.mac, rec.new)
        route = rec.route
        if not rec.new:
            return self._drop_route(route)
        changed = False
        if rec.replace:
            for old in tuple(self._by_key.get(_route_key(route), ())):
                changed |= old != route and self._drop_route(old)
        return self._put_route(route) or changed

    def update_link(self, name: str, **changes: Any) -> bool:
        """What an acknowledged write did to a known link, without reading it back."""
        old = self.link(name)
        return old is not None and self._put_link(dataclasses.replace(old, **changes))

    def set_fdb(self, index: int, mac: str, dst: str | None, present: bool) -> bool:
        """Only VXLAN devices' entries are kept: the flood list and what lies behind it."""
        link = self.state.links.get(index)
        if link is None or link.kind != "vxlan":
            return False
        entries = self.state.fdb.setdefault(index, set())
        key = (mac, dst)
        if present == (key in entries):
            return False
        if present:
            entries.add(key)
        else:
            entries.discard(key)
        return True

    def set_neighbour(self, index: int, ip: str, mac: str, present: bool) -> bool:
        """Kept for every link (doctor reads the underlay's); True only for a change on a
        bridge, whose entries feed DHCP. A change of state alone (reachable, stale) is none."""
        link = self.state.links.get(index)
        if link is None:
            return False
        table = self.state.neighbours.setdefault(index, {})
        if present:
            if table.get(ip) == mac:
                return False
            table[ip] = mac
        else:
            if ip not in table or (mac and table[ip] != mac):
                return False
            del table[ip]
        return link.kind == "bridge"

    def apply_deleted(self, index: int) -> bool:
        return self._drop_link(index)

    def set_address(self, index: int, iface: IPInterface, present: bool) -> bool:
        if iface.version == 6 and iface.ip.is_link_local:
            return False
        addrs = self.state.addresses.get(index)
        if present:
            if addrs is None:
                self.state.addresses[index] = {iface}
                return True
            if iface in addrs:
                return False
            addrs.add(iface)
            return True
        if addrs is None or iface not in addrs:
            return False
        addrs.discard(iface)
        if not addrs:
            del self.state.addresses[index]
        return True

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
        self.state.fdb.pop(index, None)
        self.state.neighbours.pop(index, None)
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
