"""The loop over in-memory fakes of our adapters: convergence, idempotence, failure isolation."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import replace
from pathlib import Path

from kvmnetd.adapters.owned_file import load_owned
from kvmnetd.engine.reconciler import Reconciler
from kvmnetd.model.desired import AttachRule, DesiredState, Mode, Network
from kvmnetd.model.observed import Link
from tests.support.fakes import FakeDhcp, FakeFirewall, FakeNetlink, FakeSysctl


def make(tmp_path: Path, *links: Link) -> tuple[Reconciler, FakeNetlink, FakeFirewall,
                                                FakeSysctl]:
    nl, fw, sc = FakeNetlink(*links), FakeFirewall(), FakeSysctl()
    rec = Reconciler(nl, fw, sc, FakeDhcp(), str(tmp_path / "owned.json"))
    return rec, nl, fw, sc


def nets() -> dict[str, Network]:
    return {
        "nat": Network("nat", Mode.NAT, "kvbr0", ipv4=ipaddress.IPv4Interface("10.0.0.1/24")),
        "iso": Network("iso", Mode.ISOLATED, "kvbr1",
                       ipv4=ipaddress.IPv4Interface("10.0.1.1/24")),
    }


async def test_converges_then_second_pass_writes_nothing(tmp_path: Path) -> None:
    tap = Link(index=5, name="vnet0", kind="tun", up=False)
    rec, nl, fw, sc = make(tmp_path, tap)
    await rec.set_desired(DesiredState(networks=nets(), active=frozenset({"nat", "iso"}),
                                       ports={"vnet0": "iso"}))
    assert rec.states["nat"].state == "active" and rec.states["iso"].state == "active"
    vnet = nl.observed.link("vnet0")
    kvbr1 = nl.observed.link("kvbr1")
    assert vnet is not None and kvbr1 is not None and vnet.master == kvbr1.index
    assert sc.values[4] is True and fw.writes == 1
    before = rec.writes
    await rec.converge()
    assert rec.writes == before, "a second pass over a converged system must write nothing"


async def test_owned_record_survives_restart(tmp_path: Path) -> None:
    rec, nl, _, _ = make(tmp_path)
    await rec.set_desired(DesiredState(networks=nets(), active=frozenset({"nat"})))
    owned = load_owned(str(tmp_path / "owned.json"))
    assert owned.created == {"kvbr0"} and owned.forwarding == {4: False}
    # A new reconciler over the same system and record: nothing to do.
    rec2 = Reconciler(nl, rec.firewall, rec.sysctl, FakeDhcp(), str(tmp_path / "owned.json"))
    rec2._firewall_seen = await rec.firewall.observe()
    before = rec.writes
    await rec2.set_desired(DesiredState(networks=nets(), active=frozenset({"nat"})))
    assert rec2.writes == before


async def test_failure_marks_only_that_network(tmp_path: Path) -> None:
    rec, nl, _, _ = make(tmp_path)
    nl.fail_on.add("kvbr1")
    await rec.set_desired(DesiredState(networks=nets(), active=frozenset({"nat", "iso"})))
    assert rec.states["iso"].state == "failed" and "refused" in rec.states["iso"].reason
    assert rec.states["nat"].state == "active"


async def test_stop_restores_forwarding_and_removes_bridge(tmp_path: Path) -> None:
    rec, nl, fw, sc = make(tmp_path)
    d = DesiredState(networks=nets(), active=frozenset({"nat"}))
    await rec.set_desired(d)
    await rec.set_desired(replace(d, active=frozenset()))
    assert nl.observed.link("kvbr0") is None
    assert sc.values[4] is False and fw.ruleset is None
    assert rec.owned.bridges == {} and rec.owned.forwarding == {}


async def test_vanished_tap_binding_is_forgotten(tmp_path: Path) -> None:
    tap = Link(index=5, name="vnet0", kind="tun", up=True)
    rec, nl, _, _ = make(tmp_path, tap)
    await rec.set_desired(DesiredState(networks=nets(), active=frozenset({"nat"}),
                                       ports={"vnet0": "nat"}))
    del nl.observed.links[5]
    await rec.converge()
    assert "vnet0" not in rec.desired.ports and "vnet0" not in rec.owned.ports


async def test_a_failing_port_never_fails_its_network(tmp_path: Path) -> None:
    taps = [Link(index=5, name="vnet0", kind="tun"), Link(index=6, name="vnet1", kind="tun")]
    rec, nl, _, _ = make(tmp_path, *taps)
    nl.fail_on.add("vnet0")
    await rec.set_desired(DesiredState(networks=nets(), active=frozenset({"nat"}),
                                       ports={"vnet0": "nat", "vnet1": "nat"}))
    assert rec.states["nat"].state == "active"
    assert "refused" in rec.port_errors["vnet0"]
    vnet1 = nl.observed.link("vnet1")
    assert vnet1 is not None and vnet1.master is not None


async def test_forgetting_a_vanished_tap_is_saved(tmp_path: Path) -> None:
    tap = Link(index=5, name="vnet0", kind="tun", up=True)
    rec, nl, _, _ = make(tmp_path, tap)
    await rec.set_desired(DesiredState(networks=nets(), active=frozenset({"nat"}),
                                       ports={"vnet0": "nat"}))
    assert "vnet0" in load_owned(str(tmp_path / "owned.json")).ports
    del nl.observed.links[5]
    await rec.converge()
    assert "vnet0" not in load_owned(str(tmp_path / "owned.json")).ports


async def _settled(rec: Reconciler) -> None:
    await rec.apply_queued()  # what the loop does when it wakes


async def test_a_new_tap_matching_policy_is_attached_from_its_own_event(tmp_path: Path) -> None:
    rec, nl, _, _ = make(tmp_path)
    await rec.set_desired(DesiredState(networks=nets(), active=frozenset({"nat", "iso"}),
                                       rules=(AttachRule("iso", ifname="vnet*"),)))
    writes, passes = rec.writes, rec.passes
    tap = Link(index=7, name="vnet3", kind="tun")
    nl.observed.links[7] = tap
    rec.links_added([tap])
    await _settled(rec)
    kvbr1 = nl.observed.link("kvbr1")
    vnet = nl.observed.link("vnet3")
    assert kvbr1 is not None and vnet is not None and vnet.master == kvbr1.index and vnet.up
    assert rec.writes == writes + 1 and rec.passes == passes, "no plan for one tap"
    assert rec.owned.ports == {"vnet3": "kvbr1"}
    await rec.converge()  # the pass after the burst saves the record and finds nothing to do
    assert rec.writes == writes + 1
    assert load_owned(str(tmp_path / "owned.json")).ports == {"vnet3": "kvbr1"}


async def test_fast_attach_leaves_what_policy_does_not_claim(tmp_path: Path) -> None:
    rec, nl, _, _ = make(tmp_path, Link(index=9, name="foreign0", kind="bridge"))
    await rec.set_desired(DesiredState(
        networks=nets(), active=frozenset({"nat"}),
        rules=(AttachRule("nat", ifname="vnet*"), AttachRule("iso", ifname="iso*"))))
    rec.desired = replace(rec.desired, ports={"vnet1": "iso"})  # asked for before it exists
    writes = rec.writes
    for link in (Link(index=20, name="vnet1", kind="tun"),  # explicit request: the pass's
                 Link(index=21, name="vnet2", kind="tun", master=9),  # on a foreign bridge
                 Link(index=22, name="eth5", kind=None),  # a NIC, not a tap
                 Link(index=23, name="iso0", kind="tun"),  # its network is not active
                 Link(index=24, name="other0", kind="tun")):  # no rule
        nl.observed.links[link.index] = link
        rec.links_added([link])
    await _settled(rec)
    assert rec.writes == writes


async def test_fast_attach_failure_is_the_ports_and_wakes_the_loop(tmp_path: Path) -> None:
    rec, nl, _, _ = make(tmp_path)
    await rec.set_desired(DesiredState(networks=nets(), active=frozenset({"nat"}),
                                       rules=(AttachRule("nat", ifname="vnet*"),)))
    nl.fail_on.add("vnet4")
    tap = Link(index=30, name="vnet4", kind="tun")
    nl.observed.links[30] = tap
    rec.links_added([tap])
    await _settled(rec)
    assert "refused" in rec.port_errors["vnet4"] and rec.needs_pass()
    assert rec.states["nat"].state == "active"


async def test_no_pass_when_only_fast_attached_taps_changed(tmp_path: Path) -> None:
    rec, nl, _, _ = make(tmp_path)
    await rec.set_desired(DesiredState(networks=nets(), active=frozenset({"nat"}),
                                       rules=(AttachRule("nat", ifname="vnet*"),)))
    assert not rec.needs_pass()
    taps = [Link(index=40 + i, name=f"vnet{i}", kind="tun") for i in range(3)]
    for tap in taps:
        nl.observed.links[tap.index] = tap
        rec.links_added([tap])
    await _settled(rec)
    nl.changed = {40, 41, 42}
    assert not rec.needs_pass()  # each settled port's own plan looks, no full pass
    await _settled(rec)
    assert rec.last_plan.ports == {"vnet0": "nat", "vnet1": "nat", "vnet2": "nat"}

    nl.changed = {41}
    nl._set("vnet1", master=None)  # someone took it off again
    assert rec.needs_pass()
    nl.changed = {40}
    nl.changed_other = True  # an address or a route changed too
    assert rec.needs_pass()
    rec.trigger()  # anything but link events
    assert rec.needs_pass()
    await rec.converge()
    assert not rec.needs_pass()
    assert load_owned(str(tmp_path / "owned.json")).ports.keys() == {"vnet0", "vnet1", "vnet2"}


async def test_host_route_degrades_one_network_and_its_removal_brings_it_up(
        tmp_path: Path) -> None:
    from kvmnetd.model.observed import Route

    vpn = Link(index=7, name="tun0", kind="tun", up=True)
    rec, nl, _, _ = make(tmp_path, vpn)
    route = Route(dst=ipaddress.ip_network("10.0.1.0/25"), oif=7)
    nl.observed.routes.add(route)
    await rec.set_desired(DesiredState(networks=nets(), active=frozenset({"nat", "iso"})))
    assert rec.states["nat"].state == "active"
    assert rec.states["iso"].state == "degraded"
    assert "10.0.1.0/25 dev tun0" in rec.states["iso"].reason
    assert nl.observed.link("kvbr1") is None
    nl.observed.routes.discard(route)
    await rec.converge()
    assert rec.states["iso"].state == "active" and nl.observed.link("kvbr1") is not None


async def test_an_api_attach_plans_its_port_alone(tmp_path: Path) -> None:
    taps = [Link(index=60 + i, name=f"vnet{i}", kind="tun") for i in range(3)]
    rec, nl, _, _ = make(tmp_path, *taps)
    await rec.set_desired(DesiredState(networks=nets(), active=frozenset({"nat", "iso"})))
    seen: list[set[str] | None] = []
    rec.on_ports(seen.append)
    passes, writes = rec.passes, rec.writes
    await asyncio.gather(rec.request_port("vnet0", "nat"), rec.request_port("vnet1", "iso"))
    kvbr0, kvbr1 = nl.observed.link("kvbr0"), nl.observed.link("kvbr1")
    assert kvbr0 is not None and kvbr1 is not None
    assert [nl.observed.link(n).master for n in ("vnet0", "vnet1", "vnet2")] == [  # type: ignore[union-attr]
        kvbr0.index, kvbr1.index, None]
    assert rec.passes == passes and rec.writes == writes + 2, "no full pass for a call"
    assert rec.last_plan.ports == {"vnet0": "nat", "vnet1": "iso"}
    assert seen and all(s is not None for s in seen)
    await rec.request_port("vnet0", "")  # detach: released through the same path
    vnet0 = nl.observed.link("vnet0")
    assert vnet0 is not None and vnet0.master is None and "vnet0" not in rec.owned.ports
    assert rec.passes == passes


async def test_a_settled_ports_tap_going_away_is_forgotten_without_a_pass(
        tmp_path: Path) -> None:
    tap = Link(index=70, name="vnet7", kind="tun")
    rec, nl, _, _ = make(tmp_path, tap)
    await rec.set_desired(DesiredState(networks=nets(), active=frozenset({"nat"})))
    await rec.request_port("vnet7", "nat")
    assert rec.owned.ports == {"vnet7": "kvbr0"}
    passes = rec.passes
    del nl.observed.links[70]
    nl.changed = {70}
    assert not rec.needs_pass(), "one port's tap: its own plan, not a pass"
    await rec.apply_queued()
    assert rec.owned.ports == {} and "vnet7" not in rec.desired.ports
    assert "vnet7" not in rec.last_plan.ports and rec.passes == passes
    assert load_owned(str(tmp_path / "owned.json")).ports == {}


async def test_a_new_tap_no_rule_claims_needs_no_pass(tmp_path: Path) -> None:
    rec, nl, _, _ = make(tmp_path)
    await rec.set_desired(DesiredState(networks=nets(), active=frozenset({"nat"}),
                                       rules=(AttachRule("nat", ifname="vnet*"),)))
    tap = Link(index=80, name="other0", kind="tun")  # down, as a new tap is
    nl.observed.links[80] = tap
    rec.links_added([tap])
    await rec.apply_queued()
    nl.changed = {80}
    assert not rec.needs_pass(), "looked at alone: nothing to do, and no pass over all"
    assert tap.master is None and "other0" not in rec.last_plan.ports


async def test_port_events_after_a_full_pass_need_no_pass(tmp_path: Path) -> None:
    tap = Link(index=90, name="vnet9", kind="tun")
    rec, nl, _, _ = make(tmp_path, tap)
    await rec.set_desired(DesiredState(networks=nets(), active=frozenset({"nat"}),
                                       ports={"vnet9": "nat"}))
    kvbr0 = nl.observed.link("kvbr0")
    assert kvbr0 is not None and nl.observed.link("vnet9").master == kvbr0.index  # type: ignore[union-attr]
    passes = rec.passes
    # The bridge takes its lowest port's MAC: nothing the planner reads.
    nl._set("kvbr0", mac="02:00:00:00:00:01")
    nl.changed = {kvbr0.index}
    assert not rec.needs_pass()
    # `ip link del` downs the tap first: its own plan, not a pass over all.
    nl._set("vnet9", up=False)
    nl.changed = {90}
    assert not rec.needs_pass()
    del nl.observed.links[90]  # gone before its plan ran: the write finds no device
    await rec.apply_queued()
    nl.changed = {90, kvbr0.index}  # the deletion event, read after
    assert not rec.needs_pass(), "its plan already saw it gone"
    assert rec.passes == passes and "vnet9" not in rec.owned.ports


async def test_a_settled_port_seen_half_way_and_back_plans_nothing(tmp_path: Path) -> None:
    tap = Link(index=91, name="vnet9", kind="tun")
    rec, nl, _, _ = make(tmp_path, tap)
    await rec.set_desired(DesiredState(networks=nets(), active=frozenset({"nat"}),
                                       ports={"vnet9": "nat"}))
    completed, writes = rec.completed, rec.writes
    # Events of its enslave read after the ack: on the bridge and still down, then up.
    nl._set("vnet9", up=False)
    nl.changed = {91}
    assert not rec.needs_pass()
    nl._set("vnet9", up=True)
    nl.changed = {91}
    assert not rec.needs_pass()
    await rec.apply_queued()
    assert (rec.completed, rec.writes) == (completed, writes), "as it was left: no plan"
    # Left down (a guest's tap downed by hand): its own plan brings it up again.
    nl._set("vnet9", up=False)
    nl.changed = {91}
    assert not rec.needs_pass()
    await rec.apply_queued()
    assert rec.completed == completed + 1 and rec.writes == writes + 1
    assert nl.observed.link("vnet9").up  # type: ignore[union-attr]


async def test_taps_read_together_share_one_port_pass(tmp_path: Path) -> None:
    rec, nl, _, _ = make(tmp_path)
    await rec.set_desired(DesiredState(networks=nets(), active=frozenset({"nat"}),
                                       rules=(AttachRule("nat", ifname="vnet*"),)))
    rec._running = True
    completed = rec.completed
    taps = [Link(index=50 + i, name=f"vnet{i}", kind="tun") for i in range(3)]
    for tap in taps:
        nl.observed.links[tap.index] = tap
    rec.links_added([*taps, Link(index=60, name="br9", kind="bridge")])
    await asyncio.sleep(0.02)
    assert rec.completed == completed + 1
    kvbr0 = nl.observed.link("kvbr0")
    assert kvbr0 is not None
    assert all(nl.observed.link(t.name).master == kvbr0.index for t in taps)  # type: ignore[union-attr]


async def test_other_changes_of_our_bridge_still_wake_the_planner(tmp_path: Path) -> None:
    rec, nl, _, _ = make(tmp_path)
    await rec.set_desired(DesiredState(networks=nets(), active=frozenset({"nat"})))
    kvbr0 = nl.observed.link("kvbr0")
    assert kvbr0 is not None
    nl._set("kvbr0", up=False)
    nl.changed = {kvbr0.index}
    assert rec.needs_pass()
    await rec.converge()
    assert nl.observed.link("kvbr0").up  # type: ignore[union-attr]
    nl.changed_other = True  # an address or a route (a host route over our subnet)
    assert rec.needs_pass()


async def test_a_port_that_vanishes_while_its_plan_runs_is_forgotten_by_its_deletion(
        tmp_path: Path) -> None:
    from kvmnetd.model import actions as A
    from kvmnetd.model.errors import NoSuchPort

    tap = Link(index=95, name="vnet5", kind="tun")
    rec, nl, _, _ = make(tmp_path, tap)
    await rec.set_desired(DesiredState(networks=nets(), active=frozenset({"nat"}),
                                       ports={"vnet5": "nat"}))
    passes = rec.passes
    plain = nl.apply

    async def vanishing(action: A.Action) -> None:
        if isinstance(action, A.SetUp) and action.ifname == "vnet5":
            del nl.observed.links[95]  # `ip link del`: down first, gone before the write
            raise NoSuchPort("bring up vnet5: no such device")
        await plain(action)

    nl.apply = vanishing  # type: ignore[method-assign]
    nl._set("vnet5", up=False)
    nl.changed = {95}
    assert not rec.needs_pass()
    await rec.apply_queued()
    assert "vnet5" in rec.owned.ports, "planned while it was there: not forgotten yet"
    nl.changed = {95}  # its deletion event
    assert not rec.needs_pass()
    await rec.apply_queued()
    assert "vnet5" not in rec.owned.ports and rec.passes == passes


class _HeldAcks(FakeNetlink):
    """Applies at once but holds each batch's acks until the test lets them go."""

    def __init__(self, *links: Link) -> None:
        super().__init__(*links)
        self.acks = asyncio.Event()
        self.sent_batches: list[list[str]] = []

    async def apply_many(self, actions, sent=None, waited=True):  # type: ignore[no-untyped-def]
        out = await super().apply_many(actions)
        self.sent_batches.append([a.ifname for a in actions])
        if sent is not None:
            sent()
        await self.acks.wait()
        return out


