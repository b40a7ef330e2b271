"""plan.adopt: guest ports found on our bridges after a restart stay requested."""

from __future__ import annotations

import ipaddress

from kvmnetd.model.desired import DesiredState, Mode, Network
from kvmnetd.model.observed import Link, ObservedState
from kvmnetd.plan.adopt import adopt_ports


def state(*links: Link) -> ObservedState:
    return ObservedState(links={lk.index: lk for lk in links})


NETS = {
    "nat": Network("nat", Mode.NAT, "kvbr0", ipv4=ipaddress.IPv4Interface("10.0.0.1/24")),
    "lan": Network("lan", Mode.BRIDGED, "kvbr1", uplink="eth9"),
    "off": Network("off", Mode.NAT, "kvbr2", ipv4=ipaddress.IPv4Interface("10.0.2.1/24")),
}


def test_guest_ports_on_active_bridges_are_adopted_and_recorded() -> None:
    desired = DesiredState(networks=NETS, active=frozenset({"nat", "lan"}),
                           ports={"vnet1": "lan"})
    observed = state(
        Link(1, "kvbr0", kind="bridge"), Link(2, "kvbr1", kind="bridge"),
        Link(3, "kvbr2", kind="bridge"),
        Link(10, "vnet0", kind="tun", master=1),
        Link(11, "vnet1", kind="tun", master=1),  # requested elsewhere: the request stays
        Link(12, "eth9", kind="veth", master=2),  # the uplink is not a guest's
        Link(13, "vnet3", kind="tun", master=3),  # an inactive network's bridge
        Link(14, "vx0", kind="vxlan", master=1),  # not a guest's kind
        Link(15, "ve0", kind="veth", master=2),
    )
    ports, owned = adopt_ports(desired, observed, {"gone0": "kvbr0"})
    assert ports == {"vnet0": "nat", "vnet1": "lan", "ve0": "lan"}
    assert owned == {"gone0": "kvbr0", "vnet0": "kvbr0", "vnet1": "kvbr0", "ve0": "kvbr1"}


def test_nothing_found_changes_nothing() -> None:
    desired = DesiredState(networks=NETS, active=frozenset({"nat"}))
    ports, owned = adopt_ports(desired, state(Link(1, "kvbr0", kind="bridge")), {})
    assert ports == {} and owned == {}
