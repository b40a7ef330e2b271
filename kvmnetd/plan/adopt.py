"""Pure: after a restart, which guest ports found on our bridges stay requested.

Crash-only: what the kernel shows wins over the record, so a kill between an attach
or a move and the save of owned.json never makes a port unknown.
"""

from __future__ import annotations

from kvmnetd.model.desired import DesiredState
from kvmnetd.model.observed import ObservedState

# Guests' ports are taps (qemu) and veths (containers, tests); anything else on a bridge
# (an uplink, another bridge's patch) is not a guest's.
_GUEST_KINDS = ("tun", "veth")


def adopt_ports(desired: DesiredState, observed: ObservedState,
                owned_ports: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(requested ports, recorded ports): the guest ports on an active network's bridge
    added to both; a port already requested elsewhere keeps its request."""
    ports = dict(desired.ports)
    owned = dict(owned_ports)
    by_index: dict[int, tuple[str, str]] = {}
    for net in desired.active_networks():
        br = observed.link(net.bridge)
        if br is not None:
            by_index[br.index] = (net.name, net.bridge)
    uplinks = {n.uplink for n in desired.networks.values() if n.uplink}
    for link in observed.links.values():
        hit = by_index.get(link.master) if link.master is not None else None
        if hit is None or link.kind not in _GUEST_KINDS or link.name in uplinks:
            continue
        ports.setdefault(link.name, hit[0])
        owned[link.name] = hit[1]
    return ports, owned
