"""The one loop: coalesce triggers, observe, plan, apply, record; per-network state."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import structlog

from kvmnetd.adapters.owned_file import load_owned, save_owned
from kvmnetd.engine.eager import start_eagerly
from kvmnetd.engine.interfaces import (
    CoexistPort,
    DhcpPort,
    FirewallPort,
    FrrPort,
    NetlinkPort,
    PortGuardPort,
    RatePort,
    SysctlPort,
)
from kvmnetd.engine.settled import Settled
from kvmnetd.model import actions as A
from kvmnetd.model.desired import DesiredState
from kvmnetd.model.errors import KvmnetError, NoSuchPort
from kvmnetd.model.guard import GuardElement
from kvmnetd.model.observed import Link, ObservedState, RateSeen
from kvmnetd.model.owned import Owned
from kvmnetd.model.policy import PORT_KINDS
from kvmnetd.model.rate import SetPortRate
from kvmnetd.plan.adopt import adopt_ports
from kvmnetd.plan.coexist import ForeignForward
from kvmnetd.plan.frr import frr_part
from kvmnetd.plan.planner import Plan, attach_for, followed_news, plan
from kvmnetd.plan.rate import port_rates

log = structlog.get_logger("kvmnetd.reconcile")

# The safety sweep: what no event reports (sysctls) and a check that events missed
# nothing. Drift of our own objects comes by netlink, nft monitor and child exits.
SWEEP_INTERVAL = 60.0
# While a network cannot start for a reason no event reports (a host sysctl such as
# accept_ra), the loop looks again this often.
RETRY_INTERVAL = 1.0
# How long after an event on a settled port its own plan looks at it.
RECHECK_DELAY = 0.02
# Ports placed with nobody waiting (new taps, often a burst): owned.json and the port
# listeners hear of them once no event waits to be read, or this long after the first at
# the latest. A kill meanwhile loses nothing: a restart adopts what is on our bridges.
TELL_WITHIN = 0.1
TELL_POLL = 0.005


@dataclass(frozen=True)
class NetState:
    state: str  # inactive | configuring | active | degraded | failed
    reason: str = ""


class Reconciler:
    def __init__(self, netlink: NetlinkPort, firewall: FirewallPort, sysctl: SysctlPort,
                 dhcp: DhcpPort | None, owned_path: str, table: str = "kvmnetd",
                 verify_interval: float = SWEEP_INTERVAL, coexist: CoexistPort | None = None,
                 coexist_mode: str = "auto", rate: RatePort | None = None,
                 frr: FrrPort | None = None, guard: PortGuardPort | None = None) -> None:
        self.netlink = netlink
        self.guard = guard
        # The anti-spoofing table as last observed or written: (fingerprint, elements).
        self._guard_seen: tuple[str | None, frozenset[GuardElement]] = (None, frozenset())
        self.firewall = firewall
        self.sysctl = sysctl
        self.dhcp = dhcp
        self.owned_path = owned_path
        self.owned: Owned = load_owned(owned_path)
        self.table = table
        self.verify_interval = verify_interval
        self.desired = DesiredState()
        self.states: dict[str, NetState] = {}
        self.last_plan = Plan()
        self.passes = 0
        self.completed = 0  # passes finished: what readers of the results key caches on
        self._firewall_seen: str | None = None
        self._firewall_known = False  # our own table
        self._foreign_known = False  # other tables' forward chains (coexistence)
        # Something (nft monitor) reports foreign ruleset changes: then the periodic
        # verification reads only our own table, not the whole (maybe huge) ruleset.
        self.foreign_events = False
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._listeners: list[Callable[[str, NetState], None]] = []
        self.coexist = coexist
        self.frr = frr
        self.coexist_mode = coexist_mode
        self.rate = rate  # None: no tc here; a limit asked for fails on its port
        self._rates_known = False
        # Devices whose last tc filter event was a deletion: a port's redirect to its ifb
        # is gone although its ingress qdisc is there.
        self._filters_lost: set[int] = set()
        self._foreign: ForeignForward | None = None
        self.coexist_reports: tuple[str, ...] = ()
        self.port_errors: dict[str, str] = {}  # ifname -> why it could not be attached
        self._last_errors = 0
        self._sysctl_known = False
        self.owned_dirty = False  # changed since owned.json was last written
        self._other_trigger = True  # woken by something other than link events
        # Ports to look at without a full pass (new taps, API calls): ifname -> the
        # callers waiting for it. One queue: whoever asked, the same planner and writes.
        self._port_queue: dict[str, list[asyncio.Future[None]]] = {}
        # Ports and bridges settled since the last full pass: their own netlink events
        # then need no pass.
        self._settled = Settled()
        self._port_listeners: list[Callable[[set[str] | None], None]] = []
        self._running = False  # run() is draining the port queue
        # Ports whose writes are sent and not yet acknowledged: ifname -> how many
        # port passes have it in flight. The next port pass need not wait for those
        # acks; a full pass does (it plans from what the kernel acknowledged).
        self._inflight: dict[str, int] = {}
        self._inflight_passes = 0
        self._no_inflight = asyncio.Event()
        self._no_inflight.set()
        self._inflight_seen: set[str] = set()  # their events, read while in flight
        self._port_tasks: set[asyncio.Task[None]] = set()
        # Settled ports an event touched: planned once the events are all read, since a
        # write of ours shows in several events (enslaved, then up) and a plan made
        # between them would undo what is already done.
        self._recheck: set[str] = set()
        self._recheck_due: float | None = None
        self._wake_timer: asyncio.TimerHandle | None = None
        self._untold: set[str] = set()  # ports placed in a burst, not yet saved and told
        self._tell_due: float | None = None

    def on_state(self, listener: Callable[[str, NetState], None]) -> None:
        self._listeners.append(listener)

    def trigger(self) -> None:
        self._other_trigger = True
        self._wake.set()

    def on_ports(self, listener: Callable[[set[str] | None], None]) -> None:
        """Called after ports may have changed: with their names, or None after a full pass."""
        self._port_listeners.append(listener)

    def links_changed(self) -> None:
        """Netlink events changed links: a pass, unless the ports settled explain them all."""
        self._wake.set()

    def links_added(self, links: Sequence[Link]) -> None:
        """Netlink saw these links for the first time: taps and veths are looked at on
        their own (policy may place them, a request may wait for them), not by a full
        pass; the ones read together, in one port pass."""
        ports = [link for link in links if link.kind in PORT_KINDS]
        if not ports:
            return
        for link in ports:
            self._port_queue.setdefault(link.name, [])
        if self._running:
            # The pass starts now rather than when the loop next wakes: a guest's tap
            # waits for no other event of the burst to be read first.
            self._start_port_pass(now=True)
        self._wake.set()

    async def request_port(self, ifname: str, network: str) -> None:
        """An explicit request for one port ("" detaches it): returns once it is applied."""
        ports = dict(self.desired.ports)
        ports[ifname] = network
        self.desired = replace(self.desired, ports=ports)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._port_queue.setdefault(ifname, []).append(done)
        if self._running:
            self._start_port_pass()  # it takes every port queued meanwhile in one batch
        else:
            await self.apply_queued()  # no loop (start-up, tests): the caller drains
        await done

    def needs_pass(self) -> bool:
        """False when all that happened since the last pass is ports settled on their own,
        still as they were left: the pass would plan every link to find nothing to do."""
        if self._other_trigger:
            return True
        links, other = self.netlink.take_changes()
        return other or not self._covers(links)

    def _covers(self, changed: set[int]) -> bool:
        links = self.netlink.observed.links
        rest: list[int] = []
        for index in changed:
            link = links.get(index)
            if link is not None and link.name in self._port_queue:
                continue  # a queued port: its own plan comes next
            if link is not None and link.name in self._inflight:
                self._inflight_seen.add(link.name)  # its own pass settles it
                continue
            rest.append(index)
        again = self._settled.explain(rest, links)
        if again is None:
            return False
        self._recheck.update(again)
        return True

    def _rates_wanted(self) -> bool:
        """Any limit asked for or still ours to remove: else no tc runs at all."""
        d = self.desired
        return bool(d.rates or self.owned.limits
                    or any(n.port_rate for n in d.networks.values()))

    def rates_changed(self, touched: set[int] | None = None,
                      filters: dict[int, bool] | None = None) -> None:
        """tc events: the devices they touched (None: unknown, events were lost) and
        ifindex -> whether its last filter event added or deleted one. A pass re-reads the
        limits when one of our limited ports or their ifbs is among them."""
        for index, present in (filters or {}).items():
            if present:
                self._filters_lost.discard(index)
            else:
                self._filters_lost.add(index)
        self._rates_known = False
        if touched is None or not touched.isdisjoint(self._limited_indexes()):
            self.trigger()

    def _limited_indexes(self) -> set[int]:
        obs = self.netlink.observed
        names = [*self.owned.limits, *self.owned.limits.values()]
        return {link.index for name in names if (link := obs.link(name)) is not None}

    def firewall_changed(self) -> None:
        """nft monitor saw a change: re-read our table and the foreign chains next pass."""
        self._firewall_known = self._foreign_known = False
        self.trigger()

    async def run(self) -> None:
        """Forever: wait for a trigger (or the safety sweep), then converge."""
        self._running = True
        while True:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel that
            # comes as the event is set, and the daemon would not stop on SIGTERM.
            with contextlib.suppress(TimeoutError):
                wait = RETRY_INTERVAL if self.last_plan.problems else self.verify_interval
                async with asyncio.timeout(wait):
                    await self._wake.wait()
                await asyncio.sleep(0)  # let a burst of events land: one pass for all
            timed_out = not self._wake.is_set()
            self._wake.clear()
            try:
                if timed_out:
                    # The safety sweep re-reads what no event reports.
                    self._firewall_known = self._sysctl_known = False
                    if not self.foreign_events:
                        self._foreign_known = False
                    self._rates_known = False
                elif not self._other_trigger and self.netlink.events_pending():
                    # Mid-burst: the events still to read wake the loop again (or, if
                    # they change nothing, the timer does): one look after them, not
                    # one per datagram read.
                    self._wake_later()
                    continue
                else:
                    if not self._other_trigger:
                        self._start_port_pass()
                    if not self.needs_pass():
                        self._take_rechecks()
                        self._start_port_pass()
                        self._save_owned_if_dirty()
                        continue
                await self.converge()
            except Exception:  # the loop must survive anything a pass throws
                log.exception("reconcile.crashed")

    def _wake_later(self) -> None:
        if self._wake_timer is None or self._wake_timer.when() <= \
                asyncio.get_running_loop().time():
            self._wake_timer = asyncio.get_running_loop().call_later(RECHECK_DELAY,
                                                                     self._wake.set)

    async def converge(self, max_passes: int = 4, quick: bool = False) -> Plan:
        """Run passes until one has nothing left to do (or only failures remain).

        quick (API calls): also stop after a pass that applied its whole plan cleanly.
        """
        async with self._lock:
            await self._no_inflight.wait()  # plan from what the kernel acknowledged
            p = Plan()
            for _ in range(max_passes):
                p, applied = await self._pass()
                # Nothing done, or the whole plan applied cleanly: the mirror already shows
                # the result (writes are read back), so callers need not wait for a re-check;
                # the events our writes cause run one in the background.
                if applied == 0 or (quick and applied >= len(p.actions)
                                    and not self._last_errors):
                    break
            return p

    async def apply_queued(self) -> None:
        """The queued ports, now, waiting for their acks (start-up, tests)."""
        self._take_rechecks(now=True)
        if self._port_queue:
            await self._port_pass()
        self._save_owned_if_dirty()  # its caller waits for all of it: nothing deferred
        self._tell()

    def _take_rechecks(self, now: bool = False) -> None:
        """Queue the settled ports events touched, a moment after the first of them and
        once no event waits to be read: a tap being deleted goes down first, and a plan
        made in between would bring it up again just before it goes."""
        if not self._recheck:
            return
        loop = asyncio.get_running_loop()
        if self._recheck_due is None:
            self._recheck_due = loop.time() + RECHECK_DELAY
        wait = self._recheck_due - loop.time()
        if not now and (wait > 0 or self.netlink.events_pending()):
            loop.call_later(max(wait, 0.005), self._wake.set)
            return
        for name in self._recheck:
            if not self._settled.still(name, self.netlink.observed.link(name)):
                self._port_queue.setdefault(name, [])
        self._recheck.clear()
        self._recheck_due = None

    def _start_port_pass(self, now: bool = False) -> None:
        """The queued ports, without waiting for them: the loop goes back to reading
        events, and the next taps' pass may send while the kernel still works on these.

        now: planned and sent before this returns (a new tap, from the callback reading
        its event: else its enslave would wait until the rest of a burst is read). API
        calls start a task instead: calls arriving together then share one pass."""
        if not self._port_queue:
            return
        if now:
            task = start_eagerly(self._port_pass_logged())
        else:
            task = asyncio.get_running_loop().create_task(self._port_pass_logged())
        if task is not None:
            self._port_tasks.add(task)
            task.add_done_callback(self._port_tasks.discard)

    async def _port_pass_logged(self) -> None:
        try:
            await self._port_pass()
        except Exception:  # the loop must survive anything a pass throws
            log.exception("reconcile.crashed")

    async def _port_pass(self) -> None:
        """The queued ports alone: each planned by attach_for, all applied as one batch
        through the same writes and bookkeeping as a full pass.

        The lock covers planning and sending, so passes send in order; it is released
        once the writes are out, and the acks are read and settled after."""
        await self._lock.acquire()
        held = True

        def unlock() -> None:
            nonlocal held
            if held:
                held = False
                self._lock.release()

        try:
            await self._port_pass_locked(unlock)
        finally:
            unlock()

    async def _port_pass_locked(self, unlock: Callable[[], None]) -> None:
        queue, self._port_queue = self._port_queue, {}
        if not queue:
            return
        observed = self.netlink.observed
        # Seen gone by their own plan now: a deletion event read later needs no other.
        absent = {ifname for ifname in queue if observed.link(ifname) is None}
        p = Plan()
        for ifname in queue:
            one = attach_for(self.desired, observed, self.owned, ifname, self.table)
            if one.guard_pending:
                self._other_trigger = True  # the anti-spoofing table first, by a full pass
            if one.forget_ports or one.forget_requests or one.forget_limits:
                self._record(one)
                self.owned_dirty = True
            if one.ports and not one.actions and observed.link(ifname) is not None:
                bridge = self.desired.networks[one.ports[ifname]].bridge
                if observed.link(bridge) is None:
                    self._other_trigger = True  # a pass makes the bridge first
            p.actions += one.actions
            p.ports.update(one.ports)
        failed: dict[str, str] = {}
        p.actions, unguard = await self._guard_ports(p.actions, observed)
        if p.actions:
            for name in queue:
                self._inflight[name] = self._inflight.get(name, 0) + 1
            self._inflight_passes += 1
            self._no_inflight.clear()
            try:
                results = await self._apply_batch(p.actions, observed, failed, sent=unlock,
                                                  waited=any(queue.values()))
            finally:
                for name in queue:
                    left = self._inflight.pop(name) - 1
                    if left:
                        self._inflight[name] = left
                self._inflight_passes -= 1
                if not self._inflight_passes:
                    self._no_inflight.set()
            for action, err in zip(p.actions, results, strict=True):
                if self._settle(action, err, p, observed, failed):
                    self.owned_dirty = True
                elif err is not None and not isinstance(err, NoSuchPort):
                    # A full pass looks at it again, with everything else. A port that
                    # vanished needs none: its deletion event brings its own plan.
                    self.trigger()
        if unguard:
            await self._guard_update(frozenset(), unguard, observed)  # after they left
        for ifname in queue:
            net = p.ports.get(ifname)
            if net is None:
                self.last_plan.ports.pop(ifname, None)
            else:
                self.last_plan.ports[ifname] = net
            net_bridge = self.desired.networks[net].bridge if net else None
            link, br = observed.link(ifname), observed.link(net_bridge) if net_bridge else None
            if link is not None and br is not None and link.master == br.index:
                self._settled.port(ifname, link)
            elif link is not None and net is None and link.master is None:
                self._settled.port(ifname, link)
            elif link is None and ifname in absent:
                # Its index stays known until the deletion event is read: that event
                # then needs no plan. A port that vanished while its writes ran stays
                # settled: its deletion event brings the plan that forgets it.
                self._settled.forget(ifname)
            elif link is not None and ifname in self._inflight_seen:
                # Not where its plan put it, and the events that would have told the
                # loop were read while its writes were in flight: look again.
                self._port_queue.setdefault(ifname, [])
                self._wake.set()
            self._inflight_seen.discard(ifname)
        self.completed += 1
        self._untold.update(queue)
        if not any(queue.values()):
            # Nobody waits (a new tap, maybe one of a burst): its file write and the
            # listeners' work would hold up the next taps' events, so they come once
            # no event waits to be read (TELL_POLL, at most TELL_WITHIN later).
            self._tell_soon()
            return
        # On disk before any caller hears back: a kill now must not lose the port.
        self._save_owned_if_dirty()
        # Callers first: what listeners start (signals, STATUS=) then runs after the
        # reply, not between the port's ack and its caller.
        for waiters in queue.values():
            for done in waiters:
                if not done.done():
                    done.set_result(None)
        self._tell()

    def _tell_soon(self) -> None:
        loop = asyncio.get_running_loop()
        if self._tell_due is None:
            self._tell_due = loop.time() + TELL_WITHIN
            loop.call_later(TELL_POLL, self._tell_when_quiet)

    def _tell_when_quiet(self) -> None:
        due = self._tell_due
        if due is None:
            return  # a pass with callers told everything meanwhile
        if self.netlink.events_pending() and asyncio.get_running_loop().time() < due:
            asyncio.get_running_loop().call_later(TELL_POLL, self._tell_when_quiet)
            return
        self._save_owned_if_dirty()
        self._tell()

    def _tell(self) -> None:
        names, self._untold, self._tell_due = self._untold, set(), None
        if names:
            self._ports_changed(names)

    async def _guard_ports(self, actions: list[A.Action], observed: ObservedState
                           ) -> tuple[list[A.Action], frozenset[GuardElement]]:
        """The single-port work's anti-spoofing changes: what guards, as one update before
        the ports join; what stops guarding is returned, for after they have left. If the
        update fails, the ports of networks with anti_spoofing wait for a full pass."""
        updates = [a for a in actions if isinstance(a, A.UpdatePortGuard)]
        rest = [a for a in actions if not isinstance(a, A.UpdatePortGuard)]
        if not updates or self.guard is None:
            return rest, frozenset()
        add = frozenset().union(*(a.add for a in updates))
        delete = frozenset().union(*(a.delete for a in updates))
        if add and not await self._guard_update(add, frozenset(), observed):
            guarded = {n.name for n in self.desired.networks.values() if n.anti_spoofing}
            return [a for a in rest if a.network not in guarded], frozenset()
        return rest, delete

    async def _guard_update(self, add: frozenset[GuardElement],
                            delete: frozenset[GuardElement], observed: ObservedState) -> bool:
        assert self.guard is not None
        try:
            elements = await self.guard.update(add, delete)
        except (KvmnetError, OSError) as e:
            log.warning("guard.update_failed", error=str(e))
            self._firewall_known = False
            self.trigger()
            return False
        self._guard_seen = (self._guard_seen[0], elements)
        observed.guard_elements = elements
        log.info("reconcile.applied", network=None, ifname=None,
                 action=f"UpdatePortGuard(add={len(add)}, delete={len(delete)})")
        return True

    def _settle_all(self, p: Plan, observed: ObservedState) -> None:
        """After a full pass: its ports where it put them, and our bridges as they are, so
        the events that follow (a tap deleted, a bridge's MAC) need no pass of their own.
        Left empty while something is still to do: the next pass looks again."""
        if p.problems or self._last_errors:
            return
        bridges: dict[str, int] = {}
        for net in self.desired.active_networks():
            br = observed.link(net.bridge)
            if br is not None:
                bridges[net.name] = br.index
                self._settled.bridge(br)
        for ifname, net_name in p.ports.items():
            link = observed.link(ifname)
            master = bridges.get(net_name)
            if link is not None and master is not None and link.master == master and link.up:
                self._settled.port(ifname, link)

    def _ports_changed(self, names: set[str] | None) -> None:
        for listener in self._port_listeners:
            try:
                listener(names)
            except Exception:  # a listener's bug must not break the loop
                log.exception("reconcile.listener_failed")

    async def set_desired(self, desired: DesiredState) -> Plan:
        self.desired = desired
        self._other_trigger = True
        return await self.converge(quick=True)

    def observe(self) -> ObservedState:
        obs = self.netlink.observed
        fresh = not self._sysctl_known  # first pass, periodic verification, after our writes
        if fresh:
            for fam in (4, 6):
                value = self.sysctl.forwarding(fam)
                if value is not None:
                    obs.forwarding[fam] = value
            self._sysctl_known = True
        # accept_ra of devices with an RA-learned default route, for the planner's check
        # before IPv6 forwarding goes on; a device new since the last read is read now.
        ra_devices = obs.ra_default_devices()
        for name in ra_devices:
            if fresh or name not in obs.accept_ra:
                ra = self.sysctl.accept_ra(name)
                if ra is None:
                    obs.accept_ra.pop(name, None)
                else:
                    obs.accept_ra[name] = ra
        for name in set(obs.accept_ra) - set(ra_devices):
            del obs.accept_ra[name]
        obs.firewall = self._firewall_seen
        obs.guard, obs.guard_elements = self._guard_seen
        return obs

    async def _pass(self) -> tuple[Plan, int]:
        self.passes += 1
        # From here on this pass sees everything: later changes are for the next look.
        self._other_trigger = False
        self.netlink.take_changes()
        self._settled.clear()
        self._recheck.clear()
        self._recheck_due = None
        queue, self._port_queue = self._port_queue, {}
        await self._read_rulesets()
        if not self._rates_known and self.rate is not None and self._rates_wanted():
            self._rates_known = True  # a change reported while reading clears it again
            try:
                qdiscs = await self.rate.observe()
                self.netlink.observed.port_rates = port_rates(
                    qdiscs, self.netlink.observed, self._filters_lost)
            except (KvmnetError, OSError) as e:
                # No tc: the limits asked for fail on their ports; the rest goes on.
                log.warning("rates.observe_failed", error=str(e))
        observed = self.observe()
        before = self.owned.to_json()  # adoption and forgetting are changes to save too
        p = plan(self.desired, observed, self.owned, self.table,
                 self._foreign if self.coexist is not None else None, self.coexist_mode)
        self._record(p)
        failed: dict[str, str] = {}
        applied = 0
        self._last_errors = 0
        for batch in self._batches(p):
            for action, err in zip(batch, await self._apply_batch(batch, observed, failed),
                                   strict=True):
                applied += self._settle(action, err, p, observed, failed)
                self._last_errors += err is not None
        applied += await self._coexist(p, failed)
        if self.owned.to_json() != before:
            self.owned_dirty = True
        self._save_owned_if_dirty()
        if self.dhcp is not None:
            ok = [n for n in p.dhcp if n.name not in failed]
            # A bridge made anew this pass: a dnsmasq still bound to the old one is replaced
            # (a new network has none yet; sync starts it).
            for net in ok:
                if net.name in p.dhcp_restart:
                    await self.dhcp.restart(net.name)
            await self.dhcp.sync(ok)
        if self.frr is not None:
            # Desired state like dnsmasq's: every pass says what FRR should hold.
            await self.frr.sync(frr_part(self.desired.overlay, self.desired.active_networks()))
        self.last_plan = p  # before listeners run: they read ports from it
        self._settle_all(p, observed)
        # After the writes: a pass that stops following port flags has just planned
        # with them (turning isolation off on the last network that had it).
        self.netlink.follow(*followed_news(self.desired))
        self.completed += 1
        log.debug("reconcile.pass", number=self.passes, actions=len(p.actions),
                  applied=applied, problems=sorted(p.problems))
        self._update_states(p, failed)
        self._ports_changed(None)
        for waiters in queue.values():
            for done in waiters:
                if not done.done():
                    done.set_result(None)
        return p, applied

    async def _read_rulesets(self) -> None:
        """Our tables and the foreign chains, where not known, read at the same time: each
        is an nft run of its own (~5 ms), and a heal waits for all of them."""
        ours = not self._firewall_known
        foreign = not self._foreign_known and self.coexist is not None

        async def read_ours() -> None:
            self._firewall_seen = await self.firewall.observe()

        async def read_guard() -> None:
            assert self.guard is not None
            self._guard_seen = await self.guard.observe()

        async def read_foreign() -> None:
            assert self.coexist is not None
            self._foreign = await self.coexist.observe()

        reads = []
        if ours:
            self._firewall_known = True  # a change reported while reading clears it again
            reads.append(read_ours())
            if self.guard is not None:
                reads.append(read_guard())
        if foreign:
            self._foreign_known = True
            reads.append(read_foreign())
        if not reads:
            return
        try:
            # Each read runs to its end; the first failure is raised after all of them.
            for result in await asyncio.gather(*reads, return_exceptions=True):
                if isinstance(result, BaseException):
                    raise result
        except BaseException:
            if ours:
                self._firewall_known = False
            if foreign:
                self._foreign_known = False
            raise

    def _save_owned_if_dirty(self) -> None:
        if self.owned_dirty:
            self.owned_dirty = False
            save_owned(self.owned_path, self.owned)

    def _batches(self, p: Plan) -> list[list[A.Action]]:
        """Runs of guest-port actions go together (pipelined); everything else alone, in order."""
        out: list[list[A.Action]] = []
        for action in p.actions:
            if (out and self._port_of(action, p) is not None
                    and self._port_of(out[-1][-1], p) is not None):
                out[-1].append(action)
            else:
                out.append([action])
        return out

    async def _apply_batch(self, batch: list[A.Action], observed: ObservedState,
                           failed: dict[str, str], sent: Callable[[], None] | None = None,
                           waited: bool = True) -> list[BaseException | None]:
        # A failure is settled after each batch; other actions are batches of one, so
        # a network that failed earlier in this pass is skipped here.
        todo = [a for a in batch if a.network is None or a.network not in failed]
        results: dict[int, BaseException | None] = {}
        # Rate limits go through tc after the ports' links, all in one go.
        links = [a for a in todo if not isinstance(a, SetPortRate)]
        limits = [a for a in todo if isinstance(a, SetPortRate)]
        if len(links) > 1 or (links and isinstance(links[0], _PORT_WRITES)):
            # sent() as soon as the links' requests are out, unless tc follows.
            early = sent if len(links) == len(todo) else None
            for action, err in zip(links, await self.netlink.apply_many(links, early, waited),
                                   strict=True):
                results[id(action)] = err
        if len(limits) > 1 and self.rate is not None:
            for limit, err in zip(limits, await self.rate.apply_many(limits), strict=True):
                results[id(limit)] = err
                if err is None:
                    self._limit_seen(limit, observed)
        for action in todo:
            if id(action) in results:
                continue
            if isinstance(action, A.CreateBridge):
                # Write ahead: a kill right after the kernel made it must not leave a
                # bridge we would later adopt as someone else's and never delete.
                self.owned.record(action, observed)
                save_owned(self.owned_path, self.owned)
            try:
                await self._apply(action, observed)
                results[id(action)] = None
            except (KvmnetError, OSError) as e:
                results[id(action)] = e
        if sent is not None:
            sent()  # once more does nothing
        return [results.get(id(a), _SKIPPED) for a in batch]

    def _settle(self, action: A.Action, err: BaseException | None, p: Plan,
                observed: ObservedState, failed: dict[str, str]) -> int:
        """Record one action's outcome; 1 if it changed the system."""
        if err is _SKIPPED:
            return 0
        if err is None:
            if isinstance(action, A.Enslave | A.SetUp | A.Release | A.SetIsolated
                          | SetPortRate):
                self.port_errors.pop(action.ifname, None)
            self.owned.record(action, observed)
            log.info("reconcile.applied", network=action.network, ifname=A.device(action),
                     action=A.describe(action))
            return 1
        if isinstance(action, A.CreateBridge) and observed.link(action.bridge) is None:
            self.owned.bridges.pop(action.bridge, None)
            self.owned.created.discard(action.bridge)
        port = self._port_of(action, p)
        if port is not None:
            # A guest's tap failing (or vanishing mid-pass) is that port's problem,
            # never its network's.
            if not isinstance(err, NoSuchPort):
                self.port_errors[port] = str(err)
                log.warning("reconcile.port_failed", network=action.network, ifname=port,
                            error=str(err))
            return 0
        log.warning("reconcile.action_failed", network=action.network,
                    action=type(action).__name__, error=str(err))
        if action.network is not None:
            failed[action.network] = str(err)
        if isinstance(action, A.ApplyPortGuard | A.UpdatePortGuard):
            # No port of these networks may join unguarded: their later actions wait.
            self._firewall_known = False
            for net in self.desired.active_networks():
                if net.anti_spoofing:
                    failed[net.name] = f"anti-spoofing: {err}"
        return 0

    def _port_of(self, action: A.Action, p: Plan) -> str | None:
        """The guest port an action is about, if it is one (not a bridge, not an uplink)."""
        if isinstance(action, A.Enslave) and not action.uplink:
            return action.ifname
        if isinstance(action, SetPortRate):
            return action.ifname  # only guest ports are limited
        if isinstance(action, A.Release | A.SetUp | A.SetIsolated) and (
                action.ifname in p.ports or action.ifname in self.owned.ports):
            return action.ifname
        return None

    async def _coexist(self, p: Plan, failed: dict[str, str]) -> int:
        """Accepts for our networks where a foreign firewall drops forwarded traffic."""
        if self.coexist is None or p.coexist is None:
            return 0
        self.coexist_reports = p.coexist.reports
        rules = tuple(r for r in p.coexist.rules if r.network not in failed)
        try:
            change = await self.coexist.apply(rules)
        except (KvmnetError, OSError) as e:
            log.warning("coexist.failed", error=str(e))
            return 0
        if not change:
            return 0
        self._foreign_known = False
        log.info("coexist.applied", inserted=len(change.insert), deleted=len(change.delete))
        return 1

    def _record(self, p: Plan) -> None:
        """The plan's bookkeeping: adopted bridges, and ports gone with their taps."""
        for bridge, network in p.adopt:
            self.owned.adopt(bridge, network)
            log.info("bridge.adopted", network=network, bridge=bridge)
        for vxlan, network in p.adopt_vxlans:
            self.owned.vxlans[vxlan] = network
        for ifname in p.forget_ports:
            self.owned.ports.pop(ifname, None)
        for ifname in p.forget_limits:
            self.owned.limits.pop(ifname, None)
        if p.forget_requests:
            gone = set(p.forget_requests)
            ports = {i: n for i, n in self.desired.ports.items() if i not in gone}
            self.desired = replace(self.desired, ports=ports)

    def restore_ports(self) -> None:
        """After a restart, guest ports found on our bridges stay requested (plan.adopt)."""
        ports, owned = adopt_ports(self.desired, self.netlink.observed, self.owned.ports)
        self.desired = replace(self.desired, ports=ports)
        if owned != self.owned.ports:
            self.owned.ports = owned
            save_owned(self.owned_path, self.owned)

    async def _apply(self, action: A.Action, observed: ObservedState) -> None:
        match action:
            case A.ApplyFirewall(ruleset=text):
                self._firewall_known = False
                await self.firewall.apply(text)
            case A.RemoveFirewall():
                self._firewall_known = False
                await self.firewall.remove()
            case A.ApplyPortGuard() | A.UpdatePortGuard() | A.RemovePortGuard():
                await self._apply_guard(action, observed)
            case A.SetForwarding(family=fam, enabled=on):
                self._sysctl_known = False
                self.sysctl.set_forwarding(fam, on)
            case A.DeleteBridge(bridge=br) if observed.link(br) is None:
                pass  # already gone: only our record is left to drop
            case SetPortRate(ifname=dev):
                if self.rate is None:
                    raise KvmnetError(f"{dev}: rate limits are not available here (no tc)")
                await self.rate.apply(action)
                self._limit_seen(action, observed)
            case _:
                await self.netlink.apply(action)

    @staticmethod
    def _limit_seen(action: SetPortRate, observed: ObservedState) -> None:
        """Read back as written; the qdisc events it causes have them all re-read."""
        if action.rate is None:
            observed.port_rates.pop(action.ifname, None)
        else:
            observed.port_rates[action.ifname] = RateSeen(action.rate, action.rate)

    async def _apply_guard(self, action: A.Action, observed: ObservedState) -> None:
        match action:
            case A.ApplyPortGuard(ruleset=text, fingerprint=fp, elements=elements):
                await self._guard().apply(text, fp, elements)
                self._guard_seen = (fp, elements)
            case A.UpdatePortGuard(add=add, delete=delete):
                self._guard_seen = (self._guard_seen[0], await self._guard().update(add, delete))
            case A.RemovePortGuard():
                await self._guard().remove()
                self._guard_seen = (None, frozenset())
        # The mirror at once: single-port work that follows plans against it.
        observed.guard, observed.guard_elements = self._guard_seen

    def _guard(self) -> PortGuardPort:
        if self.guard is None:
            raise KvmnetError("anti-spoofing is not available: no bridge table adapter")
        return self.guard

    def _update_states(self, p: Plan, failed: dict[str, str]) -> None:
        new: dict[str, NetState] = {}
        for name in sorted(self.desired.networks):
            if name not in self.desired.active:
                new[name] = NetState("inactive")
            elif name in p.problems and name not in p.degraded:
                new[name] = NetState("failed", p.problems[name])
            elif name in failed:
                new[name] = NetState("failed", failed[name])
            elif name in p.degraded:
                new[name] = NetState("degraded", p.degraded[name])
            else:
                new[name] = NetState("active")
        # A network that is gone (undefined, or dropped by a reload) is told as inactive
        # once, so listeners can drop what they keep for it.
        gone = {name: NetState("inactive", "undefined") for name in self.states
                if name not in new}
        for name, st in [*new.items(), *gone.items()]:
            if self.states.get(name) != st:
                log.info("network.state", network=name, state=st.state, reason=st.reason)
                for listener in self._listeners:
                    try:
                        listener(name, st)
                    except Exception:  # a listener's bug must not break the loop
                        log.exception("reconcile.listener_failed", network=name)
        self.states = new

    @property
    def writes(self) -> int:
        extra = self.coexist.writes if self.coexist is not None else 0
        extra += self.rate.writes if self.rate is not None else 0
        extra += self.guard.writes if self.guard is not None else 0
        return self.netlink.writes + self.firewall.writes + self.sysctl.writes + extra


# A port's own writes: sent through the netlink adapter's pipeline even one at a time.
_PORT_WRITES = (A.Enslave, A.SetUp, A.Release, A.SetIsolated)
_SKIPPED = KvmnetError("skipped: its network failed earlier in this pass")
