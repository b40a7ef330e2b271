"""One table of attach-policy cases, run through every caller: the planner, the loop's
new-tap path, the port API's default network and libvirt domains' NICs."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from kvmnetd.app.core import Core
from kvmnetd.app.domains import network_for_nic
from kvmnetd.config.load import Config
from kvmnetd.engine.reconciler import Reconciler
from kvmnetd.model.desired import AttachRule, DesiredState, Mode, Network, Settings
from kvmnetd.model.domxml import DomainNic
from kvmnetd.model.errors import InvalidArgument
from kvmnetd.model.observed import Link
from kvmnetd.plan.planner import port_network, wanted_ports
from tests.support.fakes import FakeDhcp, FakeFirewall, FakeNetlink, FakeSysctl

NETS = {name: Network(name, Mode.ISOLATED, f"kvp{i}",
                      ipv4=ipaddress.IPv4Interface(f"10.9.{i}.1/24"))
        for i, name in enumerate(("a", "b", "c"))}
MAC = "52:54:00:12:34:56"

# (rules, active networks, tap name, its MAC, where it goes)
CASES = [
    ((AttachRule("a", ifname="vnet*"),), {"a"}, "vnet0", MAC, "a"),
    ((AttachRule("a", ifname="vnet*"),), {"b"}, "vnet0", MAC, None),
    # The first rule's network is stopped: policy falls through to the next rule.
    ((AttachRule("a", ifname="vnet*"), AttachRule("b", ifname="vnet*")), {"b"}, "vnet0",
     MAC, "b"),
    ((AttachRule("a", ifname="vnet*"), AttachRule("b", ifname="vnet*")), {"a", "b"}, "vnet0",
     MAC, "a"),
    ((AttachRule("a", ifname="tap*"),), {"a"}, "vnet0", MAC, None),
    ((AttachRule("b", mac="52:54:00:12"),), {"b"}, "vnet0", MAC, "b"),
    ((AttachRule("b", mac="52:54:00:99:*"),), {"b"}, "vnet0", MAC, None),
    ((AttachRule("c", ifname="vnet*", mac="52:54:00:*"),), {"c"}, "vnet7", MAC, "c"),
    # A rule naming a domain is for that domain's NICs, not for every tap.
    ((AttachRule("a", domain="web1"), AttachRule("c", ifname="vnet*")), {"a", "c"}, "vnet0",
     MAC, "c"),
    ((), {"a"}, "vnet0", MAC, None),
]
IDS = [f"case{i}" for i in range(len(CASES))]


def desired(rules: tuple[AttachRule, ...], active: set[str]) -> DesiredState:
    return DesiredState(networks=NETS, active=frozenset(active), rules=rules)


def tap(name: str, mac: str) -> Link:
    return Link(index=50, name=name, kind="tun", mac=mac)


@pytest.mark.parametrize(("rules", "active", "name", "mac", "want"), CASES, ids=IDS)
def test_planner(rules: tuple[AttachRule, ...], active: set[str], name: str, mac: str,
                 want: str | None) -> None:
    nl = FakeNetlink(tap(name, mac))
    d = desired(rules, active)
    assert port_network(d, nl.observed, name) == want
    assert wanted_ports(d, nl.observed).get(name) == want


@pytest.mark.parametrize(("rules", "active", "name", "mac", "want"), CASES, ids=IDS)
async def test_loop_new_tap(tmp_path: Path, rules: tuple[AttachRule, ...], active: set[str],
                            name: str, mac: str, want: str | None) -> None:
    nl = FakeNetlink()
    rec = Reconciler(nl, FakeFirewall(), FakeSysctl(), FakeDhcp(), str(tmp_path / "o.json"))
    await rec.set_desired(desired(rules, active))
    link = tap(name, mac)
    nl.observed.links[link.index] = link
    rec.links_added([link])
    await rec.apply_queued()
    now = nl.observed.link(name)
    assert now is not None
    assert nl.observed.name_of(now.master) == (NETS[want].bridge if want else None)


@pytest.mark.parametrize(("rules", "active", "name", "mac", "want"), CASES, ids=IDS)
async def test_port_api_default(tmp_path: Path, rules: tuple[AttachRule, ...],
                                active: set[str], name: str, mac: str,
                                want: str | None) -> None:
    nl = FakeNetlink(tap(name, mac))
    rec = Reconciler(nl, FakeFirewall(), FakeSysctl(), FakeDhcp(), str(tmp_path / "o.json"))
    conf = Config(settings=Settings(), networks=NETS, rules=rules, files=())
    core = Core(rec, conf)
    rec.desired = core.build_desired({})
    core.started, core.stopped = set(active), set(NETS) - set(active)
    rec.desired = core.build_desired({})
    if want is None:
        with pytest.raises(InvalidArgument):
            core.network_by_policy(name)
    else:
        assert core.network_by_policy(name) == want


@pytest.mark.parametrize(("rules", "active", "name", "mac", "want"), CASES, ids=IDS)
def test_domain_nic(rules: tuple[AttachRule, ...], active: set[str], name: str, mac: str,
                    want: str | None) -> None:
    d = desired(rules, active)
    nic = DomainNic(tap=name, mac=mac, kind="ethernet", bridge=None, network=None)
    assert network_for_nic(nic, "other", "uuid-0", d.policy, d.networks, d.active) == want


def test_domain_rules_come_first_and_skip_stopped_networks() -> None:
    rules = (AttachRule("a", domain="web1"), AttachRule("b", domain="web1"),
             AttachRule("c", ifname="vnet*"))
    nic = DomainNic(tap="vnet0", mac=MAC, kind="ethernet", bridge=None, network=None)
    d = desired(rules, {"a", "b", "c"})
    assert network_for_nic(nic, "web1", "u", d.policy, d.networks, d.active) == "a"
    d = desired(rules, {"b", "c"})
    assert network_for_nic(nic, "web1", "u", d.policy, d.networks, d.active) == "b"
    assert network_for_nic(nic, "web2", "u", d.policy, d.networks, d.active) == "c"


def test_one_policy_per_config_load(tmp_path: Path) -> None:
    rules = (AttachRule("a", ifname="vnet*"),)
    rec = Reconciler(FakeNetlink(), FakeFirewall(), FakeSysctl(), FakeDhcp(),
                     str(tmp_path / "o.json"))
    core = Core(rec, Config(settings=Settings(), networks=NETS, rules=rules, files=()))
    first = core.build_desired({}).policy
    assert core.build_desired({"x": "a"}).policy is first
    assert core.policy is first
