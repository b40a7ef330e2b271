"""Anti-spoofing: what kvmnetd knows of the guest behind one port. Plain data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

# One element of the port guard's nftables sets: (set name, element as nft writes it).
GuardElement = tuple[str, str]


@dataclass(frozen=True)
class PortIdentity:
    """The guest behind a port: its MAC (from libvirt's domain XML or its first DHCP
    exchange) and the addresses dnsmasq leased to that MAC. Addresses derived from the
    MAC (IPv6 link-local, EUI-64) and static DHCP hosts come from the network itself."""

    mac: str | None = None  # lower case, colon separated; None: not learned yet
    ipv4: frozenset[str] = frozenset()
    ipv6: frozenset[str] = frozenset()
