"""The planner: plan(desired, observed, owned) -> ordered actions. Pure: no I/O, no clock.

It only ever touches what `owned` records or what the desired state names, so a
foreign bridge, address, route or table is never changed.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field

from kvmnetd.model import actions as A
from kvmnetd.model.desired import DesiredState, Mode, Network
from kvmnetd.model.observed import IPInterface, IPNetwork, Link, ObservedState, Route
from kvmnetd.model.owned import Owned
from kvmnetd.model.policy import PORT_KINDS, rule_matches
from kvmnetd.plan import overlay
from kvmnetd.plan.coexist import CoexistPlan, ForeignForward, coexist_rules
from kvmnetd.plan.nft import fingerprint, render_ruleset
from kvmnetd.plan.port_guard import guard_actions, port_guard_actions
from kvmnetd.plan.rate import port_rate_actions, released_limits

__all__ = ["PORT_KINDS", "Plan", "attach_for", "plan", "port_network", "rule_matches"]


@dataclass
class Plan:
    actions: list[A.Action] = field(default_factory=list)
    # network -> why it cannot be made right now (nothing is done for that part)
    problems: dict[str, str] = field(default_factory=dict)
    # network -> why it is degraded rather than failed: a host route over its subnet.
    # Also in `problems` while that keeps it from being brought up.
    degraded: dict[str, str] = field(default_factory=dict)
    # ifname -> network, for every port that should be attached (explicit or by policy)
    ports: dict[str, str] = field(default_factory=dict)
    # Bookkeeping the loop records before it applies the actions:
    # (bridge, network) found ready-made and empty enough to take over
    adopt: list[tuple[str, str]] = field(default_factory=list)
    # (VXLAN device, network) found made but not recorded (a kill right after creating it)
    adopt_vxlans: list[tuple[str, str]] = field(default_factory=list)
    # port bindings whose tap or bridge is gone (qemu reuses names like vnet0)
    forget_ports: list[str] = field(default_factory=list)
    # explicit port requests whose tap is gone: the request ends with the tap
    forget_requests: list[str] = field(default_factory=list)
    # networks whose dnsmasq should run, unless applying this plan fails for them
    dhcp: list[Network] = field(default_factory=list)
    # networks whose bridge this plan makes anew: a dnsmasq bound to the old one restarts
    dhcp_restart: set[str] = field(default_factory=set)
    # accepts in foreign firewalls for our networks (None: foreign chains not observed)
    coexist: CoexistPlan | None = None
    # rate limits of ours whose port and ifb are both gone: only the record is left
    forget_limits: list[str] = field(default_factory=list)
    # a port waits for the anti-spoofing table, which only a full pass applies
    guard_pending: bool = False


def plan(desired: DesiredState, observed: ObservedState, owned: Owned,
         table: str = "kvmnetd", foreign: ForeignForward | None = None,
         coexist_mode: str = "auto") -> Plan:
    p = Plan()
    active = desired.active_networks()
    _plan_records(desired, observed, owned, p)
    adopted = {bridge for bridge, _ in p.adopt}
    routes = host_routes(desired, observed)
    for net in active:
        if _blocked_by_route(net, observed, owned, routes, p, net.bridge in adopted):
            continue
        _plan_network(net, observed, owned, p, desired)
    _plan_ra_guard(active, observed, p)
    _plan_firewall(active, observed, table, p)
    _plan_forwarding(active, observed, owned, p)
    gone = set(p.forget_requests)
    p.ports = {i: n for i, n in wanted_ports(desired, observed).items() if i not in gone}
    # A port on a network with anti_spoofing never joins unguarded, nor is unguarded
    # before it leaves. Also on a network with a problem: its ports may still be on it.
    guard_before, guard_after = guard_actions(desired, observed, active, p.ports, table)
    p.actions += guard_before
    _plan_ports(desired, observed, owned, p)
    _plan_teardown(desired, observed, owned, p)
    p.actions += overlay.teardown(overlay.wanted_vxlans(
        [n for n in active if n.name not in p.problems]), owned.vxlans, observed)
    p.actions += guard_after
    running = [n for n in active if n.name not in p.problems]
    p.dhcp = [overlay.with_known_hosts(n, observed) for n in running if n.needs_dnsmasq]
    p.dhcp_restart = {a.network for a in p.actions
                      if isinstance(a, A.CreateBridge) and a.network is not None}
    if foreign is not None:
        p.coexist = coexist_rules(running, foreign, coexist_mode)
    return p


def _plan_records(desired: DesiredState, observed: ObservedState, owned: Owned,
                  p: Plan) -> None:
    """What the record should say before anything is applied: bridges to adopt, ports
    and requests that vanished with their tap."""
    for net in desired.active_networks():
        if net.bridge not in owned.bridges:
            link = observed.link(net.bridge)
            if (link is not None and link.kind == "bridge"
                    and foreign_bridge(net, observed, owned) is None):
                p.adopt.append((net.bridge, net.name))
    p.forget_ports = [i for i, bridge in owned.ports.items()
                      if observed.link(i) is None or observed.link(bridge) is None]
    p.forget_requests = [i for i in desired.ports if observed.link(i) is None]


# A host route as (IP version, first address, last address, route): plain integers, so
# checking every network against every route stays cheap on hosts with many routes.
HostRoute = tuple[int, int, int, Route]


def host_routes(desired: DesiredState, observed: ObservedState) -> list[HostRoute]:
    """The routes that are the host's own, not ours: ours are those on our bridges and
    bridged uplinks. Default routes say nothing about local subnets and do not count."""
    names = {n.bridge for n in desired.networks.values()}
    names |= {n.uplink for n in desired.networks.values() if n.uplink}
    ours = {lk.index for name in names if (lk := observed.link(name)) is not None}
    return [(*_span(r.dst), r) for r in observed.routes
            if r.oif not in ours and r.dst.prefixlen > 0]


@functools.lru_cache(maxsize=16384)
def _span(dst: IPNetwork) -> tuple[int, int, int]:
    return dst.version, int(dst.network_address), int(dst.broadcast_address)


def overlapping_route(net: Network, routes: list[HostRoute]) -> tuple[IPNetwork, Route] | None:
    """(our subnet, the host route) of the first host route over one of net's subnets."""
    for iface in _gateway_addresses(net):
        sub = iface.network
        lo, hi = int(sub.network_address), int(sub.broadcast_address)
        hits = [r for v, first, last, r in routes
                if v == sub.version and first <= hi and lo <= last]
        if hits:
            return sub, min(hits, key=lambda r: (str(r.dst), r.oif or 0))
    return None


