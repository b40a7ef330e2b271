"""Coexistence with foreign forward drops: which accepts go where; the diff with what is there."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any

import pytest

from kvmnetd.adapters.coexist import transaction
from kvmnetd.adapters.nftmonitor import is_change
from kvmnetd.model.desired import Mode, Network
from kvmnetd.model.forward import Forward
from kvmnetd.plan.coexist import (
    ChainRef,
    CoexistRule,
    ForeignForward,
    InstalledRule,
    changes,
    coexist_rules,
    rule_text,
)
from kvmnetd.plan.foreign_forward import parse_ruleset

v4 = ipaddress.IPv4Interface
v6 = ipaddress.IPv6Interface
DU4 = ChainRef("ip", "filter", "DOCKER-USER")
DU6 = ChainRef("ip6", "filter", "DOCKER-USER")
FWD4 = ChainRef("ip", "filter", "FORWARD")
FW = ChainRef("inet", "fw", "forward")

NAT = Network("nat", Mode.NAT, "kvnat0", v4("10.50.0.1/24"), v6("fd00:50::1/64"))
ISO = Network("iso", Mode.ISOLATED, "kviso0", v4("10.51.0.1/24"))
RT = Network("rt", Mode.ROUTED, "kvrt0", v4("10.52.0.1/24"), uplink="up0")
LAN = Network("lan", Mode.BRIDGED, "kvlan0", uplink="eth0")


def texts(plan_rules: tuple[CoexistRule, ...], chain: ChainRef) -> list[str]:
    return [r.text for r in plan_rules if r.chain == chain]


def test_nothing_to_do_without_a_foreign_drop() -> None:
    p = coexist_rules([NAT, ISO], ForeignForward())
    assert p.rules == () and p.reports == ()


def test_docker_user_gets_narrow_accepts_in_a_form_iptables_nft_can_read() -> None:
    docker = ForeignForward(drops=(FWD4,), user_chains=frozenset({DU4}))
    p = coexist_rules([NAT, ISO, RT, LAN], docker)
    assert {r.chain for r in p.rules} == {DU4}
    assert texts(p.rules, DU4) == [
        'iifname "kviso0" oifname "kviso0" accept comment "kvmnetd:iso"',
        'iifname "kvlan0" oifname "kvlan0" accept comment "kvmnetd:lan"',
        'iifname "kvnat0" oifname "kvnat0" accept comment "kvmnetd:nat"',
        'iifname "kvnat0" ip saddr 10.50.0.0/24 accept comment "kvmnetd:nat"',
        # no ct match inside iptables-nft chains: our own table keeps replies-only
        'oifname "kvnat0" ip daddr 10.50.0.0/24 accept comment "kvmnetd:nat"',
        'iifname "kvrt0" oifname "kvrt0" accept comment "kvmnetd:rt"',
        'iifname "kvrt0" oifname "up0" ip saddr 10.52.0.0/24 accept comment "kvmnetd:rt"',
        'oifname "kvrt0" ip daddr 10.52.0.0/24 accept comment "kvmnetd:rt"',
    ]
    assert all("ct " not in r.text for r in p.rules)


def test_forward_itself_when_it_drops_and_there_is_no_docker_user() -> None:
    p = coexist_rules([NAT], ForeignForward(drops=(FWD4,)))
    assert {r.chain for r in p.rules} == {FWD4}


def test_docker_user_is_used_even_before_the_policy_flips() -> None:
    p = coexist_rules([NAT], ForeignForward(user_chains=frozenset({DU4})))
    assert {r.chain for r in p.rules} == {DU4}


def test_ipv6_rules_go_to_the_ip6_table_only() -> None:
    p = coexist_rules([NAT], ForeignForward(user_chains=frozenset({DU4, DU6})))
    six = texts(p.rules, DU6)
    assert 'iifname "kvnat0" ip6 saddr fd00:50::/64 accept comment "kvmnetd:nat"' in six
    assert not any(" ip " in t for t in six)
    assert not any("ip6" in t for t in texts(p.rules, DU4))


def test_foreign_nft_table_is_reported_not_touched_by_default() -> None:
    p = coexist_rules([NAT], ForeignForward(drops=(FW,)))
    assert p.rules == ()
    assert len(p.reports) == 1 and "inet fw" in p.reports[0]


def test_foreign_nft_table_with_mode_all_keeps_the_ct_restriction() -> None:
    p = coexist_rules([NAT], ForeignForward(drops=(FW,)), mode="all")
    fw = texts(p.rules, FW)
    assert 'oifname "kvnat0" ip daddr 10.50.0.0/24 ct state established,related accept ' \
           'comment "kvmnetd:nat"' in fw
    assert 'iifname "kvnat0" ip6 saddr fd00:50::/64 accept comment "kvmnetd:nat"' in fw
    assert p.reports == ()


def test_port_forwards_let_dnat_flows_through_a_foreign_nft_drop() -> None:
    with_fwd = replace(NAT, port_forwards=(Forward("tcp", 80, 80, "10.50.0.5"),))
    accept = 'oifname "kvnat0" ip daddr 10.50.0.0/24 ct status dnat accept comment "kvmnetd:nat"'
    assert accept in texts(coexist_rules([with_fwd], ForeignForward(drops=(FW,)),
                                         mode="all").rules, FW)
    assert accept not in texts(coexist_rules([NAT], ForeignForward(drops=(FW,)),
                                             mode="all").rules, FW)


def test_off_inserts_nothing_and_says_why() -> None:
    p = coexist_rules([NAT], ForeignForward(drops=(FWD4,), user_chains=frozenset({DU4})),
                      mode="off")
    assert p.rules == () and "coexist is off" in p.reports[0]
    with pytest.raises(ValueError):
        coexist_rules([NAT], ForeignForward(), mode="sometimes")


def test_changes_are_minimal_and_delete_only_tagged_rules() -> None:
    want = coexist_rules([NAT], ForeignForward(user_chains=frozenset({DU4}))).rules
    have = tuple(InstalledRule(DU4, 10 + i, r.text) for i, r in enumerate(want))
    assert not changes(want, have)
    stale = InstalledRule(FWD4, 3, 'iifname "old0" oifname "old0" accept comment "kvmnetd:old"')
    dup = InstalledRule(DU4, 99, want[0].text)
    c = changes(want[:-1], (*have, stale, dup))
    assert {r.handle for r in c.delete} == {3, 99, 10 + len(want) - 1}
    assert c.insert == ()
    c = changes(want, have[1:])
    assert c.insert == (want[0],) and c.delete == ()


def test_transaction_keeps_rendered_order_at_the_top() -> None:
    want = coexist_rules([ISO, NAT], ForeignForward(user_chains=frozenset({DU4}))).rules
    old = InstalledRule(DU4, 7, "x")
    lines = transaction(changes(want, (old,))).splitlines()
    assert lines[0] == "delete rule ip filter DOCKER-USER handle 7"
    # nft inserts each at the top: the last rendered goes in first.
    assert lines[1:] == [f"insert rule ip filter DOCKER-USER {r.text}" for r in reversed(want)]


def _rule(chain: ChainRef, handle: int, expr: list[Any], comment: str | None = None
          ) -> dict[str, Any]:
    r: dict[str, Any] = {"family": chain.family, "table": chain.table, "chain": chain.chain,
                         "handle": handle, "expr": expr}
    if comment is not None:
        r["comment"] = comment
    return {"rule": r}


def _m(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


IIF = {"meta": {"key": "iifname"}}
OIF = {"meta": {"key": "oifname"}}
DADDR = {"payload": {"protocol": "ip", "field": "daddr"}}
PREFIX = {"prefix": {"addr": "10.50.0.0", "len": 24}}

# As nft 1.0.6 prints it after Docker (iptables-nft) and a pure-nft firewall set up.
RULESET: dict[str, Any] = {"nftables": [
    {"metainfo": {"version": "1.0.6"}},
    {"table": {"family": "ip", "name": "filter", "handle": 1}},
    {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "handle": 1,
               "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}},
    {"chain": {"family": "ip", "table": "filter", "name": "DOCKER-USER", "handle": 2}},
    _rule(FWD4, 3, [{"counter": {"packets": 0, "bytes": 0}},
                    {"jump": {"target": "DOCKER-USER"}}]),
    _rule(DU4, 6, [_m(OIF, "kvnat0"), _m(DADDR, PREFIX), {"accept": None}], "kvmnetd:nat"),
    _rule(DU4, 5, [_m(IIF, "kvnat0"), _m(OIF, "kvnat0"), {"counter": {"packets": 1, "bytes": 2}},
                   {"accept": None}], "kvmnetd:nat"),
    _rule(DU4, 4, [{"counter": {"packets": 0, "bytes": 0}}, {"return": None}]),
    {"chain": {"family": "inet", "table": "fw", "name": "forward", "handle": 1,
               "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}},
    _rule(FW, 2, [{"counter": {"packets": 0, "bytes": 0}},
                  {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}]),
    {"chain": {"family": "inet", "table": "kvmnetd", "name": "forward", "handle": 1,
               "type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}},
    {"chain": {"family": "inet", "table": "open", "name": "forward", "handle": 1,
               "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}},
]}


def test_parse_ruleset_finds_drops_docker_user_and_our_rules() -> None:
    ff = parse_ruleset(RULESET)
    assert set(ff.drops) == {FWD4, FW}  # not our own table, not an accepting chain
    assert ff.user_chains == frozenset({DU4})
    assert [(r.handle, r.text) for r in ff.ours] == [
        (6, 'oifname "kvnat0" ip daddr 10.50.0.0/24 accept comment "kvmnetd:nat"'),
        (5, 'iifname "kvnat0" oifname "kvnat0" accept comment "kvmnetd:nat"'),
    ]
    want = coexist_rules([ISO, NAT], ff).rules
    c = changes(want, ff.ours)
    assert c.delete == ()  # both already there, read back as rendered
    assert len(c.insert) == len(want) - 2


def test_docker_user_without_a_jump_from_forward_is_not_used() -> None:
    doc = {"nftables": [i for i in RULESET["nftables"]
                        if i.get("rule", {}).get("handle") != 3 or "jump" not in str(i)]}
    assert parse_ruleset(doc).user_chains == frozenset()


def test_rule_text_reads_ct_sets_and_host_addresses_and_refuses_the_rest() -> None:
    ct = {"ct": {"key": "state"}}
    assert rule_text([_m(ct, ["related", "established"], "in"), {"accept": None}], None) \
        == "ct state established,related accept"
    assert rule_text([_m(DADDR, "10.0.0.1"), {"accept": None}], None) \
        == "ip daddr 10.0.0.1/32 accept"
    assert rule_text([{"xt": {"type": "match", "name": "comment"}}, {"accept": None}], "x") == ""
    assert rule_text([_m(IIF, "a", "!="), {"accept": None}], None) == ""


def test_monitor_ignores_set_elements_and_comments() -> None:
    assert is_change("add rule inet kvmnetd forward accept\n")
    assert is_change("delete table inet kvmnetd")
    assert not is_change("add element inet f2b addr { 192.0.2.7 }")
    assert not is_change("add element inet f2b addr { 192.0.2.7 }", "kvmnetd")
    # Our own table's elements (port forwards' maps) are ours to heal.
    assert is_change("delete element inet kvmnetd forward0_ip_port { tcp . 80 : 10.0.0.5 . 80 }",
                     "kvmnetd")
    assert not is_change("# new generation 5 by process 1 (nft)")
    assert not is_change("\n")

