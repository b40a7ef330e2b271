"""Planner cases, table-driven: (desired, observed, owned) -> expected actions."""

from __future__ import annotations

import ipaddress

import pytest

from kvmnetd.model import actions as A
from kvmnetd.model.desired import AttachRule, DesiredState, Mode, Network
from kvmnetd.model.observed import Link, ObservedState, Route
from kvmnetd.model.owned import Owned, UplinkMove
from kvmnetd.plan.nft import fingerprint
from kvmnetd.plan.planner import attach_for, plan, rule_matches

V4 = ipaddress.ip_interface


def net(name: str = "nat", mode: Mode = Mode.NAT, bridge: str = "kvbr0", **kw: object) -> Network:
    kw.setdefault("ipv4", V4("10.0.0.254/24") if mode is not Mode.BRIDGED else None)
    return Network(name=name, mode=mode, bridge=bridge, **kw)  # type: ignore[arg-type]


def desired(*nets: Network, ports: dict[str, str] | None = None,
            rules: tuple[AttachRule, ...] = (), active: set[str] | None = None) -> DesiredState:
    return DesiredState(networks={n.name: n for n in nets},
                        active=frozenset(active if active is not None else {n.name for n in nets}),
                        ports=ports or {}, rules=rules)


def observed(*links: Link, addrs: dict[int, set[str]] | None = None, fw: str | None = None,
             fwd: tuple[bool, bool] = (True, True), routes: set[Route] | None = None
             ) -> ObservedState:
    return ObservedState(
        links={link.index: link for link in links},
        addresses={i: {V4(a) for a in s} for i, s in (addrs or {}).items()},
        routes=routes or set(),
        forwarding={4: fwd[0], 6: fwd[1]},
        firewall=fw,
    )


BR = Link(index=10, name="kvbr0", kind="bridge", up=True, stp=False, forward_delay=0)
TAP = Link(index=20, name="vnet0", kind="tun", up=True, mac="52:54:00:aa:bb:cc")
VETH = Link(index=21, name="veth1", kind="veth", up=True, mac="52:54:00:11:22:33")


def names(actions: list[A.Action]) -> list[str]:
    return [type(a).__name__ for a in actions]


def converged_nat() -> tuple[DesiredState, ObservedState, Owned]:
    n = net()
    d = desired(n, ports={"vnet0": "nat"})
    o = observed(BR, Link(**{**vars(TAP), "master": 10}), addrs={10: {"10.0.0.254/24"}},
                 fw=fingerprint([n]))
    owned = Owned(bridges={"kvbr0": "nat"}, created={"kvbr0"},
                  addresses={"kvbr0": {"10.0.0.254/24"}}, ports={"vnet0": "kvbr0"})
    return d, o, owned