def describe_route(route: Route, observed: ObservedState) -> str:
    via = f" via {route.gateway}" if route.gateway else ""
    dev = observed.name_of(route.oif)
    return f"{route.dst}{via} dev {dev}" if dev else f"{route.dst}{via}"


def _blocked_by_route(net: Network, observed: ObservedState, owned: Owned,
                      routes: list[HostRoute], p: Plan, adopted: bool = False) -> bool:
    """A host route (a VPN, a LAN that came up later) over the subnet degrades the network.

    Not yet up: it is not brought up, and comes up by itself once the route goes. Already
    running: it is left running, as networkd and libvirt do, and reported.
    """
    hit = overlapping_route(net, routes)
    if hit is None:
        return False
    subnet, route = hit
    what = f"subnet {subnet} overlaps the host route {describe_route(route, observed)}"
    br = observed.link(net.bridge)
    running = (br is not None and br.kind == "bridge" and br.up
               and (adopted or owned.bridges.get(net.bridge) == net.name))
    if running:
        p.degraded[net.name] = f"{what}; guests' traffic to it may leave the wrong way"
        return False
    p.degraded[net.name] = p.problems[net.name] = (
        f"{what}; not started, it starts by itself once that route goes away")
    return True


def _plan_network(net: Network, observed: ObservedState, owned: Owned, p: Plan,
                  desired: DesiredState) -> None:
    br = observed.link(net.bridge)
    acts = p.actions
    problem = overlay.overlay_problem(net, desired.overlay)
    if problem is not None:
        p.problems[net.name] = problem
        return
    if br is not None and br.kind != "bridge":
        p.problems[net.name] = (
            f"{net.bridge} exists and is a {br.kind or 'physical'} device, not a bridge; "
            "choose another bridge name")
        return
    other = owned.bridges.get(net.bridge)
    if other and other != net.name and br is not None:
        p.problems[net.name] = f"bridge {net.bridge} is already used by network {other}"
        return
    taken = foreign_bridge(net, observed, owned)
    if taken is not None:
        p.problems[net.name] = taken
        return
    uplink = observed.link(net.uplink) if net.mode is Mode.BRIDGED and net.uplink else None
    if net.mode is Mode.BRIDGED and uplink is None:
        p.problems[net.name] = f"uplink {net.uplink} not found"
    if br is None:
        mac = uplink.mac if uplink else net.overlay.mac if net.overlay else None
        acts.append(A.CreateBridge(net.name, net.bridge, mtu=net.mtu, mac=mac))
        if net.mtu is not None:
            # Set again after creation: only then does the kernel keep it when ports join.
            acts.append(A.SetMtu(net.name, net.bridge, net.mtu))
        if net.stp or net.forward_delay:
            acts.append(A.SetBridgeOptions(net.name, net.bridge, net.stp, net.forward_delay))
    else:
        if br.stp != net.stp or br.forward_delay != net.forward_delay:
            acts.append(A.SetBridgeOptions(net.name, net.bridge, net.stp, net.forward_delay))
        if net.mtu is not None and br.mtu != net.mtu:
            acts.append(A.SetMtu(net.name, net.bridge, net.mtu))
    acts += overlay.bridge_actions(net, br)
    have = observed.addresses_of(net.bridge)
    for addr in _gateway_addresses(net):
        if addr not in have:
            acts.append(A.AddAddress(net.name, net.bridge, addr))
    for addr_s in sorted(owned.addresses.get(net.bridge, set())):
        addr = ipaddress.ip_interface(addr_s)
        if addr in have and addr not in _gateway_addresses(net) and not _moved(addr_s, owned,
                                                                                 net.bridge):
            acts.append(A.RemoveAddress(net.name, net.bridge, addr))
    if br is None or not br.up:
        acts.append(A.SetUp(net.name, net.bridge))
    if uplink is not None:
        _plan_uplink(net, uplink, br, observed, acts)
    if net.overlay is not None and desired.overlay is not None:
        vx_acts, problem = overlay.vxlan_actions(net, desired.overlay, observed)
        if problem is not None:
            p.problems[net.name] = problem
        elif net.overlay.vxlan not in owned.vxlans and observed.link(net.overlay.vxlan):
            p.adopt_vxlans.append((net.overlay.vxlan, net.name))
        acts += vx_acts