async def test_a_port_pass_sends_while_the_last_ones_acks_are_pending(tmp_path: Path) -> None:
    taps = [Link(index=80 + i, name=f"vnet{i}", kind="tun") for i in range(2)]
    nl = _HeldAcks(*taps)
    rec = Reconciler(nl, FakeFirewall(), FakeSysctl(), FakeDhcp(), str(tmp_path / "owned.json"))
    nl.acks.set()
    await rec.set_desired(DesiredState(networks=nets(), active=frozenset({"nat"})))
    nl.acks.clear()
    nl.sent_batches.clear()
    first = asyncio.ensure_future(rec.request_port("vnet0", "nat"))
    await asyncio.sleep(0.01)
    second = asyncio.ensure_future(rec.request_port("vnet1", "nat"))
    await asyncio.sleep(0.01)
    # The second tap's enslave went out before the first one's ack came back.
    assert nl.sent_batches == [["vnet0"], ["vnet1"]]
    assert not first.done() and not second.done()
    # A full pass plans from what the kernel acknowledged: it waits for those acks.
    passes = rec.passes
    full = asyncio.ensure_future(rec.converge())
    await asyncio.sleep(0.01)
    assert rec.passes == passes and not full.done()
    nl.acks.set()
    await asyncio.gather(first, second, full)
    assert rec.owned.ports == {"vnet0": "kvbr0", "vnet1": "kvbr0"}
    assert rec.passes == passes + 1