CASES = [
    pytest.param(
        desired(net()), observed(fw=None, fwd=(False, False)), Owned(),
        ["CreateBridge", "AddAddress", "SetUp", "ApplyFirewall", "SetForwarding"],
        id="fresh-nat-network"),
    pytest.param(
        desired(net(mode=Mode.ISOLATED)), observed(fwd=(False, False)), Owned(),
        ["CreateBridge", "AddAddress", "SetUp", "ApplyFirewall"],
        id="isolated-needs-no-forwarding"),
    pytest.param(
        desired(net(stp=True, forward_delay=2)), observed(fwd=(True, True)), Owned(),
        ["CreateBridge", "SetBridgeOptions", "AddAddress", "SetUp", "ApplyFirewall"],
        id="stp-requested-set-after-create"),
    pytest.param(
        desired(net()), observed(Link(**{**vars(BR), "up": False}), fw=fingerprint([net()])),
        Owned(bridges={"kvbr0": "nat"}),
        ["AddAddress", "SetUp"],
        id="adopted-bridge-gets-address-and-up"),
    pytest.param(
        desired(net(), ports={"vnet0": "nat"}),
        observed(BR, TAP, addrs={10: {"10.0.0.254/24"}}, fw=fingerprint([net()])),
        Owned(bridges={"kvbr0": "nat"}, created={"kvbr0"}),
        ["Enslave"],
        id="explicit-port-attached"),
    pytest.param(
        desired(net(), rules=(AttachRule(network="nat", ifname="vnet*"),)),
        observed(BR, TAP, VETH, addrs={10: {"10.0.0.254/24"}}, fw=fingerprint([net()])),
        Owned(bridges={"kvbr0": "nat"}, created={"kvbr0"}),
        ["Enslave"],
        id="policy-attaches-matching-tap-only"),
    pytest.param(
        desired(net(), ports={"vnet0": ""}, rules=(AttachRule(network="nat", ifname="vnet*"),)),
        observed(BR, TAP, addrs={10: {"10.0.0.254/24"}}, fw=fingerprint([net()])),
        Owned(bridges={"kvbr0": "nat"}, created={"kvbr0"}),
        [],
        id="explicit-detach-beats-policy"),
    pytest.param(
        desired(net(), rules=(AttachRule(network="nat", ifname="vnet*"),)),
        observed(BR, Link(index=30, name="docker0", kind="bridge", up=True),
                 Link(**{**vars(TAP), "master": 30}), addrs={10: {"10.0.0.254/24"}},
                 fw=fingerprint([net()])),
        Owned(bridges={"kvbr0": "nat"}, created={"kvbr0"}),
        [],
        id="policy-never-steals-from-foreign-bridge"),
    pytest.param(
        desired(net()),
        observed(BR, Link(**{**vars(TAP), "master": 10}), addrs={10: {"10.0.0.254/24"}},
                 fw=fingerprint([net()])),
        Owned(bridges={"kvbr0": "nat"}, created={"kvbr0"}, ports={"vnet0": "kvbr0"}),
        ["Release"],
        id="port-no-longer-wanted-released"),
    pytest.param(
        desired(net(), active=set()),
        observed(BR, Link(**{**vars(TAP), "master": 10}), addrs={10: {"10.0.0.254/24"}},
                 fw=fingerprint([net()])),
        Owned(bridges={"kvbr0": "nat"}, created={"kvbr0"}, ports={"vnet0": "kvbr0"},
              addresses={"kvbr0": {"10.0.0.254/24"}}, forwarding={4: False}),
        ["RemoveFirewall", "SetForwarding", "Release", "RemoveAddress", "Release",
         "DeleteBridge"],
        id="stopped-network-torn-down-and-forwarding-restored"),
    pytest.param(
        desired(net(), active=set()),
        observed(BR, addrs={10: {"10.0.0.254/24"}}),
        Owned(bridges={"kvbr0": "nat"}, addresses={"kvbr0": {"10.0.0.254/24"}}),
        ["RemoveAddress"],
        id="adopted-bridge-never-deleted"),
    pytest.param(
        desired(net(ipv4=V4("10.0.0.1/24"))),
        observed(BR, addrs={10: {"10.0.0.254/24", "192.0.2.1/24"}},
                 fw=fingerprint([net(ipv4=V4("10.0.0.1/24"))])),
        Owned(bridges={"kvbr0": "nat"}, created={"kvbr0"},
              addresses={"kvbr0": {"10.0.0.254/24"}}),
        ["AddAddress", "RemoveAddress"],
        id="gateway-changed-foreign-address-kept"),
    pytest.param(
        desired(net()), observed(BR, addrs={10: {"10.0.0.254/24"}}, fw="tampered"),
        Owned(bridges={"kvbr0": "nat"}, created={"kvbr0"}),
        ["ApplyFirewall"],
        id="tampered-table-reapplied"),
    pytest.param(
        desired(net()), observed(Link(index=10, name="kvbr0", kind="veth")), Owned(),
        [],
        id="name-taken-by-non-bridge-is-a-problem"),
]


@pytest.mark.parametrize("d,o,owned,expected", CASES)
def test_plan_cases(d: DesiredState, o: ObservedState, owned: Owned, expected: list[str]) -> None:
    assert names(plan(d, o, owned).actions) == expected


def test_converged_system_plans_nothing() -> None:
    d, o, owned = converged_nat()
    p = plan(d, o, owned)
    assert p.actions == []
    assert p.ports == {"vnet0": "nat"}


def test_problem_reported_for_non_bridge() -> None:
    p = plan(desired(net()), observed(Link(index=10, name="kvbr0", kind="veth")), Owned())
    assert "not a bridge" in p.problems["nat"]


def test_move_port_between_networks_is_one_enslave() -> None:
    a = net("nat")
    b = net("iso", Mode.ISOLATED, "kvbr1", ipv4=V4("10.0.1.1/24"))
    br1 = Link(index=11, name="kvbr1", kind="bridge", up=True, stp=False, forward_delay=0)
    o = observed(BR, br1, Link(**{**vars(TAP), "master": 10}),
                 addrs={10: {"10.0.0.254/24"}, 11: {"10.0.1.1/24"}}, fw=fingerprint([b, a]))
    owned = Owned(bridges={"kvbr0": "nat", "kvbr1": "iso"}, created={"kvbr0", "kvbr1"},
                  ports={"vnet0": "kvbr0"})
    p = plan(desired(a, b, ports={"vnet0": "iso"}), o, owned)
    assert p.actions == [A.Enslave("iso", "vnet0", "kvbr1")]


