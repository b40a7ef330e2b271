"""Who is behind each port, for anti-spoofing: the guest's MAC, learned once per tap, and
the addresses dnsmasq leased to it.

A port's MAC comes from its libvirt domain XML, or else from its first DHCP exchange: the
lease names a MAC and the bridge's forwarding database names the port it came in on. It
stays until the tap goes away (a tap of the same name later is another guest): a guest
that takes another MAC is cut off, however often it asks for a lease.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping

from kvmnetd.adapters.port_macs_file import load_port_macs, save_port_macs
from kvmnetd.model.desired import Network
from kvmnetd.model.guard import PortIdentity
from kvmnetd.model.observed import ObservedState
from kvmnetd.model.records import Lease

_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")

# bridge -> {MAC: the bridge port it was last seen on}
FdbLookup = Callable[[str], dict[str, str]]


def duid_mac(duid: str) -> str | None:
    """The MAC inside a DUID-LLT or DUID-LL of Ethernet (hex octets with ':'), if any."""
    octets = duid.lower().replace("-", ":").split(":")
    if len(octets) == 14 and octets[:4] == ["00", "01", "00", "01"]:
        return ":".join(octets[8:])
    if len(octets) == 10 and octets[:4] == ["00", "03", "00", "01"]:
        return ":".join(octets[4:])
    return None


class PortIdentities:
    """path: where the learned MACs are kept across restarts (None: in memory only). A
    restart must not cut off guests that learned by DHCP until their leases run out."""

    def __init__(self, fdb_lookup: FdbLookup, path: str | None = None) -> None:
        self.fdb_lookup = fdb_lookup
        self.path = path
        # ifname -> (the tap's link index when it was learned, None: not seen yet; MAC)
        self._macs: dict[str, tuple[int | None, str]] = load_port_macs(path) if path else {}

    def _save(self) -> None:
        if self.path is not None:
            save_port_macs(self.path, self._macs)

    def mac_of(self, ifname: str) -> str | None:
        entry = self._macs.get(ifname)
        return entry[1] if entry else None

    def learn(self, ifname: str, mac: str, observed: ObservedState,
              replace: bool = False) -> bool:
        """Bind `mac` to the port, unless it has one already; True if something changed."""
        if _MAC.fullmatch(mac.lower()) is None:
            return False  # not a MAC nft could take (an XML without one, say)
        link = observed.link(ifname)
        index = link.index if link is not None else None
        old = self._macs.get(ifname)
        if old is not None and not replace and (old[0] is None or old[0] == index):
            return False
        mac = mac.lower()
        if old == (index, mac):
            return False
        self._macs[ifname] = (index, mac)
        self._save()
        return True

    def learn_from_lease(self, net: Network, lease: Lease, ports: Mapping[str, str],
                         observed: ObservedState) -> str | None:
        """A new lease on a network with anti_spoofing: bind its MAC to the port it came
        from, if that port has none yet. The port's name if one was bound."""
        if not lease.mac:
            return None
        return self._learn_seen(net, lease.mac.lower(), self.fdb_lookup(net.bridge), ports,
                                observed)

    def learn_from_leases(self, net: Network, leases: Iterable[Lease],
                          ports: Mapping[str, str], observed: ObservedState) -> list[str]:
        """Leases already there (anti_spoofing just turned on, or a port that joined with
        its lease): bound like a first exchange, so running guests are not cut off."""
        bound = {m for _, m in self._macs.values()}
        macs = {le.mac.lower() for le in leases if le.mac and le.mac.lower() not in bound}
        if not macs or all(i in self._macs for i, n in ports.items() if n == net.name):
            return []
        fdb = self.fdb_lookup(net.bridge)
        return [port for mac in sorted(macs)
                if (port := self._learn_seen(net, mac, fdb, ports, observed)) is not None]

    def _learn_seen(self, net: Network, mac: str, fdb: Mapping[str, str],
                    ports: Mapping[str, str], observed: ObservedState) -> str | None:
        port = fdb.get(mac)
        if port is None or ports.get(port) != net.name:
            return None
        if any(m == mac and i != port for i, (_, m) in self._macs.items()):
            return None  # another port's guest already: a copy of its MAC is not a guest
        return port if self.learn(port, mac, observed) else None

    def forget(self, ifname: str) -> bool:
        if self._macs.pop(ifname, None) is None:
            return False
        self._save()
        return True

    def prune(self, observed: ObservedState) -> None:
        """Drop ports whose tap is gone or was made anew under the same name."""
        before = dict(self._macs)
        for ifname, (index, mac) in before.items():
            link = observed.link(ifname)
            if link is None and index is not None:
                del self._macs[ifname]
            elif link is not None and index is None:
                self._macs[ifname] = (link.index, mac)
            elif link is not None and link.index != index:
                del self._macs[ifname]
        if self._macs != before:
            self._save()

    def build(self, networks: Iterable[Network],
              leases: Callable[[str], list[Lease]]) -> dict[str, PortIdentity]:
        """ifname -> identity, for every port whose MAC is known, with the addresses the
        networks with anti_spoofing leased to that MAC (the planner keeps those of the
        port's own network)."""
        v4: dict[str, set[str]] = {}
        v6: dict[str, set[str]] = {}
        for net in networks:
            if net.anti_spoofing:
                four, six = _leased(leases(net.name))
                for mac, ips in four.items():
                    v4.setdefault(mac, set()).update(ips)
                for mac, ips in six.items():
                    v6.setdefault(mac, set()).update(ips)
        return {ifname: PortIdentity(mac, frozenset(v4.get(mac, ())), frozenset(v6.get(mac, ())))
                for ifname, (_, mac) in self._macs.items()}


def _leased(leases: list[Lease]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """MAC -> IPv4 addresses, and MAC -> IPv6 addresses (by the MAC in the DUID)."""
    v4: dict[str, set[str]] = {}
    v6: dict[str, set[str]] = {}
    for lease in leases:
        try:
            ipaddress.ip_address(lease.ip)
        except ValueError:
            continue  # a line of the lease file we cannot read must not stop the planner
        if ":" in lease.ip:
            mac = duid_mac(lease.client_id)
            if mac is not None:
                v6.setdefault(mac, set()).add(lease.ip)
        elif lease.mac:
            v4.setdefault(lease.mac.lower(), set()).add(lease.ip)
    return v4, v6
