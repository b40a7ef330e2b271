"""Doctor checks over hand-built snapshots: a healthy host first, then one fault at a time."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import replace
from typing import Any

import pytest

from kvmnetd.adapters.doctor_probe import learned_macs
from kvmnetd.app.doctor import DoctorInput, Finding, ForeignListener, render_text, run_checks
from kvmnetd.model.desired import Dhcp, DhcpRange, Mode, Network
from kvmnetd.model.observed import Link, ObservedState, Route
from kvmnetd.model.records import DhcpStatus, Lease, NetworkStatus
from kvmnetd.plan.foreign_forward import bridge_allowed, forward_drops

V4 = ipaddress.ip_interface
NETS = ipaddress.ip_network
GUEST_MAC = "52:54:00:00:00:01"
DHCP = Dhcp(ranges=(DhcpRange(ipaddress.ip_address("10.0.0.10"),
                              ipaddress.ip_address("10.0.0.99")),))


def net(name: str = "nat", mode: Mode = Mode.NAT, bridge: str = "kvbr0", **kw: Any) -> Network:
    kw.setdefault("ipv4", V4("10.0.0.1/24") if mode is not Mode.BRIDGED else None)
    kw.setdefault("dhcp", DHCP if mode is not Mode.BRIDGED else None)
    return Network(name=name, mode=mode, bridge=bridge, **kw)


def links(*extra: Link, br_up: bool = True, port_up: bool = True) -> dict[int, Link]:
    base = [Link(1, "lo", None, up=True), Link(2, "eth0", None, up=True),
            Link(10, "kvbr0", "bridge", up=br_up), Link(11, "vnet0", "tun", master=10, up=port_up)]
    return {lk.index: lk for lk in [*base, *extra]}


def rule(family: str, table: str, chain: str, handle: int, *expr: dict[str, Any],
         comment: str | None = None) -> dict[str, Any]:
    r: dict[str, Any] = {"family": family, "table": table, "chain": chain, "handle": handle,
                         "expr": list(expr)}
    if comment is not None:
        r["comment"] = comment
    return {"rule": r}


def chain(family: str, table: str, name: str, hook: str | None = None,
          policy: str = "accept") -> dict[str, Any]:
    c: dict[str, Any] = {"family": family, "table": table, "name": name}
    if hook:
        c.update(type="filter", hook=hook, prio=0, policy=policy)
    return {"chain": c}


def iface(key: str, name: str, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": {"meta": {"key": key}}, "right": name}}


OURS = [{"table": {"family": "inet", "name": "kvmnetd"}},
        chain("inet", "kvmnetd", "forward", "forward"),
        rule("inet", "kvmnetd", "forward", 5, iface("iifname", "kvbr0"), {"drop": None})]
DOCKER = [{"table": {"family": "ip", "name": "filter"}},
          chain("ip", "filter", "FORWARD", "forward", policy="drop"),
          chain("ip", "filter", "DOCKER-USER"),
          rule("ip", "filter", "FORWARD", 3, {"counter": {}}, {"jump": {"target": "DOCKER-USER"}})]


def ruleset(*items: dict[str, Any]) -> dict[str, Any]:
    return {"nftables": [{"metainfo": {"version": "1.0.6"}}, *OURS, *items]}


def healthy(**kw: Any) -> DoctorInput:
    nets = kw.pop("networks", [net()])
    obs = ObservedState(links=links(), routes={Route(NETS("0.0.0.0/0"), oif=2, gateway="x")},
                        forwarding={4: True, 6: True})
    base = DoctorInput(
        networks=nets, observed=obs,
        statuses=[NetworkStatus(n.name, str(n.mode), n.bridge, state="active",
                                dhcp=DhcpStatus("running", pid=5)) for n in nets],
        sysctls={"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1",
                 "net.bridge.bridge-nf-call-iptables": "1"},
        ruleset=ruleset(), leases={"nat": [Lease(GUEST_MAC, "10.0.0.10")]},
        ports={"vnet0": "nat"}, learned={"vnet0": (GUEST_MAC,)})
    return replace(base, **kw)


def checks(inp: DoctorInput) -> list[str]:
    return [f.check for f in run_checks(inp)]


def only(inp: DoctorInput, check: str) -> Finding:
    found = [f for f in run_checks(inp) if f.check == check]
    assert len(found) == 1, run_checks(inp)
    return found[0]


def test_healthy_host_has_no_findings() -> None:
    assert run_checks(healthy()) == []
    assert render_text([]) == "no problems found\n"


def test_ip_forwarding_off() -> None:
    f = only(healthy(sysctls={"net.ipv4.ip_forward": "0"}), "ip-forwarding-off")
    assert (f.severity, f.network, f.subject) == ("error", "nat", "net.ipv4.ip_forward")
    assert "sysctl -w net.ipv4.ip_forward=1" in f.fix
    # Isolated networks do not need it.
    assert checks(healthy(networks=[net(mode=Mode.ISOLATED)],
                          sysctls={"net.ipv4.ip_forward": "0"})) == []


def test_ipv6_and_per_bridge_forwarding() -> None:
    n = net(ipv6=V4("fd00::1/64"))
    f = only(healthy(networks=[n], sysctls={"net.ipv4.ip_forward": "1",
                                            "net.ipv6.conf.all.forwarding": "0"}),
             "ip-forwarding-off")
    assert f.subject == "net.ipv6.conf.all.forwarding"
    f = only(healthy(sysctls={"net.ipv4.ip_forward": "1",
                              "net.ipv4.conf.kvbr0.forwarding": "0"}), "ip-forwarding-off")
    assert f.fix == "sysctl -w net.ipv4.conf.kvbr0.forwarding=1"
    # The uplink's switch counts too (replies come in there); a dot in a name becomes '/'.
    up = net(uplink="eth0.7")
    obs = ObservedState(links=links(Link(3, "eth0.7", None, up=True)),
                        routes={Route(NETS("0.0.0.0/0"), oif=3)})
    f = only(healthy(networks=[up], observed=obs,
                     sysctls={"net.ipv4.ip_forward": "1",
                              "net.ipv4.conf.eth0/7.forwarding": "0"}), "ip-forwarding-off")
    assert f.subject == "net.ipv4.conf.eth0/7.forwarding"


def test_foreign_forward_policy_drop() -> None:
    f = only(healthy(ruleset=ruleset(*DOCKER)), "foreign-forward-drop")
    assert f.severity == "error" and f.subject == "table ip filter chain FORWARD"
    assert "policy drop" in f.message and "dropped by table ip filter chain FORWARD" in f.message
    assert "iptables -I DOCKER-USER -i kvbr0 -j ACCEPT" in f.fix


def test_coexistence_rule_in_docker_user_covers_the_bridge() -> None:
    accept = rule("ip", "filter", "DOCKER-USER", 9, iface("iifname", "kvbr0"), {"accept": None},
                  comment="kvmnetd: nat")
    assert checks(healthy(ruleset=ruleset(*DOCKER, accept))) == []
    # A coexistence rule for another bridge does not.
    other = rule("ip", "filter", "DOCKER-USER", 9, iface("iifname", "kvbr9"), {"accept": None},
                 comment="kvmnetd: other")
    assert "foreign-forward-drop" in checks(healthy(ruleset=ruleset(*DOCKER, other)))
    # A plain accept naming the bridge (e.g. iptables -i kvbr0 -j ACCEPT) counts too.
    plain = rule("ip", "filter", "DOCKER-USER", 9, iface("iifname", "kvbr*"), {"accept": None})
    assert checks(healthy(ruleset=ruleset(*DOCKER, plain))) == []


def test_unconditional_drop_rule_in_inet_table() -> None:
    items = [{"table": {"family": "inet", "name": "fw"}}, chain("inet", "fw", "fwd", "forward"),
             rule("inet", "fw", "fwd", 4, {"counter": {}}, {"drop": None})]
    f = only(healthy(ruleset=ruleset(*items)), "foreign-forward-drop")
    assert "rule handle 4" in f.message
    assert 'nft insert rule inet fw fwd iifname "kvbr0" accept' in f.fix
    # A conditional drop is not reported (it may well be meant for someone else).
    cond = rule("inet", "fw", "fwd", 4, iface("iifname", "eth9"), {"drop": None})
    assert forward_drops(ruleset(*items[:2], cond)) == []


def test_our_own_table_and_ip6_tables_do_not_count_for_ipv4_only_networks() -> None:
    ours = [chain("inet", "kvmnetd", "forward2", "forward", policy="drop")]
    assert checks(healthy(ruleset=ruleset(*ours))) == []
    v6 = [{"table": {"family": "ip6", "name": "filter"}},
          chain("ip6", "filter", "FORWARD", "forward", policy="drop")]
    assert checks(healthy(ruleset=ruleset(*v6))) == []


def test_firewalld_table_fix_names_the_zone() -> None:
    items = [chain("inet", "firewalld", "filter_FORWARD", "forward"),
             rule("inet", "firewalld", "filter_FORWARD", 7, {"reject": {"type": "icmpx"}})]
    f = only(healthy(ruleset=ruleset(*items)), "foreign-forward-drop")
    assert f.fix.startswith("firewall-cmd --zone=kvmnetd --add-interface=kvbr0")


def test_br_netfilter_on_isolated_network() -> None:
    iso = net("iso", Mode.ISOLATED)
    inp = healthy(networks=[iso], ruleset=ruleset(*DOCKER), leases={"iso": []}, learned={})
    f = only(inp, "br-netfilter")
    assert f.severity == "warning" and f.network == "iso"
    assert "iptables -I DOCKER-USER -i kvbr0 -o kvbr0 -j ACCEPT" in f.fix
    assert "net.bridge.bridge-nf-call-iptables=0" in f.fix
    off = replace(inp, sysctls={"net.bridge.bridge-nf-call-iptables": "0"})
    assert checks(off) == []


def test_foreign_dhcp_server() -> None:
    lst = ForeignListener("nat", 4242, "dnsmasq -i kvbr0", "UDP port 67 on 0.0.0.0 is taken")
    # Its dhcp-degraded echo is left out: the listener is the concrete cause.
    st = NetworkStatus("nat", "nat", "kvbr0", state="degraded", reason="dhcp: taken",
                       dhcp=DhcpStatus("failed", "taken"))
    f = only(healthy(listeners=[lst], statuses=[st]), "foreign-dhcp-server")
    assert f.subject == "pid 4242" and "kill 4242" in f.fix and "except-interface=kvbr0" in f.fix
    assert checks(healthy(listeners=[lst], statuses=[st])) == ["foreign-dhcp-server"]


def test_firewalld_zones() -> None:
    f = only(healthy(firewalld_running=True, firewalld_zones={}), "firewalld-zone-missing")
    assert f.fix.startswith("firewall-cmd --zone=kvmnetd --add-interface=kvbr0")
    f = only(healthy(firewalld_running=True, firewalld_zones={"kvbr0": "drop"}),
             "firewalld-zone-blocks")
    assert f.severity == "error"
    assert checks(healthy(firewalld_running=True, firewalld_zones={"kvbr0": "kvmnetd"})) == []
    assert checks(healthy(firewalld_running=False, firewalld_zones=None)) == []
    assert checks(healthy(firewalld_running=True, firewalld_zones=None)) == ["firewalld-unknown"]


def test_subnet_overlaps_host_route() -> None:
    routes = [Route(NETS("10.0.0.0/16"), oif=2), Route(NETS("10.0.0.0/24"), oif=10),
              Route(NETS("192.0.2.0/24"), oif=2)]
    f = only(healthy(host_routes=routes), "subnet-overlaps-host-route")
    assert f.subject == "10.0.0.0/16 dev eth0" and "ip route del 10.0.0.0/16 dev eth0" in f.fix


def test_bridge_no_ports_no_carrier_down_missing() -> None:
    obs = ObservedState(links={k: v for k, v in links().items() if v.name != "vnet0"},
                        routes={Route(NETS("0.0.0.0/0"), oif=2)})
    f = only(healthy(observed=obs, learned={}), "bridge-no-ports")
    assert f.severity == "info" and "kvmnetctl port attach TAP nat" in f.fix
    obs = replace(obs, links=links(port_up=False))
    assert only(healthy(observed=obs), "bridge-no-carrier").severity == "warning"
    obs = replace(obs, links=links(br_up=False))
    assert only(healthy(observed=obs), "bridge-down").fix == "ip link set kvbr0 up"
    obs = replace(obs, links={1: Link(1, "lo", None, up=True)})
    assert only(healthy(observed=obs), "bridge-missing").severity == "error"


def test_port_not_on_bridge() -> None:
    obs = ObservedState(links=links(Link(12, "vnet1", "tun", up=True)),
                        routes={Route(NETS("0.0.0.0/0"), oif=2)})
    f = only(healthy(observed=obs, ports={"vnet0": "nat", "vnet1": "nat"}), "port-not-on-bridge")
    assert f.subject == "vnet1" and "no bridge" in f.message


def test_guest_without_lease() -> None:
    f = only(healthy(leases={"nat": []}), "guest-without-lease")
    assert f.subject == "vnet0" and GUEST_MAC in f.message and "tcpdump -ni kvbr0" in f.fix
    # No DHCP on the network: nothing to expect.
    assert checks(healthy(networks=[net(dhcp=None)], leases={})) == []


def test_network_failed_and_dhcp_degraded() -> None:
    failed = NetworkStatus("nat", "nat", "kvbr0", state="failed", reason="bridge refused")
    f = only(healthy(statuses=[failed]), "network-failed")
    assert "bridge refused" in f.message and "kvmnetctl network start nat" in f.fix
    deg = NetworkStatus("nat", "nat", "kvbr0", state="degraded",
                        dhcp=DhcpStatus("failed", "dnsmasq not installed: apt-get install x"))
    f = only(healthy(statuses=[deg]), "dhcp-degraded")
    assert f.fix.startswith("apt-get install dnsmasq-base")


def test_uplink_default_route_and_our_table() -> None:
    f = only(healthy(networks=[net(uplink="wan9")]), "uplink-missing")
    assert f.subject == "wan9"
    obs = ObservedState(links=links())
    assert only(healthy(observed=obs), "host-no-default-route").severity == "warning"
    no_table: dict[str, Any] = {"nftables": [{"metainfo": {}}]}
    assert only(healthy(ruleset=no_table), "firewall-table-missing").severity == "error"
    assert checks(healthy(ruleset={})) == []  # unread: say nothing


def test_problems_and_no_networks() -> None:
    inp = healthy(networks=[], statuses=[], problems=["could not read the nftables ruleset"])
    assert sorted(checks(inp)) == ["doctor-incomplete", "no-active-networks"]


def test_order_json_and_text() -> None:
    inp = healthy(sysctls={"net.ipv4.ip_forward": "0"}, leases={"nat": []})
    found = run_checks(inp)
    assert [f.severity for f in found] == ["error", "warning"]
    assert json.loads(json.dumps([f.to_json() for f in found]))[0]["check"] == "ip-forwarding-off"
    text = render_text(found)
    assert text.startswith("error [ip-forwarding-off] nat: net.ipv4.ip_forward\n")
    assert "\n  fix: sysctl -w net.ipv4.ip_forward=1" in text


@pytest.mark.parametrize("right", ["kvbr0", {"set": ["x", "kvbr0"]}, ["kvbr0"]])
def test_bridge_allowed_match_forms(right: Any) -> None:
    rs = ruleset(*DOCKER, rule("ip", "filter", "FORWARD", 8,
                               {"match": {"op": "==", "left": {"meta": {"key": "oifname"}},
                                          "right": right}}, {"accept": None}))
    (drop,) = [d for d in forward_drops(rs) if d.table == "filter"]
    assert bridge_allowed(rs, drop, "kvbr0")
    assert not bridge_allowed(rs, drop, "kvbr1")


def test_learned_macs_skips_own_and_multicast_entries() -> None:
    entries = [
        {"mac": "33:33:00:00:00:01", "ifname": "kvbr0", "flags": ["self"], "state": "permanent"},
        {"mac": "fa:1a:4b:08:d6:32", "ifname": "vnet0", "flags": [], "master": "kvbr0",
         "state": ""},
        {"mac": "92:df:85:85:c3:a7", "ifname": "vnet0", "flags": [], "master": "kvbr0",
         "state": "permanent"},
        {"mac": "01:00:5e:00:00:01", "ifname": "vnet0", "flags": ["self"], "state": "permanent"},
    ]
    assert learned_macs(entries) == {"vnet0": ("fa:1a:4b:08:d6:32",)}
    assert learned_macs(None) == {}
