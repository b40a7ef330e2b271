"""In-memory fakes of kvmnetd's own adapter interfaces (never of pyroute2, nft or dnsmasq)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from kvmnetd.model import actions as A
from kvmnetd.model.desired import Network
from kvmnetd.model.errors import Conflict
from kvmnetd.model.guard import GuardElement
from kvmnetd.model.observed import Link, ObservedState, Vxlan
from kvmnetd.model.rate import SetPortRate
from kvmnetd.model.records import Caller, DhcpStatus, Lease


async def apply_each(apply: Callable[[Any], Awaitable[None]],
                     actions: Sequence[Any]) -> list[BaseException | None]:
    """apply() for each, in order: one result per action, None or its error."""
    out: list[BaseException | None] = []
    for action in actions:
        try:
            await apply(action)
            out.append(None)
        except Exception as e:
            out.append(e)
    return out

class FakeNetlink:
    def __init__(self, *links: Link) -> None:
        self.observed = ObservedState(links={lk.index: lk for lk in links})
        self.writes = 0
        self.fail_on: set[str] = set()  # device names whose changes fail
        self._index = itertools.count(100)
        self.changed: set[int] = set()  # what tests say events changed
        self.changed_other = False
        self.delay = 0.0  # seconds each change takes, for calls that must overlap
        self.following = (True, True)  # (port flags, fdb), as the real adapter starts
        self.pending = False  # what events_pending() says: True in a burst

    async def apply_many(self, actions: Sequence[A.Action],
                         sent: Callable[[], None] | None = None,
                         waited: bool = True) -> list[BaseException | None]:
        out = await apply_each(self.apply, actions)
        if sent is not None:
            sent()
        return out

    async def tap_info(self, ifname: str) -> tuple[int | None, int | None] | None:
        link = self.observed.link(ifname)
        if link is None or link.kind != "tun":
            return None
        return link.tun_owner, link.tun_group

    def events_pending(self) -> bool:
        return self.pending

    def follow(self, port_flags: bool, fdb: bool) -> None:
        self.following = (port_flags, fdb)

    def take_changes(self) -> tuple[set[int], bool]:
        out = (self.changed, self.changed_other)
        self.changed, self.changed_other = set(), False
        return out

    def _set(self, name: str, **kw: object) -> None:
        link = self.observed.link(name)
        assert link is not None, name
        self.observed.links[link.index] = Link(**{**vars(link), **kw})  # type: ignore[arg-type]

    async def apply(self, action: A.Action) -> None:
        dev = getattr(action, "bridge", None) or getattr(action, "ifname", None)
        if isinstance(action, A.Enslave):
            dev = action.ifname
        if self.delay:
            await asyncio.sleep(self.delay)
        if dev in self.fail_on:
            raise Conflict(f"{dev}: refused by the fake kernel")
        self.writes += 1
        obs = self.observed
        match action:
            case A.CreateBridge(bridge=br, mac=mac, mtu=mtu):
                i = next(self._index)
                obs.links[i] = Link(index=i, name=br, kind="bridge", stp=False, forward_delay=0,
                                    mac=mac or "", mtu=mtu or 1500)
            case A.SetMtu(ifname=dev, mtu=mtu):
                self._set(dev, mtu=mtu)
            case A.SetMac(ifname=dev, mac=mac):
                self._set(dev, mac=mac)
            case A.SetBridgeNeighbours(bridge=br):
                self._set(br, arp_accept=True, addrgenmode=1)
            case A.CreateVxlan(ifname=dev, vni=vni, local=local, port=port, mtu=mtu):
                i = next(self._index)
                obs.links[i] = Link(index=i, name=dev, kind="vxlan", mtu=mtu or 1500,
                                    mac="aa:00:00:00:00:01",
                                    vxlan=Vxlan(vni, local, port, False))
            case A.AttachVxlan(ifname=dev, bridge=br):
                master = obs.link(br)
                assert master
                self._set(dev, master=master.index)
            case A.SetLinkLocalOff(ifname=dev):
                self._set(dev, addrgenmode=1)
            case A.SetNeighSuppress(ifname=dev, on=on):
                self._set(dev, neigh_suppress=on)
            case A.AddFlood(ifname=dev, dst=dst) | A.RemoveFlood(ifname=dev, dst=dst):
                link = obs.link(dev)
                assert link
                entries = obs.fdb.setdefault(link.index, set())
                if isinstance(action, A.AddFlood):
                    entries.add(("00:00:00:00:00:00", dst))
                else:
                    entries.discard(("00:00:00:00:00:00", dst))
            case A.DeleteVxlan(ifname=dev):
                link = obs.link(dev)
                if link is not None:
                    del obs.links[link.index]
                    obs.fdb.pop(link.index, None)
            case A.SetBridgeOptions(bridge=br, stp=stp, forward_delay=fd):
                self._set(br, stp=stp, forward_delay=fd)
            case A.SetUp(ifname=dev):
                self._set(dev, up=True)
            case A.AddAddress(ifname=dev, address=a):
                link = obs.link(dev)
                assert link
                obs.addresses.setdefault(link.index, set()).add(a)
            case A.RemoveAddress(ifname=dev, address=a):
                link = obs.link(dev)
                assert link
                obs.addresses.get(link.index, set()).discard(a)
            case A.Enslave(ifname=dev, bridge=br):
                master = obs.link(br)
                assert master
                moved = obs.link(dev).master != master.index  # type: ignore[union-attr]
                self._set(dev, master=master.index, up=True,
                          **({"isolated": False} if moved else {}))
            case A.SetIsolated(ifname=dev, isolated=on):
                self._set(dev, isolated=on)
            case A.Release(ifname=dev):
                self._set(dev, master=None, isolated=None)
            case A.DeleteBridge(bridge=br):
                link = obs.link(br)
                assert link
                del obs.links[link.index]
                for other in list(obs.links.values()):
                    if other.master == link.index:
                        self._set(other.name, master=None)
            case _:
                pass


class FakeRates:
    """tc as the reconciler sees it: qdiscs per device, and ifb links in the fake netlink."""

    def __init__(self, netlink: FakeNetlink) -> None:
        self.netlink = netlink
        self.writes = 0
        self.qdiscs: dict[str, tuple[int | None, bool]] = {}
        self.fail_on: set[str] = set()

    async def observe(self) -> dict[str, tuple[int | None, bool]]:
        return dict(self.qdiscs)

    async def apply(self, action: SetPortRate) -> None:
        if action.ifname in self.fail_on:
            raise Conflict(f"{action.ifname}: tc refused")
        self.writes += 1
        obs = self.netlink.observed
        ifb = obs.link(action.ifb)
        if action.rate is None:
            self.qdiscs.pop(action.ifname, None)
            self.qdiscs.pop(action.ifb, None)
            if ifb is not None:
                del obs.links[ifb.index]
            return
        if ifb is None:
            i = next(self.netlink._index)
            obs.links[i] = Link(index=i, name=action.ifb, kind="ifb", up=True)
        self.qdiscs[action.ifname] = (action.rate, True)
        self.qdiscs[action.ifb] = (action.rate, False)

    async def apply_many(self, actions: Sequence[SetPortRate]) -> list[BaseException | None]:
        return await apply_each(self.apply, actions)


class FakeFirewall:
    def __init__(self) -> None:
        self.writes = 0
        self.ruleset: str | None = None

    async def observe(self) -> str | None:
        if self.ruleset is None:
            return None
        return self.ruleset.split('comment "kvmnetd ', 1)[1].split('"', 1)[0]

    async def apply(self, ruleset: str) -> None:
        self.writes += 1
        self.ruleset = ruleset

    async def remove(self) -> None:
        self.writes += 1
        self.ruleset = None


class FakePortGuard:
    """The anti-spoofing bridge table, in memory."""

    def __init__(self) -> None:
        self.writes = 0
        self.fingerprint: str | None = None
        self.elements: frozenset[GuardElement] = frozenset()
        self.updates: list[tuple[frozenset[GuardElement], frozenset[GuardElement]]] = []

    async def observe(self) -> tuple[str | None, frozenset[GuardElement]]:
        return self.fingerprint, self.elements

    async def apply(self, ruleset: str, fingerprint: str,
                    elements: frozenset[GuardElement]) -> None:
        self.writes += 1
        assert f'comment "kvmnetd {fingerprint}"' in ruleset
        self.fingerprint = fingerprint
        self.elements = elements

    async def update(self, add: frozenset[GuardElement],
                     delete: frozenset[GuardElement]) -> frozenset[GuardElement]:
        self.writes += 1
        self.updates.append((add, delete))
        self.elements = (self.elements - delete) | add
        return self.elements

    async def remove(self) -> None:
        self.writes += 1
        self.fingerprint, self.elements = None, frozenset()


class FakeSysctl:
    def __init__(self) -> None:
        self.values = {4: False, 6: False}
        self.accept_ra_values: dict[str, int] = {}
        self.writes = 0

    def forwarding(self, family: int) -> bool | None:
        return self.values[family]

    def set_forwarding(self, family: int, enabled: bool) -> None:
        self.writes += 1
        self.values[family] = enabled

    def accept_ra(self, ifname: str) -> int | None:
        return self.accept_ra_values.get(ifname)


class FakeDhcp:
    """The reconciler's DhcpPort and the core's DhcpView, as the dnsmasq supervisor is both."""

    def __init__(self) -> None:
        self.synced: list[list[str]] = []
        self.running: set[str] = set()
        self.lease_table: dict[str, list[Lease]] = {}
        self.restarted: list[str] = []

    async def sync(self, networks: list[Network]) -> None:
        self.synced.append([n.name for n in networks])
        self.running = {n.name for n in networks if n.needs_dnsmasq}

    def status(self, network: str) -> DhcpStatus:
        return DhcpStatus(state="running" if network in self.running else "off")

    def leases(self, network: str) -> list[Lease]:
        return list(self.lease_table.get(network, []))

    async def restart(self, network: str) -> None:
        self.restarted.append(network)


class FakeAuthority:
    """polkit as the core asks it: a fixed answer, and who was asked about."""

    def __init__(self, answer: bool | None) -> None:
        self.answer = answer
        self.asked: list[tuple[Caller, str]] = []

    async def check(self, caller: Caller, action: str) -> bool | None:
        self.asked.append((caller, action))
        return self.answer


class FakeFrr:
    """The reconciler's FrrPort: the parts it was handed, in order."""

    def __init__(self) -> None:
        self.parts: list[object] = []

    async def sync(self, part: object) -> None:
        self.parts.append(part)