def foreign_bridge(net: Network, observed: ObservedState, owned: Owned) -> str | None:
    """Why an existing bridge of net's name is someone else's; None if it may be adopted.

    An empty bridge made beforehand is adopted (and never deleted). One that carries
    an address other than this network's gateway belongs to something else, such as
    libvirt's virbr0 or docker0. A bridged network's bridge may carry the host's own.
    """
    if net.bridge in owned.bridges or net.mode is Mode.BRIDGED:
        return None
    br = observed.link(net.bridge)
    if br is None or br.kind != "bridge":
        return None
    mine = set(_gateway_addresses(net))
    theirs = sorted(str(a) for a in observed.addresses_of(net.bridge)
                    if a not in mine and not a.ip.is_link_local)
    if not theirs:
        return None
    return (f"bridge {net.bridge} already exists with address {theirs[0]}, so it is not "
            "kvmnetd's; choose another bridge name")


def _plan_uplink(net: Network, uplink: Link, br: Link | None, observed: ObservedState,
                 acts: list[A.Action]) -> None:
    # Order keeps the host reachable: addresses onto the bridge first, then the NIC
    # joins, then routes are replaced onto the bridge, then the NIC's copies go.
    if br is not None and uplink.master == br.index:
        return
    addrs = sorted(observed.addresses_of(uplink.name), key=str)
    routes = sorted((r for r in observed.routes_via(uplink.name) if r.gateway), key=str)
    have = observed.addresses_of(net.bridge)
    for addr in addrs:
        if addr not in have:
            acts.append(A.AddAddress(net.name, net.bridge, addr))
    acts.append(A.Enslave(net.name, uplink.name, net.bridge, uplink=True))
    if not uplink.up:
        acts.append(A.SetUp(net.name, uplink.name))
    for r in routes:
        acts.append(A.AddRoute(net.name, net.bridge, r))
    for addr in addrs:
        acts.append(A.RemoveAddress(net.name, uplink.name, addr))


def _moved(addr: str, owned: Owned, bridge: str) -> bool:
    return any(m.bridge == bridge and addr in m.addresses for m in owned.uplinks.values())


def _gateway_addresses(net: Network) -> list[IPInterface]:
    return [a for a in (net.ipv4, net.ipv6) if a is not None]


def _plan_firewall(active: list[Network], observed: ObservedState, table: str, p: Plan) -> None:
    ruled = [n for n in active if n.mode is not Mode.BRIDGED and n.name not in p.problems]
    if ruled:
        fp = fingerprint(ruled, table)
        if observed.firewall != fp:
            p.actions.append(A.ApplyFirewall(None, render_ruleset(ruled, table), fp))
    elif observed.firewall is not None:
        p.actions.append(A.RemoveFirewall(None))


