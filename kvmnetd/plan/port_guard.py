"""Planning anti-spoofing: which elements the bridge table should hold, and the actions
that take it there. Pure, like the rest of the planner."""

from __future__ import annotations

from collections.abc import Mapping

from kvmnetd.model import actions as A
from kvmnetd.model.desired import DesiredState, Network
from kvmnetd.model.guard import GuardElement
from kvmnetd.model.observed import ObservedState
from kvmnetd.plan.nft_bridge import fingerprint, port_elements, port_of, render_table


def wanted_elements(desired: DesiredState, ports: Mapping[str, str]) -> set[GuardElement]:
    """Elements for every port of an active network with anti_spoofing on."""
    out: set[GuardElement] = set()
    for ifname, netname in ports.items():
        net = desired.networks.get(netname)
        if net is not None and net.anti_spoofing:
            out |= port_elements(ifname, net, desired.identities.get(ifname))
    return out


def guard_actions(desired: DesiredState, observed: ObservedState, active: list[Network],
                  ports: Mapping[str, str], table: str
                  ) -> tuple[list[A.Action], list[A.Action]]:
    """The full pass: the table while any active network wants it, with exactly the
    elements of the ports planned now; removed with the last such network. As (before
    the ports are planned, after them): what guards comes before a port joins, what
    stops guarding after it has left."""
    if not any(n.anti_spoofing for n in active):
        return [], ([A.RemovePortGuard(None)] if observed.guard is not None else [])
    want = frozenset(wanted_elements(desired, ports))
    fp = fingerprint(table)
    if observed.guard != fp:
        return [A.ApplyPortGuard(None, render_table(want, table), fp, want)], []
    have = observed.guard_elements
    add, delete = want - have, have - want
    return ([A.UpdatePortGuard(None, add, frozenset())] if add else [],
            [A.UpdatePortGuard(None, frozenset(), delete)] if delete else [])


def port_guard_actions(desired: DesiredState, observed: ObservedState, ifname: str,
                       net: Network | None, table: str) -> list[A.Action] | None:
    """One port's elements (the loop's single-port work). None when the table is not in
    place: then the port must wait for a full pass, or it would join unguarded."""
    guarded = net is not None and net.anti_spoofing
    if observed.guard is None:
        return None if guarded else []  # no table (the common case): nothing to render
    if observed.guard != fingerprint(table):
        return None if guarded else []
    want = port_elements(ifname, net, desired.identities.get(ifname)) \
        if guarded and net is not None else set()
    have = {e for e in observed.guard_elements if port_of(e) == ifname}
    if want == have:
        return []
    return [A.UpdatePortGuard(net.name if net else None, frozenset(want - have),
                              frozenset(have - want))]