async def test_every_pass_hands_frr_its_part(tmp_path: Path) -> None:
    from kvmnetd.model.overlay import HostOverlay, NetworkOverlay
    from kvmnetd.plan.frr import FrrPart
    from tests.support.fakes import FakeFrr

    nl, fw, sc, frr = FakeNetlink(), FakeFirewall(), FakeSysctl(), FakeFrr()
    rec = Reconciler(nl, fw, sc, FakeDhcp(), str(tmp_path / "owned.json"), frr=frr)
    host = HostOverlay(local=ipaddress.IPv4Address("192.0.2.11"), asn=65000,
                       neighbors=(ipaddress.IPv4Address("192.0.2.12"),))
    ov = replace(nets()["nat"], overlay=NetworkOverlay(vni=100, mode="evpn"), mtu=1450)
    await rec.set_desired(DesiredState(networks={"nat": ov}, active=frozenset({"nat"}),
                                       overlay=host))
    part = frr.parts[-1]
    assert isinstance(part, FrrPart) and part.asn == 65000 and part.neighbors == ("192.0.2.12",)
    # The evpn network stopped: FRR is told kvmnetd wants nothing there any more.
    await rec.set_desired(DesiredState(networks={"nat": ov}, active=frozenset(), overlay=host))
    assert frr.parts[-1] is None


