"""The vocabulary between the planner and the adapters: one small dataclass per change."""

from __future__ import annotations

from dataclasses import dataclass

from kvmnetd.model.guard import GuardElement
from kvmnetd.model.observed import IPInterface, Route


@dataclass(frozen=True)
class Action:
    # The network this action serves; a failure marks that network failed.
    network: str | None


@dataclass(frozen=True)
class CreateBridge(Action):
    bridge: str
    mtu: int | None = None
    mac: str | None = None  # bridged mode: take the uplink's MAC


@dataclass(frozen=True)
class SetBridgeOptions(Action):
    """STP and forward delay; the adapter applies the delay first when enabling STP."""

    bridge: str
    stp: bool
    forward_delay: int


@dataclass(frozen=True)
class SetMtu(Action):
    ifname: str
    mtu: int


@dataclass(frozen=True)
class SetUp(Action):
    ifname: str


@dataclass(frozen=True)
class AddAddress(Action):
    ifname: str
    address: IPInterface


@dataclass(frozen=True)
class RemoveAddress(Action):
    ifname: str
    address: IPInterface


@dataclass(frozen=True)
class AddRoute(Action):
    ifname: str
    route: Route


@dataclass(frozen=True)
class RemoveRoute(Action):
    ifname: str
    route: Route


@dataclass(frozen=True)
class Enslave(Action):
    """Attach (or move) a port; it is also set up. Moving never takes it down."""

    ifname: str
    bridge: str
    # bridged mode: this is the physical NIC; its addresses and routes move to the bridge.
    uplink: bool = False


@dataclass(frozen=True)
class SetIsolated(Action):
    """A guest port's bridge port isolation: isolated ports reach only the others."""

    ifname: str
    isolated: bool


@dataclass(frozen=True)
class SetMac(Action):
    ifname: str
    mac: str


@dataclass(frozen=True)
class SetBridgeNeighbours(Action):
    """An overlay network's bridge: gratuitous ARP makes neighbour entries (arp_accept),
    and no IPv6 link-local address (the same MAC on every host would make them collide)."""

    bridge: str


@dataclass(frozen=True)
class CreateVxlan(Action):
    ifname: str
    vni: int
    local: str
    port: int
    mtu: int | None = None


@dataclass(frozen=True)
class SetLinkLocalOff(Action):
    """No IPv6 link-local address on the VXLAN device: what its own stack would send (DAD,
    MLD) goes to every peer and into every host's bridge."""

    ifname: str


@dataclass(frozen=True)
class AttachVxlan(Action):
    """The VXLAN device joins the network's bridge (not a guest port: never released)."""

    ifname: str
    bridge: str


@dataclass(frozen=True)
class SetNeighSuppress(Action):
    """ARP/ND suppression on the VXLAN port: the bridge answers from what it knows."""

    ifname: str
    on: bool


@dataclass(frozen=True)
class AddFlood(Action):
    """A flood entry (all-zero MAC): broadcast and unknown frames go to this peer too."""

    ifname: str
    dst: str


@dataclass(frozen=True)
class RemoveFlood(Action):
    ifname: str
    dst: str


@dataclass(frozen=True)
class DeleteVxlan(Action):
    ifname: str


@dataclass(frozen=True)
class Release(Action):
    ifname: str


@dataclass(frozen=True)
class DeleteBridge(Action):
    bridge: str


@dataclass(frozen=True)
class SetForwarding(Action):
    family: int  # 4 or 6
    enabled: bool


@dataclass(frozen=True)
class ApplyFirewall(Action):
    ruleset: str  # the whole table, applied as one transaction
    fingerprint: str


@dataclass(frozen=True)
class RemoveFirewall(Action):
    pass


@dataclass(frozen=True)
class ApplyPortGuard(Action):
    """The anti-spoofing bridge table, whole, with its elements (one transaction)."""

    ruleset: str
    fingerprint: str
    elements: frozenset[GuardElement]


@dataclass(frozen=True)
class UpdatePortGuard(Action):
    """Element changes in the anti-spoofing table: ports joining, leaving, addresses."""

    add: frozenset[GuardElement]
    delete: frozenset[GuardElement]


@dataclass(frozen=True)
class RemovePortGuard(Action):
    pass


def device(action: Action) -> str | None:
    """The device an action changes, for logs."""
    dev = getattr(action, "ifname", None) or getattr(action, "bridge", None)
    return dev if isinstance(dev, str) else None


def describe(action: Action) -> str:
    """One line for logs: the action and its fields (not the whole ruleset)."""
    skip = ("network", "ruleset", "elements", "add", "delete")
    fields = {k: v for k, v in vars(action).items() if k not in skip}
    if isinstance(action, ApplyPortGuard | UpdatePortGuard):
        counts = {"elements": getattr(action, "elements", None),
                  "add": getattr(action, "add", None), "delete": getattr(action, "delete", None)}
        fields.update({k: len(v) for k, v in counts.items() if v is not None})
    return f"{type(action).__name__}({', '.join(f'{k}={v}' for k, v in fields.items())})"