def _plan_forwarding(active: list[Network], observed: ObservedState, owned: Owned,
                     p: Plan) -> None:
    for fam in (4, 6):
        need = any(n.forwards and (n.ipv4 if fam == 4 else n.ipv6) is not None
                   for n in active if n.name not in p.problems)
        on = observed.forwarding.get(fam)
        if on is None:
            continue  # not observed (no such sysctl): leave it alone
        if need and not on:
            p.actions.append(A.SetForwarding(None, fam, True))
        elif not need and fam in owned.forwarding and on != owned.forwarding[fam]:
            p.actions.append(A.SetForwarding(None, fam, owned.forwarding[fam]))


def ra_blockers(observed: ObservedState) -> list[str]:
    """Devices that would lose their IPv6 default route if IPv6 forwarding went on.

    With forwarding on, the kernel ignores router advertisements where accept_ra=1. With
    accept_ra=0 a daemon (NetworkManager, networkd) handles them itself: forwarding
    changes nothing there. 2 means accept them anyway.
    """
    return [d for d in observed.ra_default_devices() if observed.accept_ra.get(d) == 1]


def ra_guard_reason(devices: list[str]) -> str:
    fixes = "; ".join(f"sysctl -w net.ipv6.conf.{d.replace('.', '/')}.accept_ra=2"
                      for d in devices)
    return (f"IPv6 forwarding is needed but left off: with it on, the kernel ignores router "
            f"advertisements on {', '.join(devices)} (accept_ra=1) and the host would lose "
            f"its IPv6 default route; fix: {fixes} (and keep it in /etc/sysctl.d/)")


def _plan_ra_guard(active: list[Network], observed: ObservedState, p: Plan) -> None:
    """Like libvirt: refuse to turn IPv6 forwarding on under a host that relies on RAs.

    The setting is the host's, not ours to change; the networks that need the forwarding
    fail with the reason and the fix, the others go on.
    """
    if observed.forwarding.get(6) is not False:
        return  # already on (or not there): nothing of ours would change it
    devices = ra_blockers(observed)
    if not devices:
        return
    for net in active:
        if net.forwards and net.ipv6 is not None and net.name not in p.problems:
            p.problems[net.name] = ra_guard_reason(devices)


def wanted_ports(desired: DesiredState, observed: ObservedState) -> dict[str, str]:
    """Explicit requests first; then policy rules for taps not already on a foreign bridge."""
    ports = {i: n for i, n in desired.ports.items() if n in desired.active}
    if not desired.policy:
        return ports
    ours = {desired.networks[n].bridge for n in desired.active}
    for link in observed.links.values():
        if link.name in desired.ports:
            continue  # an explicit request (or explicit detach) wins over policy
        net = _by_policy(desired, observed, link, ours)
        if net is not None:
            ports[link.name] = net
    return ports


def followed_news(desired: DesiredState) -> tuple[bool, bool]:
    """(bridge ports' flags, fdb entries): the optional kernel news a plan reads. Port
    flags while a network isolates its ports or runs an overlay (the VXLAN port's
    neigh_suppress); fdb entries for overlays only. While no network needs them, a flag
    set by hand on a port is not seen, and so left alone."""
    active = desired.active_networks()
    overlay = any(n.overlay is not None for n in active)
    return any(n.isolate_ports for n in active) or overlay, overlay


def port_network(desired: DesiredState, observed: ObservedState, ifname: str) -> str | None:
    """Where one port belongs: its explicit request, else the attach policy."""
    if ifname in desired.ports:
        net = desired.ports[ifname]
        return net if net in desired.active else None
    link = observed.link(ifname)
    if link is None or not desired.policy:
        return None
    ours = {desired.networks[n].bridge for n in desired.active}
    return _by_policy(desired, observed, link, ours)


def _by_policy(desired: DesiredState, observed: ObservedState, link: Link,
               ours: set[str]) -> str | None:
    if not desired.policy.eligible(link, ours, observed.name_of(link.master)):
        return None
    return desired.policy.network_for(link, desired.active)


def attach_for(desired: DesiredState, observed: ObservedState, owned: Owned,
               ifname: str, table: str = "kvmnetd") -> Plan:
    """The plan for one port (a new tap, an API call): what a full pass would do for it,
    in O(1). A port whose bridge is not there yet waits for the pass that makes it."""
    p = Plan()
    if observed.link(ifname) is None:
        # Gone: its binding and its request end with the tap, as in a full pass.
        if ifname in owned.ports:
            p.forget_ports.append(ifname)
        if ifname in desired.ports:
            p.forget_requests.append(ifname)
        _release_limits(owned, observed, p, [ifname])
        p.actions += port_guard_actions(desired, observed, ifname, None, table) or []
        return p
    net = port_network(desired, observed, ifname)
    network = desired.networks[net] if net is not None else None
    guard = port_guard_actions(desired, observed, ifname, network, table)
    if net is not None and network is not None:
        p.ports[ifname] = net
        if guard is None:
            p.guard_pending = True  # the table is not there: a full pass brings it first
        elif observed.link(network.bridge) is not None:
            p.actions += [*guard, *_port_actions(ifname, network, observed)]
            p.actions += port_rate_actions(desired, network, ifname, observed, owned)
    else:
        if ifname in owned.ports:
            p.actions += _release(ifname, owned, observed)
        p.actions += guard or []  # after it left: never unguarded on the bridge
    _release_limits(owned, observed, p, [ifname])
    return p


