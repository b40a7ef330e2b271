"""`kvmnetctl doctor`: why does a guest have no network? Pure checks over a probed snapshot.

The probe (doctor_probe.py) does all reading; every check here is a plain function of
DoctorInput, so each can be tested with a hand-built input.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from kvmnetd.adapters.doctor_probe import (
    BRNF,
    V4_FORWARD,
    V6_FORWARD,
    DoctorInput,
    ForeignListener,
    forwarding_key,
    probe,
)
from kvmnetd.adapters.sysctl import accept_ra_key
from kvmnetd.model.desired import Mode, Network
from kvmnetd.model.observed import Link, ObservedState
from kvmnetd.model.records import Lease, NetworkStatus
from kvmnetd.plan.foreign_forward import ForwardDrop, bridge_allowed, forward_drops, has_table
from kvmnetd.plan.foreign_input import accept_fix, input_blocks, services_of

__all__ = ["DoctorInput", "Finding", "ForeignListener", "doctor", "render_text", "run_checks"]

SEVERITIES = ("error", "warning", "info")
# The daemon setting that makes kvmnetd add its accept rules to other firewalls' tables.
COEXISTENCE_HINT = ('set coexist = "auto" (iptables chains such as DOCKER-USER) or "all" '
                    "(also foreign nftables chains) in the [daemon] section of kvmnetd.toml")
# Zones that let guests reach the host's DHCP/DNS; kvmnetd's own zone is the one to use.
OPEN_ZONES = ("kvmnetd", "trusted", "libvirt", "libvirt-routed")
CLOSED_ZONES = ("drop", "block")


@dataclass(frozen=True)
class Finding:
    check: str  # stable id, e.g. "ip-forwarding-off"
    severity: str  # error | warning | info
    network: str | None
    subject: str  # the device, process, sysctl or route concerned
    message: str
    fix: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _families(net: Network) -> list[int]:
    return [fam for fam, a in ((4, net.ipv4), (6, net.ipv6)) if a is not None]


def _ports_of(obs: ObservedState, bridge: Link) -> list[Link]:
    return sorted((lk for lk in obs.links.values() if lk.master == bridge.index),
                  key=lambda lk: lk.name)


# ---- core state ------------------------------------------------------------------------------


def check_status(inp: DoctorInput) -> Iterable[Finding]:
    active = {n.name: n for n in inp.networks}
    foreign = {lst.network for lst in inp.listeners}
    if not active:
        yield Finding("no-active-networks", "info", None, "kvmnetd",
                      "no network is active, so there is nothing for a guest to join",
                      "kvmnetctl network start NAME (kvmnetctl network list shows them)")
    for st in inp.statuses:
        if st.name not in active:
            continue
        restart = f"kvmnetctl network stop {st.name} && kvmnetctl network start {st.name}"
        if st.state == "failed":
            yield Finding("network-failed", "error", st.name, st.bridge,
                          f"network {st.name} failed: {st.reason or 'no reason given'}",
                          f"fix the cause named, then {restart}; the daemon log has details")
        elif st.state in ("pending", "configuring"):
            yield Finding("network-pending", "info", st.name, st.bridge,
                          f"network {st.name} is still {st.state}",
                          f"wait a moment; if it stays {st.state}, see the daemon log")
        dhcp_bad = st.dhcp.state in ("degraded", "failed")
        # A network degraded by a host route over its subnet: check_overlaps names it.
        if dhcp_bad and st.name not in foreign:
            reason = st.dhcp.reason or st.reason or st.dhcp.state
            fix = (f"apt-get install dnsmasq-base, then {restart}" if "not installed" in reason
                   else f"fix the cause named, then {restart}")
            yield Finding("dhcp-degraded", "error", st.name, st.bridge,
                          f"DHCP/DNS for {st.name} is not running ({reason}), so guests get "
                          "no address", fix)


def check_foreign_listeners(inp: DoctorInput) -> Iterable[Finding]:
    bridges = {n.name: n.bridge for n in inp.networks}
    for lst in inp.listeners:
        br = bridges.get(lst.network, "the bridge")
        yield Finding("foreign-dhcp-server", "error", lst.network, f"pid {lst.pid}",
                      f"{lst.why}: pid {lst.pid} ({lst.cmdline or '?'}) answers in place of "
                      f"kvmnetd's dnsmasq on {br}",
                      f"stop it (kill {lst.pid}, or stop its service), or configure it with "
                      f"bind-interfaces and except-interface={br} so it leaves {br} alone")


# ---- forwarding ------------------------------------------------------------------------------


def _off(inp: DoctorInput, key: str, family: int | None = None) -> bool:
    value = inp.sysctls.get(key)
    if value is None and family is not None and family in inp.observed.forwarding:
        return not inp.observed.forwarding[family]
    return value is not None and value.strip() == "0"


def check_forwarding(inp: DoctorInput) -> Iterable[Finding]:
    for fam, key in ((4, V4_FORWARD), (6, V6_FORWARD)):
        nets = [n for n in inp.networks if n.forwards and fam in _families(n)]
        if nets and _off(inp, key, fam):
            names = ", ".join(n.name for n in nets)
            yield Finding("ip-forwarding-off", "error", nets[0].name if len(nets) == 1 else None,
                          key, f"IPv{fam} forwarding is off, so the host does not route traffic "
                          f"of {names} ({key}=0)",
                          f"sysctl -w {key}=1, and find what turns it off (a file in "
                          "/etc/sysctl.d/ or a service setting it to 0)")
        # IPv4 also checks the receiving device's own switch (IPv6 has none that forwards).
        for net in nets if fam == 4 and not _off(inp, key, fam) else []:
            for dev in filter(None, (net.bridge, net.uplink)):
                per = forwarding_key(dev)
                if _off(inp, per):
                    yield Finding("ip-forwarding-off", "error", net.name, per,
                                  f"IPv4 forwarding is off on {dev} itself ({per}=0)",
                                  f"sysctl -w {per}=1")


def check_accept_ra(inp: DoctorInput) -> Iterable[Finding]:
    """An RA-learned IPv6 default route on a device that stops taking RAs once forwarding is on."""
    nets = [n.name for n in inp.networks if n.forwards and n.ipv6 is not None]
    on = inp.sysctls.get(V6_FORWARD, "").strip() == "1"
    if not nets and not on:
        return
    for dev in inp.observed.ra_default_devices():
        key = accept_ra_key(dev)
        if inp.sysctls.get(key, "").strip() != "1":
            continue  # 2 accepts RAs anyway; 0: a daemon handles them, not the kernel
        fix = f"sysctl -w {key}=2, and put {key} = 2 in a file in /etc/sysctl.d/ to keep it"
        if on:
            yield Finding("accept-ra-forwarding", "warning", None, key,
                          f"IPv6 forwarding is on, so the kernel ignores router advertisements "
                          f"on {dev} ({key}=1): the IPv6 default route learned there is not "
                          "renewed and the host loses IPv6 when it expires", fix)
        else:
            yield Finding("accept-ra-forwarding", "error", nets[0] if len(nets) == 1 else None,
                          key, f"{', '.join(nets)} need IPv6 forwarding, which kvmnetd leaves "
                          f"off: with it on, the kernel would ignore router advertisements on "
                          f"{dev} ({key}=1) and the host would lose its IPv6 default route",
                          fix)


def check_uplink(inp: DoctorInput) -> Iterable[Finding]:
    obs = inp.observed
    for net in inp.networks:
        if net.uplink is None or net.mode is Mode.ISOLATED:
            continue
        link = obs.link(net.uplink)
        if link is None or not link.up:
            state = "does not exist" if link is None else "is down"
            yield Finding("uplink-missing", "error", net.name, net.uplink,
                          f"uplink {net.uplink} of {net.name} {state}",
                          f"ip link set {net.uplink} up, or change uplink in the network's "
                          "config to the host's real outgoing interface")
    for fam in (4, 6):
        nats = [n.name for n in inp.networks if n.mode is Mode.NAT and fam in _families(n)]
        if nats and not any(r.dst.version == fam and r.dst.prefixlen == 0 for r in obs.routes):
            yield Finding("host-no-default-route", "warning", None, f"IPv{fam} default route",
                          f"the host has no IPv{fam} default route, so {', '.join(nats)} "
                          "cannot reach beyond the host's own subnets",
                          f"ip -{fam} route add default via ROUTER (or fix the host's network "
                          "configuration)")


# ---- firewalls -------------------------------------------------------------------------------


def _accept_fix(drop: ForwardDrop, br: str, intra: bool) -> str:
    if drop.table == "firewalld":
        return f"firewall-cmd --zone=kvmnetd --add-interface={br} (add --permanent to keep it)"
    if drop.iptables:
        tool = "iptables" if drop.family == "ip" else "ip6tables"
        chain = drop.iptables_chain
        if intra:
            rules = f"{tool} -I {chain} -i {br} -o {br} -j ACCEPT"
        else:
            rules = (f"{tool} -I {chain} -i {br} -j ACCEPT; {tool} -I {chain} -o {br} -m "
                     "conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT")
    else:
        at = f"nft insert rule {drop.family} {drop.table} {drop.chain}"
        rules = (f'{at} iifname "{br}" oifname "{br}" accept' if intra else
                 f'{at} iifname "{br}" accept; {at} oifname "{br}" ct state '
                 "established,related accept")
    return f"{COEXISTENCE_HINT}, or add accept rules there: {rules}"


def check_forward_drops(inp: DoctorInput) -> Iterable[Finding]:
    drops = [d for d in forward_drops(inp.ruleset) if not d.ours(inp.table)]
    for net in inp.networks:
        fams = set(_families(net))
        for drop in drops:
            if not (drop.families & fams) or bridge_allowed(inp.ruleset, drop, net.bridge):
                continue
            where = f"table {drop.family} {drop.table} chain {drop.chain}"
            if net.forwards:
                yield Finding("foreign-forward-drop", "error", net.name, where,
                              f"guests' forwarded traffic on {net.bridge} is dropped by {where} "
                              f"({drop.how})", _accept_fix(drop, net.bridge, intra=False))
            elif any(inp.sysctls.get(BRNF[f], "0").strip() == "1" for f in drop.families & fams):
                # br_netfilter passes bridge-local frames through the forward hook too.
                what = "guests and the LAN" if net.mode is Mode.BRIDGED else "guests"
                yield Finding("br-netfilter", "warning", net.name, where,
                              f"bridge-nf-call-iptables=1 sends traffic between {what} on "
                              f"{net.bridge} through the forward hook, where {where} drops it "
                              f"({drop.how})",
                              _accept_fix(drop, net.bridge, intra=True) + "; or sysctl -w "
                              "net.bridge.bridge-nf-call-iptables=0 (for every bridge)")


def check_input_drops(inp: DoctorInput) -> Iterable[Finding]:
    """Guests' DHCP/DNS/TFTP requests to the host, dropped by another table's input chain."""
    if not inp.ruleset.get("nftables"):
        return
    for net in inp.networks:
        services = services_of(net)
        if not services:
            continue
        zone = (inp.firewalld_zones or {}).get(net.bridge) or None
        for block in input_blocks(inp.ruleset, net.bridge, services, inp.table):
            what = ", ".join(s.label for s in block.services)
            yield Finding("foreign-input-drop", "error", net.name, block.where,
                          f"{what} from guests on {net.bridge} is dropped by {block.where} "
                          f"({block.how}), so guests get no "
                          f"{' or '.join(s.name for s in block.services)} from the host",
                          accept_fix(block, net.bridge, zone))


def check_our_table(inp: DoctorInput) -> Iterable[Finding]:
    needs = [n.name for n in inp.networks if n.mode is not Mode.BRIDGED]
    if needs and inp.ruleset.get("nftables") and not has_table(inp.ruleset, inp.table):
        yield Finding("firewall-table-missing", "error", None, f"table inet {inp.table}",
                      f"kvmnetd's nftables table inet {inp.table} is missing, so "
                      f"{', '.join(needs)} get no NAT or filtering",
                      "kvmnetctl reload (the table is written again); if it vanishes again, "
                      "look for a service that flushes the whole ruleset")


def check_firewalld(inp: DoctorInput) -> Iterable[Finding]:
    if not inp.firewalld_running or not inp.networks:
        return
    if inp.firewalld_zones is None:
        yield Finding("firewalld-unknown", "info", None, "firewalld",
                      "firewalld is running but did not say which zones our bridges are in",
                      "firewall-cmd --get-zone-of-interface=BRIDGE for each bridge")
        return
    for net in inp.networks:
        br = net.bridge
        zone = inp.firewalld_zones.get(br, "")
        fix = f"firewall-cmd --zone=kvmnetd --add-interface={br} (add --permanent to keep it)"
        if not zone:
            yield Finding("firewalld-zone-missing", "warning", net.name, br,
                          f"firewalld runs but {br} is in no zone, so the default zone's "
                          "rules (usually rejecting DHCP/DNS from guests) apply", fix)
        elif zone in CLOSED_ZONES:
            yield Finding("firewalld-zone-blocks", "error", net.name, br,
                          f"{br} is in firewalld zone {zone}, which drops guests' DHCP/DNS", fix)
        elif zone not in OPEN_ZONES:
            yield Finding("firewalld-zone-blocks", "warning", net.name, br,
                          f"{br} is in firewalld zone {zone}, which may not allow DHCP/DNS "
                          "from guests", fix)


# ---- addresses, bridges, guests --------------------------------------------------------------


def check_overlaps(inp: DoctorInput) -> Iterable[Finding]:
    obs = inp.observed
    devices = {n.bridge for n in inp.networks} | {n.uplink for n in inp.networks if n.uplink}
    ours = {lk.index for d in devices if (lk := obs.link(d)) is not None}
    for net in inp.networks:
        for iface in (net.ipv4, net.ipv6):
            if iface is None:
                continue
            for r in inp.host_routes:
                if r.oif in ours or r.dst.prefixlen == 0 or r.dst.version != iface.version:
                    continue
                if not r.dst.overlaps(iface.network):
                    continue
                dev = obs.name_of(r.oif) or "?"
                how = f"dev {dev}" if r.gateway is None else f"via {r.gateway} dev {dev}"
                yield Finding("subnet-overlaps-host-route", "error", net.name,
                              f"{r.dst} {how}",
                              f"{net.name}'s subnet {iface.network} overlaps the host's route "
                              f"{r.dst} {how}, so replies may leave the wrong way",
                              f"give {net.name} a free subnet in its config, or remove the "
                              f"route: ip route del {r.dst} {how}")


def check_bridges(inp: DoctorInput) -> Iterable[Finding]:
    obs = inp.observed
    # Degraded by a host route: not brought up, on purpose (check_overlaps says why).
    failed = {s.name for s in inp.statuses if s.state in ("failed", "degraded")}
    for net in inp.networks:
        br = obs.link(net.bridge)
        if br is None:
            if net.name not in failed:
                yield Finding("bridge-missing", "error", net.name, net.bridge,
                              f"bridge {net.bridge} of active network {net.name} does not exist",
                              f"kvmnetctl network start {net.name}; the daemon log says why "
                              "it could not create it")
            continue
        if not br.up:
            yield Finding("bridge-down", "warning", net.name, net.bridge,
                          f"bridge {net.bridge} is down", f"ip link set {net.bridge} up")
        guests = [p for p in _ports_of(obs, br) if p.name != net.uplink]
        if not guests:
            yield Finding("bridge-no-ports", "info", net.name, net.bridge,
                          f"no guest is attached to {net.bridge} (a bridge without ports has "
                          "no carrier)",
                          f"start the guest with its NIC on bridge {net.bridge}, or "
                          f"kvmnetctl port attach TAP {net.name}")
        elif not any(p.up for p in _ports_of(obs, br)):
            names = ", ".join(p.name for p in guests)
            yield Finding("bridge-no-carrier", "warning", net.name, net.bridge,
                          f"every port of {net.bridge} is down ({names}), so it has no carrier "
                          "and guests are not really attached",
                          f"start the guest, or ip link set {guests[0].name} up")
        for port, netname in sorted(inp.ports.items()):
            link = obs.link(port)
            if netname == net.name and link is not None and link.master != br.index:
                where = obs.name_of(link.master) or "no bridge"
                yield Finding("port-not-on-bridge", "warning", net.name, port,
                              f"{port} should be a port of {net.bridge} but is on {where}",
                              f"kvmnetctl port attach {port} {net.name}; the daemon log says "
                              "why it did not stick")


def check_leases(inp: DoctorInput) -> Iterable[Finding]:
    obs = inp.observed
    for net in inp.networks:
        br = obs.link(net.bridge)
        if net.dhcp is None or net.ipv4 is None or br is None:
            continue
        leased = {lease.mac.lower() for lease in inp.leases.get(net.name, [])}
        for port in _ports_of(obs, br):
            macs = [m.lower() for m in inp.learned.get(port.name, ())]
            if port.name == net.uplink or not macs or leased.intersection(macs):
                continue
            yield Finding("guest-without-lease", "warning", net.name, port.name,
                          f"the guest behind {port.name} ({', '.join(macs)}) sends traffic but "
                          f"has no DHCP lease on {net.name}",
                          "check the guest's DHCP client (e.g. `networkctl status` or "
                          f"`dhclient -v` in the guest); watch it with: tcpdump -ni {net.bridge} "
                          "port 67 or port 68")


def check_problems(inp: DoctorInput) -> Iterable[Finding]:
    for problem in inp.problems:
        yield Finding("doctor-incomplete", "info", None, "doctor", problem,
                      "run kvmnetd as root with nft and iproute2 installed for a full check")


CHECKS = (check_status, check_foreign_listeners, check_forwarding, check_accept_ra, check_uplink,
          check_forward_drops, check_input_drops, check_our_table, check_firewalld,
          check_overlaps, check_bridges, check_leases, check_problems)


def run_checks(inp: DoctorInput) -> list[Finding]:
    out: list[Finding] = []
    for check in CHECKS:
        out.extend(check(inp))
    return sorted(out, key=lambda f: (SEVERITIES.index(f.severity), f.network or "", f.check))


def render_text(findings: Sequence[Finding]) -> str:
    if not findings:
        return "no problems found\n"
    blocks = []
    for f in findings:
        where = f"{f.network}: " if f.network else ""
        blocks.append(f"{f.severity} [{f.check}] {where}{f.subject}\n"
                      f"  {f.message}\n  fix: {f.fix}\n")
    return "\n".join(blocks)


async def doctor(networks: list[Network], observed: ObservedState, ports: dict[str, str],
                 leases: dict[str, list[Lease]], statuses: Sequence[NetworkStatus] = (),
                 table: str = "kvmnetd", **probe_options: Any) -> list[Finding]:
    """Read the system (in the calling thread's namespace) and run every check."""
    inp = await probe(networks, observed, ports, leases, statuses, table=table, **probe_options)
    return run_checks(inp)
