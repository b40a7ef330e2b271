"""New taps that policy claims, enslaved from their own netlink event, and what lets the loop
skip the full pass afterwards: O(1) per tap instead of a plan over every link."""

from __future__ import annotations

import asyncio
import functools
from typing import TYPE_CHECKING

import structlog

from . import actions as A
from .errors import KvmnetError, NoSuchPort
from .observed import Link
from .plan import PORT_KINDS, policy_network

if TYPE_CHECKING:
    from .reconciler import Reconciler

log = structlog.get_logger("kvmnetd.reconcile")

BURST_QUIET = 0.05  # seconds without a new tap before the loop looks again
BURST_MOST = 0.5  # ... but it never waits longer than this


class FastPath:
    def __init__(self, rec: Reconciler) -> None:
        self.rec = rec
        self.in_flight = 0
        # Taps attached since the last full pass: ifname -> (its index, its bridge's index).
        self.done: dict[str, tuple[int, int]] = {}
        self._quiet_at = 0.0

    def link_appeared(self, link: Link) -> None:
        """Netlink saw this link for the first time. If policy puts it on a running
        network, start the enslave now: nothing is planned and the loop is not woken."""
        rec = self.rec
        desired = rec.desired
        if (not desired.rules or link.master is not None or link.kind not in PORT_KINDS
                or link.name in desired.ports):
            return
        net = policy_network(desired, link)
        if net is None:
            return
        bridge = desired.networks[net].bridge
        if rec.netlink.observed.link(bridge) is None:
            return  # a pass makes the bridge, then attaches
        action = A.Enslave(net, link.name, bridge)
        done = rec.netlink.enslave_new(action)
        done.add_done_callback(functools.partial(self._finished, action))
        self.in_flight += 1
        self._hold()

    def _finished(self, action: A.Enslave, task: asyncio.Future[None]) -> None:
        self.in_flight -= 1
        self._hold()
        rec = self.rec
        err = task.exception() if not task.cancelled() else KvmnetError("cancelled")
        if err is not None:
            if not isinstance(err, NoSuchPort):  # a tap gone again is no error
                rec.port_errors[action.ifname] = str(err)
                log.warning("reconcile.port_failed", network=action.network,
                            ifname=action.ifname, error=str(err))
            rec.trigger()
            return
        obs = rec.netlink.observed
        rec.port_errors.pop(action.ifname, None)
        rec.owned.record(action, obs)
        rec.owned_dirty = True
        link, br = obs.link(action.ifname), obs.link(action.bridge)
        if link is not None and br is not None:
            self.done[action.ifname] = (link.index, br.index)
        # What readers of the last pass see (port lists, status), without a new pass.
        rec.last_plan.ports[action.ifname] = action.network or ""
        rec.completed += 1
        log.info("reconcile.applied", network=action.network, ifname=action.ifname,
                 action=A.describe(action), fast=True)

    def covers(self, changed: set[int]) -> bool:
        """Every changed link is a tap attached here, still as it was left."""
        links = self.rec.netlink.observed.links
        for index in changed:
            link = links.get(index)
            if link is None or not link.up:
                return False
            if self.done.get(link.name) != (index, link.master):
                return False
        return True

    def _hold(self) -> None:
        self._quiet_at = asyncio.get_running_loop().time() + BURST_QUIET

    async def settle(self) -> None:
        """While taps keep arriving, leave them to link_appeared (at most BURST_MOST s,
        so endless churn cannot starve the full pass)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BURST_MOST
        while (left := min(self._quiet_at, deadline) - loop.time()) > 0:
            await asyncio.sleep(left)