def _release_limits(owned: Owned, observed: ObservedState, p: Plan,
                    names: list[str] | None = None) -> None:
    acts, forget = released_limits(owned, observed, p.ports, names)
    p.actions += acts
    p.forget_limits += forget


def _port_actions(ifname: str, net: Network, observed: ObservedState) -> list[A.Action]:
    link = observed.link(ifname)
    if link is None:
        return []  # not there yet: attached when netlink reports it
    br = observed.link(net.bridge)
    if br is None or link.master != br.index:
        # A port joins a bridge without isolation, also when it moves from another.
        isolate = [A.SetIsolated(net.name, ifname, True)] if net.isolate_ports else []
        return [A.Enslave(net.name, ifname, net.bridge), *isolate]
    acts: list[A.Action] = []
    if not link.up:
        acts.append(A.SetUp(net.name, ifname))
    # None: not reported (yet); only a wanted isolation is worth a write then.
    if bool(link.isolated) != net.isolate_ports or (net.isolate_ports and link.isolated is None):
        acts.append(A.SetIsolated(net.name, ifname, net.isolate_ports))
    return acts


def _release(ifname: str, owned: Owned, observed: ObservedState) -> list[A.Action]:
    bridge = owned.ports[ifname]
    link = observed.link(ifname)
    br = observed.link(bridge)
    if link is not None and br is not None and link.master == br.index:
        return [A.Release(owned.bridges.get(bridge), ifname)]
    return []


def _plan_ports(desired: DesiredState, observed: ObservedState, owned: Owned, p: Plan) -> None:
    for ifname, netname in sorted(p.ports.items()):
        net = desired.networks[netname]
        if netname in p.problems and observed.link(net.bridge) is None:
            continue
        p.actions += _port_actions(ifname, net, observed)
        p.actions += port_rate_actions(desired, net, ifname, observed, owned)
    for ifname in sorted(owned.ports):
        if ifname not in p.ports:
            p.actions += _release(ifname, owned, observed)
    _release_limits(owned, observed, p)


def _plan_teardown(desired: DesiredState, observed: ObservedState, owned: Owned,
                   p: Plan) -> None:
    wanted = {desired.networks[n].bridge for n in desired.active}
    for bridge, netname in sorted(owned.bridges.items()):
        if bridge in wanted:
            continue
        br = observed.link(bridge)
        for up_name, move in sorted(owned.uplinks.items()):
            if move.bridge == bridge:
                _restore_uplink(netname, up_name, move.addresses, move.routes, observed, p)
        if br is None:
            if bridge in owned.created:
                p.actions.append(A.DeleteBridge(netname, bridge))  # forget it
            continue
        for addr_s in sorted(owned.addresses.get(bridge, set())):
            addr = ipaddress.ip_interface(addr_s)
            if addr in observed.addresses_of(bridge):
                p.actions.append(A.RemoveAddress(netname, bridge, addr))
        for ifname, on in sorted(owned.ports.items()):
            link = observed.link(ifname)
            if on == bridge and link is not None and link.master == br.index:
                p.actions.append(A.Release(netname, ifname))
        if bridge in owned.created:
            p.actions.append(A.DeleteBridge(netname, bridge))


def _restore_uplink(netname: str, uplink: str, addresses: list[str],
                    routes: list[dict[str, object]], observed: ObservedState, p: Plan) -> None:
    link = observed.link(uplink)
    if link is None:
        return
    p.actions.append(A.Release(netname, uplink))
    have = observed.addresses_of(uplink)
    for addr_s in addresses:
        addr = ipaddress.ip_interface(addr_s)
        if addr not in have:
            p.actions.append(A.AddAddress(netname, uplink, addr))
    for r in routes:
        prio = r.get("priority")
        p.actions.append(A.AddRoute(netname, uplink, Route(
            dst=ipaddress.ip_network(str(r["dst"])), gateway=str(r["gateway"]),
            priority=prio if isinstance(prio, int) else None)))
