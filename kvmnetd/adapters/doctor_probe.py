"""What `kvmnetctl doctor` reads: one snapshot of the system, taken in the calling thread's
network namespace (nft and bridge run as its children, /proc/sys and sock_diag are per namespace).

Also the reading of `nft -j list ruleset` (which base chains drop forwarded traffic, and what
lets a bridge through them); that part is pure so the checks can use it on hand-built input.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from kvmnetd.adapters.dnsmasq.conflicts import find_conflicts
from kvmnetd.adapters.nft_run import NftablesError, nft_json
from kvmnetd.adapters.sysctl import accept_ra, accept_ra_key
from kvmnetd.model.desired import Network, Settings
from kvmnetd.model.observed import ObservedState, Route
from kvmnetd.model.records import Lease, NetworkStatus
from kvmnetd.plan.dnsmasq import dnsmasq_paths

V4_FORWARD, V6_FORWARD = "net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"
BRNF = {4: "net.bridge.bridge-nf-call-iptables", 6: "net.bridge.bridge-nf-call-ip6tables"}
FIREWALLD = "org.fedoraproject.FirewallD1"
CMD_TIMEOUT = 5.0


@dataclass(frozen=True)
class ForeignListener:
    """A process outside kvmnetd that takes DHCP/DNS packets meant for a network."""

    network: str
    pid: int
    cmdline: str
    why: str


@dataclass(frozen=True)
class DoctorInput:
    networks: list[Network]  # active networks
    observed: ObservedState
    statuses: list[NetworkStatus] = field(default_factory=list)
    sysctls: dict[str, str] = field(default_factory=dict)
    ruleset: dict[str, Any] = field(default_factory=dict)  # `nft -j list ruleset`; {}: unread
    listeners: list[ForeignListener] = field(default_factory=list)
    leases: dict[str, list[Lease]] = field(default_factory=dict)
    ports: dict[str, str] = field(default_factory=dict)  # requested port -> network
    learned: dict[str, tuple[str, ...]] = field(default_factory=dict)  # port -> guest MACs (FDB)
    firewalld_running: bool = False
    firewalld_zones: dict[str, str] | None = None  # interface -> zone ("" = none)
    host_routes: list[Route] = field(default_factory=list)
    table: str = "kvmnetd"
    problems: list[str] = field(default_factory=list)  # what the probe could not read


# ---- reading the system ----------------------------------------------------------------------


def forwarding_key(dev: str) -> str:
    """sysctl's name for a device's IPv4 forwarding switch (a dot in the name becomes '/')."""
    return f"net.ipv4.conf.{dev.replace('.', '/')}.forwarding"


def _sysctl_paths(networks: Iterable[Network]) -> dict[str, str]:
    # Built per key, not from it: bridge names may contain dots.
    paths = {V4_FORWARD: "/proc/sys/net/ipv4/ip_forward",
             V6_FORWARD: "/proc/sys/net/ipv6/conf/all/forwarding",
             BRNF[4]: "/proc/sys/net/bridge/bridge-nf-call-iptables",
             BRNF[6]: "/proc/sys/net/bridge/bridge-nf-call-ip6tables"}
    for net in networks:
        for dev in filter(None, (net.bridge, net.uplink)):
            paths[forwarding_key(dev)] = f"/proc/sys/net/ipv4/conf/{dev}/forwarding"
    return paths


def read_sysctls(networks: Iterable[Network], ra_devices: Iterable[str] = ()) -> dict[str, str]:
    out = {}
    for key, path in _sysctl_paths(networks).items():
        with contextlib.suppress(OSError):
            with open(path) as f:
                out[key] = f.read().strip()
    for dev in ra_devices:
        if (value := accept_ra(dev)) is not None:
            out[accept_ra_key(dev)] = str(value)
    return out


async def run_json(*argv: str) -> Any:
    """Run a command (argv, no shell) and parse its JSON output; OSError/ValueError on failure."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CMD_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise OSError(f"{argv[0]} did not answer within {CMD_TIMEOUT:g}s") from None
    if proc.returncode != 0:
        raise OSError(f"{' '.join(argv)} failed: {err.decode(errors='replace').strip()}")
    return json.loads(out.decode() or "null")