def test_bridged_uplink_moves_addresses_and_routes_in_safe_order() -> None:
    n = net("lan", Mode.BRIDGED, "kvbr9", uplink="eth1")
    eth = Link(index=5, name="eth1", kind="veth", up=True, mac="02:00:00:00:00:05")
    default = Route(dst=ipaddress.ip_network("0.0.0.0/0"), oif=5, gateway="198.51.100.1")
    o = observed(eth, addrs={5: {"198.51.100.7/24"}}, routes={default})
    p = plan(desired(n), o, Owned())
    assert names(p.actions) == ["CreateBridge", "SetUp", "AddAddress", "Enslave", "AddRoute",
                                "RemoveAddress"]
    create = p.actions[0]
    assert isinstance(create, A.CreateBridge) and create.mac == eth.mac
    enslave = p.actions[3]
    assert isinstance(enslave, A.Enslave) and enslave.uplink


def test_bridged_teardown_gives_uplink_back() -> None:
    n = net("lan", Mode.BRIDGED, "kvbr9", uplink="eth1")
    br = Link(index=9, name="kvbr9", kind="bridge", up=True)
    eth = Link(index=5, name="eth1", kind="veth", up=True, master=9)
    owned = Owned(bridges={"kvbr9": "lan"}, created={"kvbr9"},
                  addresses={"kvbr9": {"198.51.100.7/24"}},
                  uplinks={"eth1": UplinkMove("kvbr9", ["198.51.100.7/24"], [
                      {"dst": "0.0.0.0/0", "gateway": "198.51.100.1", "priority": None}])})
    o = observed(br, eth, addrs={9: {"198.51.100.7/24"}})
    p = plan(desired(n, active=set()), o, owned)
    assert names(p.actions) == ["Release", "AddAddress", "AddRoute", "RemoveAddress",
                                "DeleteBridge"]


@pytest.mark.parametrize("ifglob,macglob,link,ok", [
    ("vnet*", None, TAP, True),
    ("tap*", None, TAP, False),
    (None, "52:54:00:aa", TAP, True),
    (None, "52:54:00:AA:*", TAP, True),
    (None, "52:54:01", TAP, False),
    ("vnet*", "52:54:01", TAP, False),
    (None, None, TAP, False),
])
def test_rule_matches(ifglob: str | None, macglob: str | None, link: Link, ok: bool) -> None:
    assert rule_matches(ifglob, macglob, link) is ok


def test_rule_of_an_inactive_network_falls_through_to_the_next() -> None:
    a, b = net("a", bridge="kvbr0"), net("b", bridge="kvbr1", ipv4=V4("10.0.1.1/24"))
    rules = (AttachRule(network="a", ifname="vnet*"), AttachRule(network="b", ifname="vnet*"))
    d = desired(a, b, rules=rules, active={"b"})
    p = plan(d, observed(TAP), Owned())
    assert p.ports == {"vnet0": "b"}


# ---- one network's trouble is that network's alone -------------------------------------------

VPN = Link(index=30, name="vpn0", kind="tun", up=True)
OTHER_BR = Link(index=11, name="kvbr1", kind="bridge", up=True, stp=False, forward_delay=0)


def two_nets() -> DesiredState:
    return desired(net("nat"), net("lab", bridge="kvbr1", ipv4=V4("10.9.0.1/24")))


def test_host_route_over_a_subnet_keeps_only_that_network_down() -> None:
    vpn_route = Route(dst=ipaddress.ip_network("10.9.0.0/16"), oif=30)
    default = Route(dst=ipaddress.ip_network("0.0.0.0/0"), oif=30, gateway="10.9.0.254")
    p = plan(two_nets(), observed(VPN, routes={vpn_route, default}), Owned())
    assert p.problems == {"lab": p.degraded["lab"]}
    assert "10.9.0.0/16 dev vpn0" in p.degraded["lab"] and "10.9.0.0/24" in p.degraded["lab"]
    made = {a.bridge for a in p.actions if isinstance(a, A.CreateBridge)}
    assert made == {"kvbr0"}, "the other network starts, the blocked one is not created"


def test_routes_on_our_bridges_uplinks_and_default_routes_do_not_count() -> None:
    lan = net("lan", Mode.BRIDGED, bridge="kvbr2", uplink="eth0")
    eth0 = Link(index=40, name="eth0", kind=None, up=True)
    routes = {Route(dst=ipaddress.ip_network("10.9.0.0/24"), oif=11),  # kernel's, on kvbr1
              Route(dst=ipaddress.ip_network("10.0.0.0/8"), oif=40),  # on a bridged uplink
              Route(dst=ipaddress.ip_network("0.0.0.0/0"), oif=30, gateway="10.9.0.254")}
    d = desired(net("nat"), net("lab", bridge="kvbr1", ipv4=V4("10.9.0.1/24")), lan)
    p = plan(d, observed(OTHER_BR, eth0, VPN, routes=routes), Owned())
    assert p.degraded == {} and "lab" not in p.problems and "nat" not in p.problems


