"""Anti-spoofing: the bridge table's rendering (golden file), its elements, the planner's
actions and the loop's order (a port never joins before its guard), and MAC learning."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import struct
from dataclasses import replace
from pathlib import Path

import pytest

from kvmnetd.adapters.fdb import bridge_fdb
from kvmnetd.app.core import Core
from kvmnetd.app.domains import domain_changed
from kvmnetd.app.port_identity import PortIdentities, duid_mac
from kvmnetd.config import load as cfg
from kvmnetd.config.load import Config, parse_network_text
from kvmnetd.engine.reconciler import Reconciler
from kvmnetd.model import actions as A
from kvmnetd.model.desired import DesiredState, Dhcp, DhcpHost, Mode, Network, Settings
from kvmnetd.model.domxml import DomainNic
from kvmnetd.model.errors import ConfigError
from kvmnetd.model.guard import GuardElement, PortIdentity
from kvmnetd.model.observed import RTPROT_RA, Link, ObservedState, Route
from kvmnetd.model.owned import Owned
from kvmnetd.model.records import ROOT, CoreEvent, Lease
from kvmnetd.plan.nft_bridge import (
    eui64,
    fingerprint,
    port_addresses,
    port_elements,
    port_of,
    render_table,
    render_update,
)
from kvmnetd.plan.planner import attach_for, plan
from tests.support.core import tap
from tests.support.fakes import FakeDhcp, FakeFirewall, FakeNetlink, FakePortGuard, FakeSysctl
from tests.support.toml import daemon_toml, network_toml

GOLDEN = Path(__file__).parent.parent / "golden" / "port_guard.nft"
MAC = "52:54:00:12:34:56"


def guarded(**kw: object) -> Network:
    kw.setdefault("dhcp", Dhcp(hosts=(DhcpHost(mac=MAC, ip=ipaddress.IPv4Address(
        "10.0.0.7")),)))
    return Network("lab", Mode.NAT, "kvbr0", ipv4=ipaddress.IPv4Interface("10.0.0.254/24"),
                   ipv6=ipaddress.IPv6Interface("fd00:1::1/64"), anti_spoofing=True,
                   **kw)  # type: ignore[arg-type]


def test_eui64_is_the_address_slaac_derives() -> None:
    assert str(eui64(MAC, ipaddress.IPv6Network("fe80::/64"))) == "fe80::5054:ff:fe12:3456"
    assert str(eui64(MAC, ipaddress.IPv6Network("fd00:1::/64"))) == "fd00:1::5054:ff:fe12:3456"


def test_a_port_may_send_from_its_lease_static_host_link_local_and_slaac() -> None:
    # A lease from another network's subnet (the guest moved) does not count here.
    ident = PortIdentity(MAC, frozenset({"10.0.0.20", "10.9.9.9"}),
                         frozenset({"fd00:1::99", "fd00:9::9"}))
    v4, v6 = port_addresses(guarded(), ident)
    assert [str(a) for a in v4] == ["10.0.0.7", "10.0.0.20"]
    assert [str(a) for a in v6] == ["fd00:1::99", "fd00:1::5054:ff:fe12:3456",
                                    "fe80::5054:ff:fe12:3456"]


def test_a_port_without_a_known_mac_is_guarded_but_bound_to_nothing() -> None:
    assert port_elements("vnet0", guarded(), None) == {("ports", '"vnet0"'),
                                                       ("drops", '"vnet0"')}


def test_the_table_matches_the_golden_file() -> None:
    elements = port_elements("vnet0", guarded(), PortIdentity(MAC, frozenset({"10.0.0.20"})))
    elements |= port_elements("vnet1", guarded(), None)
    text = render_table(elements)
    if os.environ.get("KVMNETD_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()
    assert f'comment "kvmnetd {fingerprint()}"' in text


def test_an_update_deletes_first_and_is_empty_without_changes() -> None:
    text = render_update({("addr4", '"vnet0" . 10.0.0.21')}, {("addr4", '"vnet0" . 10.0.0.20')})
    assert text.splitlines() == [
        'delete element bridge kvmnetd addr4 { "vnet0" . 10.0.0.20 }',
        'add element bridge kvmnetd addr4 { "vnet0" . 10.0.0.21 }',
    ]
    assert render_update(set(), set()) == ""


def test_config_reads_the_flag_and_refuses_it_on_a_bridged_network() -> None:
    conf = Config(Settings(), {}, (), ())
    net = parse_network_text('[network.lab]\nipv4 = "10.9.0.1/24"\nanti_spoofing = true\n',
                             "lab.toml", conf)
    assert net.anti_spoofing
    assert not parse_network_text('[network.lab]\nipv4 = "10.9.0.1/24"\n', "lab.toml",
                                  conf).anti_spoofing
    with pytest.raises(ConfigError) as e:
        parse_network_text('[network.lan]\nmode = "bridged"\nuplink = "eth0"\n'
                           "anti_spoofing = true\n", "lan.toml", conf)
    assert "lan.toml:4: network.lan.anti_spoofing" in str(e.value)


# ---- the planner ---------------------------------------------------------------------------

BR = Link(index=2, name="kvbr0", kind="bridge", up=True)
TAP = Link(index=5, name="vnet0", kind="tun", up=True)


def state(net: Network, ident: PortIdentity | None = None) -> DesiredState:
    return DesiredState(networks={net.name: net}, active=frozenset({net.name}),
                        ports={"vnet0": net.name},
                        identities={"vnet0": ident} if ident else {})


def obs(guard: str | None = None, elements: frozenset[tuple[str, str]] = frozenset(),
        master: int | None = None) -> ObservedState:
    tap = replace(TAP, master=master)
    return ObservedState(links={2: BR, 5: tap}, forwarding={4: True, 6: True},
                         guard=guard, guard_elements=elements)


def test_the_table_comes_before_the_port_joins() -> None:
    p = plan(state(guarded()), obs(), Owned())
    kinds = [type(a) for a in p.actions]
    assert kinds.index(A.ApplyPortGuard) < kinds.index(A.Enslave)
    apply = next(a for a in p.actions if isinstance(a, A.ApplyPortGuard))
    assert ("ports", '"vnet0"') in apply.elements


def test_a_new_lease_is_an_element_update_not_a_rewrite() -> None:
    net = guarded()
    have = frozenset(port_elements("vnet0", net, PortIdentity(MAC)))
    ident = PortIdentity(MAC, frozenset({"10.0.0.20"}))
    p = plan(state(net, ident), obs(fingerprint(), have, master=2), Owned())
    guard = [a for a in p.actions if isinstance(a, A.ApplyPortGuard | A.UpdatePortGuard)]
    assert guard == [A.UpdatePortGuard(None, frozenset({("addr4", '"vnet0" . 10.0.0.20')}),
                                       frozenset())]


def test_tampered_table_is_rewritten_and_off_removes_it() -> None:
    net = guarded()
    p = plan(state(net), obs("tampered", master=2), Owned())
    assert any(isinstance(a, A.ApplyPortGuard) for a in p.actions)
    off = replace(net, anti_spoofing=False)
    p = plan(state(off), obs(fingerprint(), master=2), Owned())
    assert A.RemovePortGuard(None) in p.actions
    assert not any(isinstance(a, A.RemovePortGuard) for a in plan(state(off), obs(master=2),
                                                                   Owned()).actions)


def test_single_port_work_guards_the_port_first_or_waits_for_the_table() -> None:
    net = guarded()
    p = attach_for(state(net), obs(fingerprint()), Owned(), "vnet0")
    assert isinstance(p.actions[0], A.UpdatePortGuard)
    assert isinstance(p.actions[1], A.Enslave)
    waiting = attach_for(state(net), obs(None), Owned(), "vnet0")
    assert waiting.guard_pending and waiting.actions == []
    # A port that leaves the network leaves the sets, once it has left the bridge.
    have = frozenset(port_elements("vnet0", net, None))
    gone = attach_for(replace(state(net), ports={"vnet0": ""}), obs(fingerprint(), have, 2),
                      Owned(ports={"vnet0": "kvbr0"}), "vnet0")
    release, update = gone.actions
    assert isinstance(release, A.Release)
    assert isinstance(update, A.UpdatePortGuard) and update.delete == have


# ---- the loop --------------------------------------------------------------------------------

async def test_loop_applies_the_guard_and_converges(tmp_path: Path) -> None:
    nl, guard = FakeNetlink(replace(TAP, up=False)), FakePortGuard()
    rec = Reconciler(nl, FakeFirewall(), FakeSysctl(), FakeDhcp(), str(tmp_path / "o.json"),
                     guard=guard)
    net = guarded()
    await rec.set_desired(state(net, PortIdentity(MAC)))
    assert guard.fingerprint == fingerprint()
    assert ("macs", f'"vnet0" . {MAC}') in guard.elements
    before = rec.writes
    await rec.converge()
    assert rec.writes == before
    # A lease: one update, no rewrite.
    await rec.set_desired(state(net, PortIdentity(MAC, frozenset({"10.0.0.20"}))))
    assert guard.updates[-1] == (frozenset({("addr4", '"vnet0" . 10.0.0.20')}), frozenset())
    # The network goes: so does the table.
    await rec.set_desired(DesiredState())
    assert guard.fingerprint is None


async def test_both_tables_are_read_at_once_and_a_failed_read_is_read_again(
        tmp_path: Path) -> None:
    guard_reading = asyncio.Event()
    failures = [OSError("nft: out of memory")]

    class SlowFirewall(FakeFirewall):
        async def observe(self) -> str | None:
            # Returns only once the guard's read has started: a heal waits for one nft
            # run, not two in a row.
            await guard_reading.wait()
            if failures:
                raise failures.pop()
            return await super().observe()

    class WatchedGuard(FakePortGuard):
        async def observe(self) -> tuple[str | None, frozenset[GuardElement]]:
            guard_reading.set()
            return await super().observe()

    guard = WatchedGuard()
    rec = Reconciler(FakeNetlink(replace(TAP, up=False)), SlowFirewall(), FakeSysctl(),
                     FakeDhcp(), str(tmp_path / "o.json"), guard=guard)
    async with asyncio.timeout(2):
        with pytest.raises(OSError, match="out of memory"):
            await rec.set_desired(state(guarded(), PortIdentity(MAC)))
        await rec.converge()  # neither read is trusted after one failed
    assert guard.fingerprint == fingerprint()


async def test_a_port_attached_alone_is_guarded_before_it_joins(tmp_path: Path) -> None:
    nl, guard = FakeNetlink(), FakePortGuard()
    rec = Reconciler(nl, FakeFirewall(), FakeSysctl(), FakeDhcp(), str(tmp_path / "o.json"),
                     guard=guard)
    net = guarded()
    await rec.set_desired(replace(state(net), ports={}))
    assert guard.elements == frozenset()
    nl.observed.links[5] = TAP
    await rec.request_port("vnet0", "lab")
    assert ("ports", '"vnet0"') in guard.elements
    vnet = nl.observed.link("vnet0")
    assert vnet is not None and vnet.master == nl.observed.link("kvbr0").index  # type: ignore[union-attr]


# ---- learning a port's MAC -----------------------------------------------------------------

def test_the_first_dhcp_exchange_binds_the_mac_and_a_later_one_does_not() -> None:
    seen = {"52:54:00:00:00:01": "vnet0", "52:54:00:00:00:02": "vnet0"}
    ids = PortIdentities(lambda _br: seen)
    o = obs()
    net = guarded()
    ports = {"vnet0": "lab"}
    assert ids.learn_from_lease(net, Lease("52:54:00:00:00:01", "10.0.0.20"), ports, o)
    assert ids.learn_from_lease(net, Lease("52:54:00:00:00:02", "10.0.0.21"), ports, o) is None
    assert ids.mac_of("vnet0") == "52:54:00:00:00:01"
    built = ids.build([net], lambda _n: [Lease("52:54:00:00:00:01", "10.0.0.20"),
                                         Lease("52:54:00:00:00:02", "10.0.0.21")])
    assert built["vnet0"] == PortIdentity("52:54:00:00:00:01", frozenset({"10.0.0.20"}))
    # The tap made anew under the same name: another guest.
    o.links[5] = replace(TAP, index=6)
    o.links[6] = o.links.pop(5)
    ids.prune(o)
    assert ids.mac_of("vnet0") is None


def test_libvirt_xml_replaces_and_other_networks_are_not_learned() -> None:
    ids = PortIdentities(lambda _br: {"52:54:00:aa:00:01": "vnet0"})
    o = obs()
    assert not ids.learn("vnet0", "", o, replace=True)
    assert not ids.learn("vnet0", "52:54:00:aa:00:01 ; flush ruleset", o, replace=True)
    assert ids.learn("vnet0", "52:54:00:AA:00:01", o, replace=True)
    assert ids.mac_of("vnet0") == "52:54:00:aa:00:01"
    plain = replace(guarded(), anti_spoofing=False)
    leases = [Lease("52:54:00:aa:00:01", "10.0.0.9"), Lease("52:54:00:aa:00:01", "10.0.0.x")]
    assert ids.build([plain], lambda _n: leases) == {
        "vnet0": PortIdentity("52:54:00:aa:00:01")}
    assert ids.build([guarded()], lambda _n: leases)["vnet0"].ipv4 == {"10.0.0.9"}


def test_duid_carries_the_mac() -> None:
    assert duid_mac("00:01:00:01:2c:aa:bb:cc:52:54:00:12:34:56") == MAC
    assert duid_mac("00:03:00:01:52:54:00:12:34:56") == MAC
    assert duid_mac("00:02:00:00:ab:11:22") is None


def test_turned_on_over_running_guests_their_leases_bind_their_ports() -> None:
    fdb = {"52:54:00:00:00:01": "vnet0", "52:54:00:00:00:09": "vnet9"}
    ids = PortIdentities(lambda _br: fdb)
    leases = [Lease("52:54:00:00:00:01", "10.0.0.20"), Lease("52:54:00:00:00:09", "10.0.0.29")]
    # vnet9 is not a port of this network: its lease binds nothing.
    assert ids.learn_from_leases(guarded(), leases, {"vnet0": "lab"}, obs()) == ["vnet0"]
    assert ids.mac_of("vnet0") == "52:54:00:00:00:01" and ids.mac_of("vnet9") is None
    # Every port bound: the forwarding database is not even read.
    ids.fdb_lookup = lambda _br: pytest.fail("read the fdb")  # type: ignore[assignment,return-value]
    assert ids.learn_from_leases(guarded(), leases, {"vnet0": "lab"}, obs()) == []


def test_bridge_fdb_reads_the_kernels_table(tmp_path: Path) -> None:
    br = tmp_path / "kvbr0"
    for name, no in (("vnet0", 1), ("vnet1", 0x102)):
        (br / "brif" / name).mkdir(parents=True)
        (br / "brif" / name / "port_no").write_text(f"{no:#x}\n")
    entry = struct.Struct("=6sBBIBBH")
    (br / "brforward").write_bytes(
        entry.pack(bytes.fromhex("525400000001"), 1, 0, 0, 0, 0, 0)
        + entry.pack(bytes.fromhex("525400000002"), 0x02, 0, 0, 0x01, 0, 0)
        + entry.pack(bytes.fromhex("fe5400000003"), 1, 1, 0, 0, 0, 0))  # local: left out
    assert bridge_fdb("kvbr0", str(tmp_path)) == {"52:54:00:00:00:01": "vnet0",
                                                  "52:54:00:00:00:02": "vnet1"}
    assert bridge_fdb("absent", str(tmp_path)) == {}


# ---- the core: libvirt's XML, leases, counters ---------------------------------------------

async def test_core_learns_from_libvirt_and_leases_and_counts_drops(tmp_path: Path) -> None:
    conf = tmp_path / "kvmnetd.toml"
    conf.write_text(daemon_toml(run_dir=str(tmp_path / "run"), state_dir=str(tmp_path / "st"),
                                networks_dir=str(tmp_path / "nd"))
                    + network_toml("lab", "nat", "kvbr0", "10.0.0.254/24", dns=False,
                                   dhcp_range="10.0.0.100-10.0.0.150", anti_spoofing=True))
    (tmp_path / "nd").mkdir()
    nl, dhcp, guard = FakeNetlink(tap("vnet0"), tap("vnet1")), FakeDhcp(), FakePortGuard()
    rec = Reconciler(nl, FakeFirewall(), FakeSysctl(), dhcp, str(tmp_path / "o.json"),
                     guard=guard)
    core = Core(rec, cfg.load(str(conf), None), dhcp)
    await core.apply({})
    assert core.network("lab").anti_spoofing and not core.network("lab").isolate_ports
    # A libvirt domain's NIC: its MAC from the XML, before any lease.
    nic = DomainNic(tap="vnet0", mac=MAC, kind="ethernet", bridge=None, network="lab")
    await domain_changed(core, "g0", "uuid-0", True, [nic])
    assert ("macs", f'"vnet0" . {MAC}') in guard.elements
    # Another guest's first lease: the bridge saw its MAC on vnet1.
    await core.attach_port(ROOT, "vnet1", "lab")
    assert ("ports", '"vnet1"') in guard.elements
    other = "52:54:00:00:00:77"
    core.identities.fdb_lookup = lambda _br: {other: "vnet1"}
    dhcp.lease_table["lab"] = [Lease(other, "10.0.0.120"), Lease(MAC, "10.0.0.121")]
    core.lease_changed(CoreEvent("lease-added", "lab", lease=Lease(other, "10.0.0.120")))
    core.lease_changed(CoreEvent("lease-added", "lab", lease=Lease(MAC, "10.0.0.121")))
    for _ in range(20):
        await asyncio.sleep(0)
    assert {("addr4", '"vnet1" . 10.0.0.120'), ("addr4", '"vnet0" . 10.0.0.121')} \
        <= guard.elements
    # Counters: the kernel's per port, and the table's drops.
    core.read_counters = lambda _i: (1, 2, 3, 4, 5)
    core.read_spoof_drops = lambda: {"vnet0": 7}
    stats = {s.ifname: s.spoof_drops for s in core.port_stats()}
    assert stats == {"vnet0": 7, "vnet1": 0}


def test_a_network_with_a_problem_keeps_its_ports_guarded() -> None:
    # IPv6 forwarding is refused (the host takes its default route from RAs): the network
    # has a problem, but its ports may still be on its bridge.
    eth0 = Link(index=9, name="eth0", kind=None, up=True)
    o = obs(fingerprint(), master=2)
    o.links[9] = eth0
    o.forwarding[6] = False
    o.accept_ra["eth0"] = 1
    o.routes.add(Route(dst=ipaddress.ip_network("::/0"), oif=9, gateway="fe80::1",
                       proto=RTPROT_RA))
    p = plan(state(guarded()), o, Owned())
    assert "lab" in p.problems
    update = next(a for a in p.actions if isinstance(a, A.UpdatePortGuard))
    assert ("ports", '"vnet0"') in update.add
    assert not any(isinstance(a, A.RemovePortGuard) for a in p.actions)


async def test_a_port_detached_alone_is_unguarded_only_after_it_left(tmp_path: Path) -> None:
    order: list[str] = []
    nl, guard = FakeNetlink(), FakePortGuard()
    rec = Reconciler(nl, FakeFirewall(), FakeSysctl(), FakeDhcp(), str(tmp_path / "o.json"),
                     guard=guard)
    nl.observed.links[5] = TAP
    await rec.set_desired(state(guarded()))
    assert ("ports", '"vnet0"') in guard.elements
    netlink_apply, guard_update = nl.apply, guard.update

    async def noted_apply(action: A.Action) -> None:
        order.append(type(action).__name__)
        await netlink_apply(action)

    async def noted_update(add: frozenset[tuple[str, str]], delete: frozenset[tuple[str, str]]
                           ) -> frozenset[tuple[str, str]]:
        order.append("guard")
        return await guard_update(add, delete)

    nl.apply, guard.update = noted_apply, noted_update  # type: ignore[method-assign]
    await rec.request_port("vnet0", "")
    assert order == ["Release", "guard"]
    assert not any(port_of(e) == "vnet0" for e in guard.elements)
