"""What `kvmnetctl doctor` reads: one snapshot of the system, taken in the calling thread's
network namespace (nft and bridge run as its children, /proc/sys and sock_diag are per namespace).

Also the reading of `nft -j list ruleset` (which base chains drop forwarded traffic, and what
lets a bridge through them); that part is pure so the checks can use it on hand-built input.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from ..model import Network, Settings
from ..observed import ObservedState, Route
from ..render.dnsmasq import dnsmasq_paths
from ..status import Lease, NetworkStatus
from .conflicts import find_conflicts
from .nft_run import NftablesError, nft_json
from .sysctl import accept_ra, accept_ra_key

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


# ---- nftables ruleset (`nft -j list ruleset`) ------------------------------------------------

_FAMILIES = {"ip": frozenset({4}), "ip6": frozenset({6}), "inet": frozenset({4, 6})}
_HARMLESS = {"counter", "log"}  # expressions that neither match nor decide


@dataclass(frozen=True)
class ForwardDrop:
    """A base chain on the forward hook that drops whatever nothing before it accepted."""

    family: str
    table: str
    chain: str
    how: str
    has_docker_user: bool = False

    @property
    def families(self) -> frozenset[int]:
        return _FAMILIES[self.family]

    @property
    def iptables(self) -> bool:  # iptables-nft's own table: fix it with iptables
        return self.table == "filter" and self.chain == "FORWARD" and self.family != "inet"

    @property
    def iptables_chain(self) -> str:
        return "DOCKER-USER" if self.has_docker_user else "FORWARD"

    def ours(self, table: str) -> bool:
        return self.family == "inet" and self.table == table


def _objects(ruleset: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    items = ruleset.get("nftables", [])
    return [o[kind] for o in items if isinstance(o, dict) and isinstance(o.get(kind), dict)]


def has_table(ruleset: dict[str, Any], table: str) -> bool:
    return any(t.get("family") == "inet" and t.get("name") == table
               for t in _objects(ruleset, "table"))


def _rules(ruleset: dict[str, Any], family: str, table: str, chain: str) -> list[dict[str, Any]]:
    return [r for r in _objects(ruleset, "rule")
            if (r.get("family"), r.get("table"), r.get("chain")) == (family, table, chain)]


def forward_drops(ruleset: dict[str, Any]) -> list[ForwardDrop]:
    """Policy drop, or an unconditional drop/reject rule, in a forward base chain."""
    out: list[ForwardDrop] = []
    for c in _objects(ruleset, "chain"):
        fam, table, name = c.get("family"), c.get("table"), c.get("name")
        if c.get("hook") != "forward" or fam not in _FAMILIES or not table or not name:
            continue
        docker = any(o.get("name") == "DOCKER-USER" and o.get("table") == table
                     and o.get("family") == fam for o in _objects(ruleset, "chain"))
        hows = ["policy drop"] if c.get("policy") == "drop" else []
        for rule in _rules(ruleset, fam, table, name):
            keys = [k for e in rule.get("expr", []) if isinstance(e, dict) for k in e]
            if keys and keys[-1] in ("drop", "reject") and set(keys[:-1]) <= _HARMLESS:
                hows.append(f"rule handle {rule.get('handle')} drops everything")
        out.extend(ForwardDrop(fam, table, name, how, docker) for how in hows[:1])
    return out


def _iface_matches(rule: dict[str, Any]) -> list[tuple[str, Any]]:
    out = []
    for e in rule.get("expr", []):
        m = e.get("match") if isinstance(e, dict) else None
        left = m.get("left") if isinstance(m, dict) else None
        key = left.get("meta", {}).get("key") if isinstance(left, dict) else None
        if key in ("iifname", "oifname"):
            out.append((str(m.get("op", "==")), m.get("right")))  # type: ignore[union-attr]
    return out


def _names(right: Any, bridge: str) -> bool:
    values = right.get("set", []) if isinstance(right, dict) else right
    values = values if isinstance(values, list) else [values]
    return any(isinstance(v, str) and fnmatch.fnmatchcase(bridge, v.replace("\\", ""))
               for v in values)


def bridge_allowed(ruleset: dict[str, Any], drop: ForwardDrop, bridge: str) -> bool:
    """Does the dropping chain (or a chain it jumps to) let `bridge`'s traffic through first?

    Counted: kvmnetd's coexistence rules (comment "kvmnetd:...") for this bridge or for all
    interfaces, and any accept that matches the bridge by name. Order is not checked.
    """
    seen, todo = set(), [drop.chain]
    while todo:
        chain = todo.pop()
        if chain in seen:
            continue
        seen.add(chain)
        for rule in _rules(ruleset, drop.family, drop.table, chain):
            exprs = [e for e in rule.get("expr", []) if isinstance(e, dict)]
            for e in exprs:
                for verdict in ("jump", "goto"):
                    if isinstance(e.get(verdict), dict):
                        todo.append(str(e[verdict].get("target")))
            ifaces = _iface_matches(rule)
            named = any(op == "==" and _names(right, bridge) for op, right in ifaces)
            if str(rule.get("comment", "")).startswith("kvmnetd:") and (named or not ifaces):
                return True
            if named and any("accept" in e for e in exprs):
                return True
    return False


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
