"""Rate limits: parsing, config, the planner's SetPortRate and the loop over fake tc."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import replace
from pathlib import Path

import pytest

from kvmnetd.adapters.rate.monitor import RTM_DELTFILTER, RTM_NEWTFILTER, tc_events
from kvmnetd.adapters.rate.tc import qdiscs_by_device
from kvmnetd.config import load as cfg
from kvmnetd.config.write import render_network_toml
from kvmnetd.engine.reconciler import Reconciler
from kvmnetd.model.desired import DesiredState, Mode, Network
from kvmnetd.model.errors import ConfigError
from kvmnetd.model.observed import Link, ObservedState, RateSeen
from kvmnetd.model.owned import Owned
from kvmnetd.model.rate import SetPortRate, format_rate, ifb_name, parse_rate
from kvmnetd.plan.planner import attach_for, plan
from kvmnetd.plan.rate import effective_rate, port_rates
from tests.support.fakes import FakeDhcp, FakeFirewall, FakeNetlink, FakeRates, FakeSysctl

MBIT20 = 2_500_000


@pytest.mark.parametrize("text, rate", [
    ("20mbit", MBIT20), ("20Mbit", MBIT20), ("20 mbit", MBIT20), ("1.5gbit", 187_500_000),
    ("100kbit", 12_500), ("10gbit", 1_250_000_000), ("2500kbps", MBIT20), ("1mibit", 131_072),
    ("8kbit", 1000),
])
def test_parse_rate(text: str, rate: int) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text, why", [
    ("20", "not a rate"), ("fast", "not a rate"), ("20 furlongs", "unknown rate unit"),
    ("1kbit", "outside"), ("-5mbit", "not a rate"), ("", "not a rate"),
])
def test_parse_rate_refuses(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_rate(text)


def test_format_rate_round_trips() -> None:
    for text in ("20mbit", "100kbit", "10gbit", "1500kbit", "12344bit"):
        assert format_rate(parse_rate(text)) == text
    # The kernel keeps whole bytes per second: a bit count is rounded down to one.
    assert format_rate(parse_rate("12345bit")) == "12344bit"
    assert format_rate(parse_rate("1.5gbit")) == "1500mbit"


def test_ifb_name_fits_the_kernel() -> None:
    assert ifb_name("vnet0", 7) == "kr-vnet0"
    assert ifb_name("a-very-long-if", 1234) == "kr1234"


CONF = """
[network.a]
mode = "nat"
bridge = "kva0"
ipv4 = "10.9.0.1/24"
port_rate = {rate}
"""


def test_config_port_rate_and_its_errors(tmp_path: Path) -> None:
    f = tmp_path / "k.toml"
    f.write_text(CONF.format(rate='"20mbit"'))
    conf = cfg.load(str(f), None)
    net = conf.networks["a"]
    assert net.port_rate == MBIT20
    # The writer (persisted runtime definitions) keeps it.
    other = replace(net, name="b", bridge="kvb0", ipv4=ipaddress.IPv4Interface("10.8.0.1/24"))
    assert cfg.parse_network_text(render_network_toml(other), "<t>", conf).port_rate == MBIT20
    f.write_text(CONF.format(rate='"none"'))
    assert cfg.load(str(f), None).networks["a"].port_rate is None
    for bad, why in (('"20 furlongs"', "unknown rate unit"), ("20", "expected a string"),
                     ('"3bit"', "outside")):
        f.write_text(CONF.format(rate=bad))
        with pytest.raises(ConfigError) as e:
            cfg.load(str(f), None)
        issue = str(e.value.issues[0])
        assert f"{f}:6: network.a.port_rate: " in issue and why in issue, issue


def nat(rate: int | None = MBIT20, name: str = "nat", bridge: str = "kvbr0") -> Network:
    return Network(name, Mode.NAT, bridge, ipv4=ipaddress.IPv4Interface("10.0.0.1/24"),
                   port_rate=rate)


BR = Link(index=2, name="kvbr0", kind="bridge", up=True, stp=False, forward_delay=0)
TAP = Link(index=5, name="vnet0", kind="tun", master=2, up=True, isolated=False)
IFB = Link(index=9, name="kr-vnet0", kind="ifb", up=True)


def state(*links: Link, rates: dict[str, RateSeen] | None = None) -> ObservedState:
    return ObservedState(links={lk.index: lk for lk in links}, forwarding={4: True, 6: True},
                         port_rates=rates or {})


def desired(net: Network, rates: dict[str, int] | None = None) -> DesiredState:
    return DesiredState(networks={net.name: net}, active=frozenset({net.name}),
                        ports={"vnet0": net.name}, rates=rates or {})


def rate_actions(d: DesiredState, o: ObservedState, owned: Owned) -> list[SetPortRate]:
    return [a for a in plan(d, o, owned).actions if isinstance(a, SetPortRate)]


def test_effective_rate_override_none_and_default() -> None:
    d = desired(nat())
    assert effective_rate(d, nat(), "vnet0") == MBIT20
    assert effective_rate(replace(d, rates={"vnet0": 0}), nat(), "vnet0") is None
    assert effective_rate(replace(d, rates={"vnet0": 1000}), nat(), "vnet0") == 1000
    assert effective_rate(d, nat(None), "vnet0") is None


def test_a_port_without_its_limit_gets_one_action_and_then_none() -> None:
    acts = rate_actions(desired(nat()), state(BR, TAP), Owned())
    assert acts == [SetPortRate("nat", "vnet0", MBIT20, "kr-vnet0")]
    done = state(BR, TAP, IFB, rates={"vnet0": RateSeen(MBIT20, MBIT20)})
    assert rate_actions(desired(nat()), done, Owned(limits={"vnet0": "kr-vnet0"})) == []


@pytest.mark.parametrize("seen, ifb", [
    (RateSeen(None, MBIT20), IFB),  # tc qdisc del dev vnet0 root
    (RateSeen(MBIT20, None), IFB),  # its ingress or the ifb's tbf gone
    (RateSeen(MBIT20, MBIT20), None),  # the ifb deleted
    (RateSeen(MBIT20 * 2, MBIT20 * 2), IFB),  # changed by hand
])
def test_damage_is_healed(seen: RateSeen, ifb: Link | None) -> None:
    links = [BR, TAP] + ([ifb] if ifb else [])
    o = state(*links, rates={"vnet0": seen})
    assert rate_actions(desired(nat()), o, Owned(limits={"vnet0": "kr-vnet0"})) == [
        SetPortRate("nat", "vnet0", MBIT20, "kr-vnet0")]


def test_no_limit_removes_only_ours() -> None:
    o = state(BR, TAP, IFB, rates={"vnet0": RateSeen(MBIT20, MBIT20)})
    # Someone else's tbf on a port with no limit of ours: left alone.
    assert rate_actions(desired(nat(None)), o, Owned()) == []
    owned = Owned(limits={"vnet0": "kr-vnet0"})
    assert rate_actions(desired(nat(None)), o, owned) == [
        SetPortRate("nat", "vnet0", None, "kr-vnet0")]
    assert rate_actions(desired(nat(), {"vnet0": 0}), o, owned) == [
        SetPortRate("nat", "vnet0", None, "kr-vnet0")]


def test_released_port_and_gone_network_lose_the_limit() -> None:
    o = state(BR, TAP, IFB, rates={"vnet0": RateSeen(MBIT20, MBIT20)})
    owned = Owned(bridges={"kvbr0": "nat"}, created={"kvbr0"}, ports={"vnet0": "kvbr0"},
                  limits={"vnet0": "kr-vnet0"})
    gone = DesiredState()
    acts = plan(gone, o, owned).actions
    assert SetPortRate(None, "vnet0", None, "kr-vnet0") in acts
    # The tap deleted: its ifb goes; once both are gone only the record is dropped.
    o2 = state(BR, IFB)
    assert rate_actions(desired(nat()), o2, owned) == [
        SetPortRate(None, "vnet0", None, "kr-vnet0")]
    p = plan(desired(nat()), state(BR), owned)
    assert p.forget_limits == ["vnet0"]
    one = attach_for(desired(nat()), state(BR, IFB), owned, "vnet0")
    assert one.actions == [SetPortRate(None, "vnet0", None, "kr-vnet0")]


def test_single_port_plan_sets_the_limit_with_the_attach() -> None:
    tap = replace(TAP, master=None)
    one = attach_for(desired(nat()), state(BR, tap), Owned(), "vnet0")
    assert [type(a).__name__ for a in one.actions] == ["Enslave", "SetPortRate"]


def test_port_rates_from_qdiscs() -> None:
    o = state(BR, TAP, IFB, Link(index=6, name="vnet1", kind="tun"))
    seen = port_rates({"vnet0": (MBIT20, True), "kr-vnet0": (MBIT20, False),
                       "vnet1": (None, True)}, o)
    assert seen == {"vnet0": RateSeen(MBIT20, MBIT20), "vnet1": RateSeen(None, None)}


async def test_loop_applies_heals_and_writes_nothing_when_right(tmp_path: Path) -> None:
    nl = FakeNetlink(Link(index=5, name="vnet0", kind="tun"))
    tc = FakeRates(nl)
    rec = Reconciler(nl, FakeFirewall(), FakeSysctl(), FakeDhcp(), str(tmp_path / "o.json"),
                     rate=tc)
    await rec.set_desired(desired(nat()))
    assert tc.qdiscs == {"vnet0": (MBIT20, True), "kr-vnet0": (MBIT20, False)}
    assert rec.owned.limits == {"vnet0": "kr-vnet0"}
    rec.rates_changed()
    before = rec.writes
    await rec.converge()
    assert rec.writes == before
    del tc.qdiscs["vnet0"]  # tc qdisc del ...
    rec.rates_changed()
    await rec.converge()
    assert tc.qdiscs["vnet0"] == (MBIT20, True)
    # An override of "none" lifts it; the record goes with it.
    await rec.set_desired(desired(nat(), {"vnet0": 0}))
    assert tc.qdiscs == {} and rec.owned.limits == {} and nl.observed.link("kr-vnet0") is None


async def test_a_refused_limit_is_that_ports_failure(tmp_path: Path) -> None:
    nl = FakeNetlink(Link(index=5, name="vnet0", kind="tun"))
    tc = FakeRates(nl)
    tc.fail_on.add("vnet0")
    rec = Reconciler(nl, FakeFirewall(), FakeSysctl(), FakeDhcp(), str(tmp_path / "o.json"),
                     rate=tc)
    await rec.set_desired(desired(nat()))
    assert rec.states["nat"].state == "active"
    assert "tc refused" in rec.port_errors["vnet0"]


def test_tc_events_devices_and_the_last_filter_event_per_device() -> None:
    def msg(kind: int, index: int) -> bytes:
        body = struct.pack("=BxxxiIII", 0, index, 0, 0xFFFF0000, 0)
        return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body
    data = (msg(RTM_DELTFILTER, 5) + msg(36, 6) + msg(RTM_NEWTFILTER, 5)
            + msg(RTM_DELTFILTER, 7))
    assert tc_events(data) == ({5, 6, 7}, {5: True, 7: False})
    assert tc_events(b"\x00" * 3) == (set(), {})


def test_a_lost_filter_counts_as_no_limit_from_the_guest() -> None:
    o = state(BR, TAP, IFB)
    qd = {"vnet0": (MBIT20, True), "kr-vnet0": (MBIT20, False)}
    assert port_rates(qd, o, {5}) == {"vnet0": RateSeen(MBIT20, None)}


def test_qdiscs_by_device_reads_tc_json() -> None:
    # As `tc -j qdisc show` prints them (iproute2 6.1): rates in bytes/s.
    listing = [
        {"kind": "tbf", "handle": "80b6:", "dev": "vnet0", "root": True, "refcnt": 3,
         "options": {"rate": 2500000, "burst": 50000, "lat": 60000}},
        {"kind": "ingress", "handle": "ffff:", "dev": "vnet0", "parent": "ffff:fff1",
         "options": {}},
        {"kind": "tbf", "handle": "8001:", "dev": "kr-vnet0", "root": True,
         "options": {"rate": 2500000}},
        {"kind": "pfifo_fast", "handle": "0:", "dev": "eth0", "root": True, "options": {}},
        {"kind": "ingress", "handle": "ffff:", "dev": "vnet1", "options": {}},
        "junk",
    ]
    assert qdiscs_by_device(listing) == {"vnet0": (MBIT20, True), "kr-vnet0": (MBIT20, False),
                                         "vnet1": (None, True)}


def test_a_foreign_device_with_the_ifbs_name_is_left_alone() -> None:
    foreign = Link(index=9, name="kr-vnet0", kind="veth", up=True)
    acts = rate_actions(desired(nat()), state(BR, TAP, foreign), Owned())
    assert acts == [SetPortRate("nat", "vnet0", MBIT20, "kr5")]