def learned_macs(entries: Any) -> dict[str, tuple[str, ...]]:
    """`bridge -j fdb show br BR` -> port -> MACs the bridge learned there (the guests')."""
    out: dict[str, list[str]] = {}
    for e in entries if isinstance(entries, list) else []:
        mac = str(e.get("mac", "")).lower()
        if (not e.get("master") or e.get("state") in ("permanent", "static")
                or "self" in e.get("flags", []) or not mac or int(mac[:2], 16) & 1):
            continue  # the ports' own addresses, multicast, and entries kept by the device
        out.setdefault(str(e.get("ifname")), []).append(mac)
    return {port: tuple(macs) for port, macs in out.items()}


async def firewalld_zones(bridges: Sequence[str], bus_address: str | None,
                          timeout: float = 2.0) -> tuple[bool, dict[str, str] | None]:
    """(running, interface -> zone) from firewalld on the system bus; (False, None): no bus."""
    try:
        bus = await asyncio.wait_for(
            MessageBus(bus_address=bus_address, bus_type=BusType.SYSTEM).connect(), timeout)
    except Exception:  # no system bus, or it refused us: nothing to ask, not an error
        return False, None
    try:
        async def call(dest: str, path: str, iface: str, member: str, arg: str) -> Any:
            msg = Message(destination=dest, path=path, interface=iface, member=member,
                          signature="s", body=[arg])
            reply = await asyncio.wait_for(bus.call(msg), timeout)
            if reply.message_type == MessageType.ERROR:
                raise OSError(f"{member}: {reply.error_name} {reply.body}")
            return reply.body[0]

        owned = await call("org.freedesktop.DBus", "/org/freedesktop/DBus",
                           "org.freedesktop.DBus", "NameHasOwner", FIREWALLD)
        if not owned:
            return False, None
        try:
            zones = {br: str(await call(FIREWALLD, "/org/fedoraproject/FirewallD1",
                                        f"{FIREWALLD}.zone", "getZoneOfInterface", br))
                     for br in bridges}
        except (OSError, TimeoutError):
            return True, None
        return True, zones
    except Exception:  # the doctor reports; a flaky bus must not make it fail
        return False, None
    finally:
        bus.disconnect()


async def probe(networks: list[Network], observed: ObservedState, ports: dict[str, str],
                leases: dict[str, list[Lease]], statuses: Sequence[NetworkStatus] = (),
                table: str = "kvmnetd", *, our_pids: Iterable[int] = (),
                settings: Settings | None = None, bus_address: str | None = None,
                firewalld: bool = True) -> DoctorInput:
    problems: list[str] = []
    try:
        ruleset = await nft_json("list", "ruleset", timeout=CMD_TIMEOUT)
    except NftablesError as e:
        ruleset = {}
        problems.append(f"could not read the nftables ruleset: {e}")
    ours = set(our_pids) | {s.dhcp.pid for s in statuses if s.dhcp.pid is not None}
    listeners: list[ForeignListener] = []
    for net in networks:
        if not net.needs_dnsmasq:
            continue
        # Our dnsmasq runs our config file; that is how one adopted after a restart is known.
        conf = f"--conf-file={dnsmasq_paths(settings, net.name).conf}" if settings else None
        try:
            holders = find_conflicts(net, ours)
        except OSError as e:
            problems.append(f"could not list DHCP/DNS sockets for {net.bridge}: {e}")
            continue
        listeners += [ForeignListener(net.name, h.pid, h.cmdline, h.why) for h in holders
                      if conf is None or conf not in h.cmdline.split()]
    learned: dict[str, tuple[str, ...]] = {}
    for net in networks:
        if net.dhcp is None or observed.link(net.bridge) is None:
            continue
        try:
            learned.update(learned_macs(await run_json("bridge", "-j", "fdb", "show", "br",
                                                       net.bridge)))
        except (OSError, ValueError) as e:
            problems.append(f"could not read the forwarding database of {net.bridge}: {e}")
    running, zones = False, None
    if firewalld and networks:
        running, zones = await firewalld_zones([n.bridge for n in networks], bus_address)
    bridges = {lk.index for n in networks if (lk := observed.link(n.bridge)) is not None}
    host_routes = [r for r in observed.routes if r.oif not in bridges and r.dst.prefixlen > 0]
    return DoctorInput(
        networks=list(networks), observed=observed, statuses=list(statuses),
        sysctls=read_sysctls(networks, observed.ra_default_devices()),
        ruleset=ruleset if isinstance(ruleset, dict) else {},
        listeners=listeners, leases=leases, ports=dict(ports), learned=learned,
        firewalld_running=running, firewalld_zones=zones, host_routes=host_routes,
        table=table, problems=problems)