async def test_a_burst_saves_and_tells_once_its_events_are_read(tmp_path: Path) -> None:
    rec, nl, _, _ = make(tmp_path)
    await rec.set_desired(DesiredState(networks=nets(), active=frozenset({"nat"}),
                                       rules=(AttachRule("nat", ifname="vnet*"),)))
    told: list[set[str] | None] = []
    rec.on_ports(told.append)
    rec._running = True  # as run() does: each new tap's pass starts from its event
    nl.pending = True  # more of the burst waits to be read
    for i in range(3):
        tap = Link(index=40 + i, name=f"vnet{i}", kind="tun")
        nl.observed.links[tap.index] = tap
        rec.links_added([tap])
    await asyncio.sleep(0.02)
    assert all(nl.observed.link(f"vnet{i}").master is not None for i in range(3))  # type: ignore[union-attr]
    assert told == [] and "vnet0" not in load_owned(str(tmp_path / "owned.json")).ports
    nl.pending = False
    await asyncio.sleep(0.02)
    assert told == [{"vnet0", "vnet1", "vnet2"}]
    assert set(load_owned(str(tmp_path / "owned.json")).ports) == {"vnet0", "vnet1", "vnet2"}


async def test_a_caller_in_a_burst_is_answered_after_the_save(tmp_path: Path) -> None:
    tap = Link(index=40, name="vnet0", kind="tun")
    rec, nl, _, _ = make(tmp_path, tap)
    await rec.set_desired(DesiredState(networks=nets(), active=frozenset({"nat"})))
    told: list[set[str] | None] = []
    rec.on_ports(told.append)
    rec._running = True
    nl.pending = True
    await rec.request_port("vnet0", "nat")
    assert load_owned(str(tmp_path / "owned.json")).ports == {"vnet0": "kvbr0"}
    assert told == [{"vnet0"}]


async def test_port_flags_and_fdb_are_followed_only_while_a_network_reads_them(
        tmp_path: Path) -> None:
    rec, nl, _, _ = make(tmp_path)
    plain = nets()
    await rec.set_desired(DesiredState(networks=plain, active=frozenset({"nat"})))
    assert nl.following == (False, False)
    isolating = {**plain, "iso": replace(plain["iso"], isolate_ports=True)}
    await rec.set_desired(DesiredState(networks=isolating, active=frozenset({"nat", "iso"})))
    assert nl.following == (True, False)
    await rec.set_desired(DesiredState(networks=isolating, active=frozenset({"nat"})))
    assert nl.following == (False, False)
