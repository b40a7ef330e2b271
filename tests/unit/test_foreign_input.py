"""Foreign input chains against guests' DHCP/DNS/TFTP: hand-built `nft -j list ruleset` JSON."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any

import pytest

from kvmnetd.app.doctor import DoctorInput, run_checks
from kvmnetd.model.desired import Dhcp, DhcpRange, Dns, Mode, Network
from kvmnetd.model.observed import Link, ObservedState
from kvmnetd.plan.foreign_input import DHCP, DNS, TFTP, accept_fix, input_blocks, services_of

BR = "kvbr0"
DHCP_CONF = Dhcp(ranges=(DhcpRange(ipaddress.ip_address("10.0.0.10"),
                                   ipaddress.ip_address("10.0.0.99")),))


def chain(family: str, table: str, name: str, hook: str | None = None,
          policy: str = "accept") -> dict[str, Any]:
    c: dict[str, Any] = {"family": family, "table": table, "name": name}
    if hook:
        c.update(type="filter", hook=hook, prio=0, policy=policy)
    return {"chain": c}


def rule(family: str, table: str, chain_: str, handle: int, *expr: Any) -> dict[str, Any]:
    return {"rule": {"family": family, "table": table, "chain": chain_, "handle": handle,
                     "expr": list(expr)}}


def meta(key: str, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": {"meta": {"key": key}}, "right": right}}


def dport(right: Any, proto: str = "udp") -> dict[str, Any]:
    return {"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": "dport"}},
                      "right": right}}


def ct_state(*states: str) -> dict[str, Any]:
    return {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": list(states)}}


def xt(name: str) -> dict[str, Any]:
    return {"xt": {"type": "match", "name": name}}


COUNTER = {"counter": {"packets": 0, "bytes": 0}}
ACCEPT: dict[str, Any] = {"accept": None}
DROP: dict[str, Any] = {"drop": None}
REJECT: dict[str, Any] = {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}


def jump(target: str, kind: str = "jump") -> dict[str, Any]:
    return {kind: {"target": target}}


def doc(*items: dict[str, Any]) -> dict[str, Any]:
    return {"nftables": [{"metainfo": {"version": "1.0.6"}}, *items]}


# What `iptables -P INPUT DROP` plus ufw's layout look like through iptables-nft.
UFW = [
    chain("ip", "filter", "INPUT", "input", "drop"),
    chain("ip", "filter", "ufw-before-input"), chain("ip", "filter", "ufw-user-input"),
    chain("ip", "filter", "ufw-after-input"), chain("ip", "filter", "ufw-skip-to-policy-input"),
    rule("ip", "filter", "INPUT", 1, COUNTER, jump("ufw-before-input")),
    rule("ip", "filter", "INPUT", 2, COUNTER, jump("ufw-after-input")),
    rule("ip", "filter", "ufw-before-input", 3, meta("iifname", "lo"), COUNTER, ACCEPT),
    rule("ip", "filter", "ufw-before-input", 4, xt("conntrack"), COUNTER, ACCEPT),
    rule("ip", "filter", "ufw-before-input", 5, xt("conntrack"), COUNTER, DROP),
    rule("ip", "filter", "ufw-before-input", 6, dport(68), COUNTER, ACCEPT),
    rule("ip", "filter", "ufw-before-input", 7, COUNTER, jump("ufw-user-input")),
    rule("ip", "filter", "ufw-after-input", 8, xt("addrtype"), COUNTER,
         jump("ufw-skip-to-policy-input")),
    rule("ip", "filter", "ufw-skip-to-policy-input", 9, COUNTER, DROP),
]

# firewalld's nftables backend: zones dispatch by interface, the zone rejects the rest.
FIREWALLD = [
    chain("inet", "firewalld", "filter_INPUT", "input", "accept"),
    chain("inet", "firewalld", "filter_INPUT_ZONES"),
    chain("inet", "firewalld", "filter_IN_public"),
    chain("inet", "firewalld", "filter_IN_public_allow"),
    rule("inet", "firewalld", "filter_INPUT", 1, ct_state("established", "related"), ACCEPT),
    rule("inet", "firewalld", "filter_INPUT", 2, meta("iifname", "lo"), ACCEPT),
    rule("inet", "firewalld", "filter_INPUT", 3, jump("filter_INPUT_ZONES")),
    rule("inet", "firewalld", "filter_INPUT", 4, ct_state("invalid"), DROP),
    rule("inet", "firewalld", "filter_INPUT", 5, REJECT),
    rule("inet", "firewalld", "filter_INPUT_ZONES", 6, jump("filter_IN_public", "goto")),
    rule("inet", "firewalld", "filter_IN_public", 7, jump("filter_IN_public_allow")),
    rule("inet", "firewalld", "filter_IN_public", 8, meta("l4proto", {"set": ["icmp"]}), ACCEPT),
    rule("inet", "firewalld", "filter_IN_public", 9, REJECT),
    rule("inet", "firewalld", "filter_IN_public_allow", 10, dport(22, "tcp"), ACCEPT),
]

OURS = [chain("inet", "kvmnetd", "input", "input", "drop"),
        rule("inet", "kvmnetd", "input", 1, meta("iifname", BR), dport(67), ACCEPT)]

V4_ONLY = (DHCP, DNS)


def found(*items: dict[str, Any], services: Any = V4_ONLY) -> dict[str, tuple[str, ...]]:
    return {b.where: tuple(s.name for s in b.services)
            for b in input_blocks(doc(*items), BR, services)}


def test_iptables_input_policy_drop_blocks_dhcp_and_dns() -> None:
    blocks = input_blocks(doc(chain("ip", "filter", "INPUT", "input", "drop")), BR, V4_ONLY)
    assert [(b.where, b.how) for b in blocks] == [("table ip filter chain INPUT", "policy drop")]
    assert accept_fix(blocks[0], BR) == ("iptables -I INPUT -i kvbr0 -p udp --dport 67 -j ACCEPT"
                                         "; iptables -I INPUT -i kvbr0 -p udp --dport 53 -j ACCEPT")


def test_a_drop_rule_before_any_accept() -> None:
    items = [chain("ip", "filter", "INPUT", "input"),
             rule("ip", "filter", "INPUT", 7, dport(67), COUNTER, DROP),
             rule("ip", "filter", "INPUT", 8, meta("iifname", BR), ACCEPT)]
    blocks = input_blocks(doc(*items), BR, V4_ONLY)
    assert [(b.services, b.how) for b in blocks] == [
        ((DHCP,), "rule handle 7 in chain INPUT drops it")]


def test_an_accept_for_the_bridge_first_lets_it_through() -> None:
    items = [chain("ip", "filter", "INPUT", "input"),
             rule("ip", "filter", "INPUT", 8, meta("iifname", "kvbr*"), ACCEPT),
             rule("ip", "filter", "INPUT", 7, dport({"set": [53, 67]}), DROP)]
    assert found(*items) == {}


def test_ufw_without_allow_rules_and_with_them() -> None:
    assert found(*UFW) == {"table ip filter chain INPUT": ("DHCP", "DNS")}
    block = input_blocks(doc(*UFW), BR, V4_ONLY)[0]
    assert block.ufw
    assert accept_fix(block, BR) == ("ufw allow in on kvbr0 to any port 67 proto udp; "
                                     "ufw allow in on kvbr0 to any port 53 proto udp")
    allowed = [*UFW, rule("ip", "filter", "ufw-user-input", 20, meta("iifname", BR), dport(67),
                          COUNTER, ACCEPT)]
    assert found(*allowed) == {"table ip filter chain INPUT": ("DNS",)}


def test_inet_filter_input_policy_drop_and_its_accept() -> None:
    base = chain("inet", "filter", "input", "input", "drop")
    assert found(base) == {"table inet filter chain input": ("DHCP", "DNS")}
    block = input_blocks(doc(base), BR, [DHCP, DNS])[0]
    assert accept_fix(block, BR) == ('nft insert rule inet filter input iifname "kvbr0" '
                                     "udp dport { 67, 53 } accept")
    ok = rule("inet", "filter", "input", 3, meta("iifname", {"set": ["lo", BR]}),
              dport({"set": [53, {"range": [60, 70]}]}), ACCEPT)
    assert found(base, ok) == {}


def test_firewalld_zone_rejects_and_the_fix_names_the_zone() -> None:
    assert found(*FIREWALLD) == {"table inet firewalld chain filter_INPUT": ("DHCP", "DNS")}
    block = input_blocks(doc(*FIREWALLD), BR, V4_ONLY)[0]
    fix = accept_fix(block, BR, "public")
    assert "firewall-cmd --zone=kvmnetd --add-interface=kvbr0" in fix
    assert "firewall-cmd --zone=public --add-service=dhcp --add-service=dns" in fix


def test_a_match_that_cannot_be_judged_is_no_finding() -> None:
    items = [chain("ip", "filter", "INPUT", "input", "drop"),
             rule("ip", "filter", "INPUT", 1, {"match": {"op": "==", "left": {"payload": {
                 "protocol": "ip", "field": "saddr"}}, "right": {"prefix": {
                     "addr": "10.0.0.0", "len": 24}}}}, ACCEPT)]
    assert found(*items) == {}
    # A drop that may or may not apply is no finding either.
    items = [chain("ip", "filter", "INPUT", "input"),
             rule("ip", "filter", "INPUT", 1, xt("addrtype"), DROP)]
    assert found(*items) == {}


def test_our_own_table_other_hooks_and_other_families() -> None:
    assert found(*OURS) == {}  # our table: the renderer's golden files cover it
    assert found(chain("ip", "filter", "FORWARD", "forward", "drop")) == {}
    assert found(chain("ip", "filter", "OUTPUT", "output", "drop")) == {}
    # IPv6 tables: DHCP (v4) never passes there; DNS does for a network with IPv6.
    v6 = chain("ip6", "filter", "INPUT", "input", "drop")
    assert found(v6, services=[DHCP, replace(DNS, families=frozenset({4}))]) == {}
    assert found(v6, services=[DNS]) == {"table ip6 filter chain INPUT": ("DNS",)}
    # A jump loop decides nothing.
    loop = [chain("ip", "filter", "INPUT", "input", "drop"), chain("ip", "filter", "a"),
            rule("ip", "filter", "INPUT", 1, jump("a")), rule("ip", "filter", "a", 2, jump("a"))]
    assert found(*loop) == {}


@pytest.mark.parametrize(("kw", "want"), [
    ({}, ["DHCP", "DNS"]),
    ({"dns": Dns(enabled=False)}, ["DHCP"]),
    ({"dhcp": None, "dns": Dns(enabled=False)}, []),
    ({"dhcp": replace(DHCP_CONF, tftp_root="/srv/tftp")}, ["DHCP", "DNS", "TFTP"]),
])
def test_services_a_network_needs(kw: dict[str, Any], want: list[str]) -> None:
    n = Network("n", Mode.ISOLATED, BR, ipaddress.IPv4Interface("10.0.0.1/24"),
                **{"dhcp": DHCP_CONF, **kw})
    assert [s.name for s in services_of(n)] == want
    assert TFTP.port == 69


def test_doctor_reports_it_with_the_fix() -> None:
    n = Network("nat", Mode.NAT, BR, ipaddress.IPv4Interface("10.0.0.1/24"), dhcp=DHCP_CONF)
    obs = ObservedState(links={10: Link(10, BR, "bridge", up=True)})
    inp = DoctorInput(networks=[n], observed=obs, ruleset=doc(*UFW, *OURS))
    f = next(f for f in run_checks(inp) if f.check == "foreign-input-drop")
    assert f.network == "nat" and f.severity == "error"
    assert f.subject == "table ip filter chain INPUT"
    assert "DHCP (udp/67), DNS (udp/53)" in f.message and f.fix.startswith("ufw allow in on")