def test_late_route_over_a_running_network_degrades_it_but_keeps_it_up() -> None:
    d, o, owned = converged_nat()
    o.links[VPN.index] = VPN
    o.routes = {Route(dst=ipaddress.ip_network("10.0.0.0/25"), oif=30)}
    p = plan(d, o, owned)
    assert "nat" not in p.problems and "10.0.0.0/25 dev vpn0" in p.degraded["nat"]
    assert p.actions == [], "a running network is not torn down by a late route"
    o.routes = set()
    assert plan(d, o, owned).degraded == {}


def test_foreign_bridge_with_its_own_address_is_not_taken() -> None:
    virbr = Link(index=10, name="kvbr0", kind="bridge", up=True)
    p = plan(desired(net()), observed(virbr, addrs={10: {"192.168.122.1/24"}}), Owned())
    assert "192.168.122.1/24" in p.problems["nat"] and p.actions == []
    # An empty bridge made beforehand is still adopted and used.
    p = plan(desired(net()), observed(virbr), Owned())
    assert "nat" not in p.problems and "AddAddress" in names(p.actions)


def test_missing_uplink_fails_only_its_network() -> None:
    lan = net("lan", Mode.BRIDGED, bridge="kvbr2", uplink="nosuch0")
    p = plan(desired(net(), lan), observed(), Owned())
    assert p.problems == {"lan": "uplink nosuch0 not found"}
    assert {a.bridge for a in p.actions if isinstance(a, A.CreateBridge)} >= {"kvbr0"}


def _isolated_setup(isolated: bool | None, isolate_ports: bool = True
                    ) -> tuple[DesiredState, ObservedState, Owned]:
    n = net(isolate_ports=isolate_ports)
    d = desired(n, ports={"vnet0": "nat"})
    o = observed(BR, Link(**{**vars(TAP), "master": 10, "isolated": isolated}),
                 addrs={10: {"10.0.0.254/24"}}, fw=fingerprint([n]))
    owned = Owned(bridges={"kvbr0": "nat"}, created={"kvbr0"},
                  addresses={"kvbr0": {"10.0.0.254/24"}}, ports={"vnet0": "kvbr0"})
    return d, o, owned


def test_isolated_network_isolates_a_new_port_after_enslaving_it() -> None:
    n = net(isolate_ports=True)
    o = observed(BR, TAP, addrs={10: {"10.0.0.254/24"}}, fw=fingerprint([n]))
    owned = Owned(bridges={"kvbr0": "nat"}, created={"kvbr0"},
                  addresses={"kvbr0": {"10.0.0.254/24"}})
    want = [A.Enslave("nat", "vnet0", "kvbr0"), A.SetIsolated("nat", "vnet0", True)]
    assert plan(desired(n, ports={"vnet0": "nat"}), o, owned).actions == want
    assert attach_for(desired(n, ports={"vnet0": "nat"}), o, owned, "vnet0").actions == want


@pytest.mark.parametrize(("isolated", "isolate_ports", "expected"), [
    (True, True, []),  # converged
    (False, True, [A.SetIsolated("nat", "vnet0", True)]),  # drift: healed
    (None, True, [A.SetIsolated("nat", "vnet0", True)]),  # not reported: set it
    (True, False, [A.SetIsolated("nat", "vnet0", False)]),  # turned off in the config
    (False, False, []),
    (None, False, []),  # unknown and not wanted: no write
])
def test_port_isolation_is_desired_state(isolated: bool | None, isolate_ports: bool,
                                         expected: list[A.Action]) -> None:
    d, o, owned = _isolated_setup(isolated, isolate_ports)
    assert plan(d, o, owned).actions == expected
    assert attach_for(d, o, owned, "vnet0").actions == expected


def test_port_moved_to_a_network_without_isolation_is_only_enslaved() -> None:
    # The kernel makes a new bridge port: the old bridge's isolation does not follow it.
    a = net("nat", isolate_ports=True)
    b = net("iso", Mode.ISOLATED, "kvbr1", ipv4=V4("10.0.1.1/24"))
    br1 = Link(index=11, name="kvbr1", kind="bridge", up=True, stp=False, forward_delay=0)
    o = observed(BR, br1, Link(**{**vars(TAP), "master": 10, "isolated": True}),
                 addrs={10: {"10.0.0.254/24"}, 11: {"10.0.1.1/24"}}, fw=fingerprint([b, a]))
    owned = Owned(bridges={"kvbr0": "nat", "kvbr1": "iso"}, created={"kvbr0", "kvbr1"},
                  ports={"vnet0": "kvbr0"})
    p = plan(desired(a, b, ports={"vnet0": "iso"}), o, owned)
    assert p.actions == [A.Enslave("iso", "vnet0", "kvbr1")]
