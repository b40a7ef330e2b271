"""Configuration: read the TOML files, validate everything, return model objects.

All issues of all files are collected and raised together as one ConfigError,
each naming file, line and key, so one edit-and-retry round fixes them all.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from kvmnetd.config import schema as val
from kvmnetd.config.forwards import overlapping, reserved_problem
from kvmnetd.config.locate import FileCtx, Table, has_control, suggest
from kvmnetd.config.overlay import check_overlays, read_host_overlay
from kvmnetd.model.desired import AttachRule, Dhcp, DhcpRange, Dns, Mode, Network, Settings, Source
from kvmnetd.model.errors import ConfigError, ConfigIssue

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
TOP_KEYS = ("daemon", "network", "attach")
BUILTIN = "(built-in)"

# Where the built-in default network's /24 comes from, in this order: 10.80.0.0/13 is
# the top of 10/8 below Podman's 10.88.0.0/16 and its pools, outside every range in
# AVOIDED; 172.16.0.0/16 is below Docker's pools, for hosts that route all of 10/8.
DEFAULT_POOLS = (ipaddress.IPv4Network("10.80.0.0/13"), ipaddress.IPv4Network("172.16.0.0/16"))

# Ranges other software on a KVM host takes by default (docs/config.md has the table).
# Incus and LXD pick a random 10.x.y.0/24 (and fd42::/16 for IPv6): no range avoids
# that, the check against the host's routes does.
AVOIDED: tuple[tuple[str, str], ...] = (
    ("10.88.0.0/16", "Podman: its default network"),
    ("10.89.0.0/16", "Podman: subnet pools of `podman network create`, 10.89.0.0/24 upwards"),
    ("10.90.0.0/15", "Podman: subnet pools"),
    ("10.92.0.0/14", "Podman: subnet pools"),
    ("10.96.0.0/11", "Podman: subnet pools; Kubernetes services (10.96.0.0/12)"),
    ("10.128.0.0/9", "Podman: subnet pools, up to 10.255.255.0/24"),
    ("10.0.0.0/16", "Docker Swarm overlays (10.0.0.0/8 from 10.0.0.0/24 up), VirtualBox NAT "
                    "(10.0.2.0/24), LXC's lxcbr0 (10.0.3.0/24), home routers (10.0.0.0/24)"),
    ("10.42.0.0/15", "k3s: pods and services"),
    ("172.17.0.0/16", "Docker: docker0"),
    ("172.18.0.0/15", "Docker: default address pools (172.17-31.0.0/16)"),
    ("172.20.0.0/14", "Docker: default address pools"),
    ("172.24.0.0/13", "Docker: default address pools; OpenShift services (172.30.0.0/16)"),
    ("192.168.0.0/16", "Docker's last default pool (/20s), libvirt (192.168.122.0/24), "
                       "vagrant-libvirt (192.168.121.0/24), virt-manager's new networks "
                       "(192.168.100.0/24 up), VirtualBox host-only (192.168.56.0/24), "
                       "minikube (192.168.39.0/24, 192.168.49.0/24), home routers "
                       "(192.168.0.0/24, 192.168.1.0/24, 192.168.178.0/24, ...)"),
    ("100.64.0.0/10", "carrier-grade NAT: Tailscale and ISPs"),
)


def default_candidates() -> Iterator[ipaddress.IPv4Network]:
    """Every /24 the built-in default network may take, in the order they are tried."""
    for pool in DEFAULT_POOLS:
        yield from pool.subnets(new_prefix=24)


_OPTIONAL = ("bus_address", "libvirt_uri", "qemu_bridge_conf", "metrics_file")  # "" means None
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
DAEMON_CONV: dict[str, Callable[[str], str]] = {
    "run_dir": val.check_abs_path,
    "state_dir": val.check_abs_path,
    "networks_dir": val.check_abs_path,
    "bus_address": str,
    "firewall_table": val.check_nft_name,
    "dnsmasq_path": val.check_command,
    "dnsmasq_user": val.check_user,
    "libvirt_uri": str,
    "qemu_bridge_conf": lambda s: s and val.check_abs_path(s),
    "log_format": val.one_of("kv", "json", "journal"),
    "log_level": val.one_of("debug", "info", "warning", "error"),
    "coexist": val.one_of("auto", "off", "all"),
    "metrics_file": lambda s: s and val.check_abs_path(s),
}
_FLAGS = ("teardown_on_stop", "libvirt_networks")
DAEMON_KEYS = (*DAEMON_CONV, *_FLAGS)


@dataclass(frozen=True)
class Config:
    settings: Settings
    networks: dict[str, Network]
    rules: tuple[AttachRule, ...]
    files: tuple[str, ...]  # files read, for messages


# -- reading ----------------------------------------------------------------


class _Unreadable(Exception):
    pass


def _read(path: str, issues: list[ConfigIssue]) -> str | None:
    """File text; None if it does not exist. Other failures become issues."""
    try:
        # newline="": tomllib must see line ends as written; a lone CR is a TOML error.
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError as e:
        issues.append(ConfigIssue(path, 1, "(file)", f"not UTF-8: {e.reason}"))
    except OSError as e:
        issues.append(ConfigIssue(path, 1, "(file)", f"cannot read: {e.strerror or e}"))
    raise _Unreadable


_AT_LINE = re.compile(r"\s*\(at line (\d+), column \d+\)$")
_AT_END = re.compile(r"\s*\(at end of document\)$")


def _parse(text: str, file: str, issues: list[ConfigIssue]) -> tuple[dict[str, Any], FileCtx]:
    try:
        doc = tomllib.loads(text)
    except RecursionError:
        issues.append(ConfigIssue(file, 1, "(syntax)", "nested too deeply"))
        raise _Unreadable from None
    except ValueError as e:  # TOMLDecodeError, or an integer too long to convert
        msg = str(e)
        line = text.count("\n") + 1
        if m := _AT_LINE.search(msg):
            line = int(m.group(1))
        msg = _AT_END.sub("", _AT_LINE.sub("", msg))
        issues.append(ConfigIssue(file, line, "(syntax)", msg))
        raise _Unreadable from None
    return doc, FileCtx(file, text, issues)


def _network_files(directory: str, issues: list[ConfigIssue]) -> list[str]:
    try:
        names = [e.name for e in os.scandir(directory)
                 if e.name.endswith(".toml") and not e.name.startswith(".")]
    except FileNotFoundError:
        return []
    except OSError as e:
        issues.append(ConfigIssue(directory, 1, "(directory)",
                                  f"cannot list: {e.strerror or e}"))
        return []
    return [os.path.join(directory, n) for n in sorted(names)]


@dataclass
class _Found:
    networks: list[tuple[Network, FileCtx | None]]
    rules: list[tuple[AttachRule, FileCtx, int]]  # with its index in that file


def _read_doc(doc: dict[str, Any], ctx: FileCtx, found: _Found, main_file: str | None,
              settings: Settings) -> Settings:
    top = Table(ctx, (), doc, TOP_KEYS)
    daemon = top.table("daemon")
    if daemon is not None:
        if main_file is None:
            top.error("daemon", "[daemon] settings belong in the main configuration file")
        else:
            settings = read_daemon(ctx, daemon, settings)
    for name, data in (top.table("network") or {}).items():
        if isinstance(data, dict):
            found.networks.append((val.read_network(ctx, name, data), ctx))
        else:
            ctx.error(("network", name), "expected a table: [network.NAME]")
    for i, data in top.tables("attach"):
        rule = val.read_attach(ctx, i, data)
        if rule is not None:
            found.rules.append((rule, ctx, i))
    return settings


def read_daemon(ctx: FileCtx, data: dict[str, Any], base: Settings) -> Settings:
    t = Table(ctx, ("daemon",), data, (*DAEMON_KEYS, "overlay"))
    values: dict[str, Any] = {}
    overlay = t.table("overlay")
    if overlay is not None:
        values["overlay"] = read_host_overlay(ctx, overlay)
    for key, conv in DAEMON_CONV.items():
        if t.has(key):
            v = t.text(key, conv, None)
            if v is not None:
                values[key] = None if (v == "" and key in _OPTIONAL) else v
    for key in _FLAGS:
        if t.has(key):
            values[key] = t.flag(key, getattr(base, key))
    return replace(base, **values)


def apply_overrides(base: Settings, overrides: Mapping[str, str],
                    issues: list[ConfigIssue]) -> Settings:
    """Command-line values; issues name the file "(command line)" and line 0."""
    values: dict[str, Any] = {}
    for key, raw in overrides.items():
        def bad(msg: str, key: str = key) -> None:
            issues.append(ConfigIssue("(command line)", 0, key, msg))

        if key not in DAEMON_KEYS:
            bad(f"unknown setting{suggest(key, DAEMON_KEYS)}")
        elif has_control(raw):
            bad(f"{raw!r} contains a control character; refused")
        elif key in _FLAGS:
            if raw.lower() not in _TRUE + _FALSE:
                bad(f"{raw!r} is not a boolean (true/false)")
            values[key] = raw.lower() in _TRUE
        elif raw == "" and key in _OPTIONAL:
            values[key] = None
        else:
            try:
                values[key] = DAEMON_CONV[key](raw)
            except ValueError as e:
                bad(str(e))
    return replace(base, **values)


# -- checks across networks -----------------------------------------------


def _where(net: Network) -> str:
    src = net.source
    return f" ({src.file}:{src.line})" if src else ""


def _cross(decls: list[tuple[Network, FileCtx | None]]) -> None:
    """Conflicts between networks; reported on the later one of each pair.

    Host routes are not checked here: a route that overlaps one network is that
    network's trouble at run time (the planner's), never the whole file's.
    """
    for i, (net, ctx) in enumerate(decls):
        if ctx is None:
            continue
        path = ("network", net.name)

        def err(key: str, msg: str, path: tuple[str, str] = path,
                ctx: FileCtx = ctx) -> None:
            ctx.error((*path, key), msg)

        for other, _ in decls[:i]:
            for key in ("ipv4", "ipv6"):
                mine, theirs = getattr(net, key), getattr(other, key)
                if mine is not None and theirs is not None \
                        and mine.network.overlaps(theirs.network):
                    err(key, f"subnet {mine.network} overlaps {theirs.network} of network "
                             f"{other.name!r}{_where(other)}")
            if net.bridge == other.bridge:
                err("bridge", f"bridge {net.bridge!r} is already used by network "
                              f"{other.name!r}{_where(other)}")
            if net.bridge == other.uplink:
                err("bridge", f"{net.bridge!r} is the uplink of network "
                              f"{other.name!r}{_where(other)}")
            if net.uplink is not None and net.uplink == other.uplink:
                err("uplink", f"uplink {net.uplink!r} is already used by network "
                              f"{other.name!r}{_where(other)}")
            if net.uplink is not None and net.uplink == other.bridge:
                err("uplink", f"{net.uplink!r} is the bridge of network "
                              f"{other.name!r}{_where(other)}")


def _cross_forwards(decls: list[tuple[Network, FileCtx | None]]) -> None:
    """Forwards against other networks: the same port twice (reported on the later of the
    two), or one that another network's dnsmasq serves."""
    items = [(net.name, f) for net, _ in decls for f in net.port_forwards]
    owner = [(net, ctx) for net, ctx in decls for _ in net.port_forwards]
    for k, (name, other) in overlapping(items).items():
        net, ctx = owner[k]
        if ctx is not None and name != net.name:  # within one network: read_forwards'
            fwd = items[k][1]
            ctx.error(("network", net.name, "forward", fwd.index or 0, "port"),
                      f"{fwd.describe()} overlaps {other.describe()} of network {name}")
    for i, (net, ctx) in enumerate(decls):
        if ctx is None or not net.port_forwards:
            continue
        others = [n for j, (n, _) in enumerate(decls) if j != i]
        for fwd in net.port_forwards:
            if problem := reserved_problem(fwd, others):
                ctx.error(("network", net.name, "forward", fwd.index or 0, "port"), problem)


def _routes(host_routes: Iterable[IPNetwork]) -> list[IPNetwork]:
    # Default routes would overlap everything; they say nothing about local subnets.
    return [r for r in host_routes if r.prefixlen > 0]


# -- public API -------------------------------------------------------------


def load(config_file: str | None, networks_dir: str | None,
         host_routes: Iterable[IPNetwork] = (),
         overrides: dict[str, str] | None = None,
         default_subnet: ipaddress.IPv4Network | None = None) -> Config:
    """Read the main file and networks.d; raise ConfigError listing every issue.

    default_subnet: the built-in default network's subnet, chosen at an earlier start.
    host_routes only steer the choice of the built-in default network's subnet.
    """
    issues: list[ConfigIssue] = []
    routes = _routes(host_routes)
    main = config_file or Settings().config_file
    settings = Settings(config_file=main)
    found = _Found([], [])
    files: list[str] = []
    try:
        text = _read(main, issues)
        if text is not None:
            files.append(main)
            doc, ctx = _parse(text, main, issues)
            settings = _read_doc(doc, ctx, found, main, settings)
    except _Unreadable:
        files.append(main)
    settings = apply_overrides(settings, overrides or {}, issues)
    if networks_dir is not None:
        settings = replace(settings, networks_dir=networks_dir)
    for path in _network_files(settings.networks_dir, issues):
        try:
            text = _read(path, issues)
            if text is None:  # removed while listing
                continue
            files.append(path)
            doc, ctx = _parse(text, path, issues)
            _read_doc(doc, ctx, found, None, settings)
        except _Unreadable:
            files.append(path)

    networks: dict[str, Network] = {}
    decls: list[tuple[Network, FileCtx | None]] = []
    for net, nctx in found.networks:
        if net.name in networks and nctx is not None:
            nctx.error(("network", net.name), f"network {net.name!r} is already defined"
                                              f"{_where(networks[net.name])}")
            continue
        networks[net.name] = net
        decls.append((net, nctx))
    _cross(decls)
    _cross_forwards(decls)
    networks.update(check_overlays(decls, settings))
    rules: list[AttachRule] = []
    for rule, rctx, idx in found.rules:
        if rule.network not in networks:
            rctx.error(("attach", idx, "network"),
                       f"no network named {rule.network!r}{suggest(rule.network, networks)}")
        rules.append(rule)
    if not files:
        net = default_network(routes, default_subnet)
        networks[net.name] = net
    if issues:
        raise ConfigError(_ordered(issues, files))
    return Config(settings, networks, tuple(rules), tuple(files))


def _ordered(issues: list[ConfigIssue], files: list[str]) -> list[ConfigIssue]:
    """File by file in reading order, top to bottom within each."""
    order = {f: i for i, f in enumerate(files)}
    return sorted(issues, key=lambda i: (order.get(i.file, -1), i.line))


def parse_network_text(text: str, filename: str, existing: Config) -> Network:
    """One [network.NAME] table, checked like the loader does, also against `existing`.

    A network of the same name in `existing` is not a conflict: this may replace it.
    """
    issues: list[ConfigIssue] = []
    try:
        doc, ctx = _parse(text, filename, issues)
    except _Unreadable:
        raise ConfigError(issues) from None
    for key in doc:
        if key != "network":
            ctx.error((key,), "only a single [network.NAME] table is accepted here")
    tables = doc.get("network")
    if not isinstance(tables, dict) or len(tables) != 1:
        ctx.error(("network",), "expected exactly one [network.NAME] table")
        raise ConfigError(issues)
    ((name, data),) = tables.items()
    if not isinstance(data, dict):
        ctx.error(("network", name), "expected a table: [network.NAME]")
        raise ConfigError(issues)
    net = val.read_network(ctx, name, data)
    others: list[tuple[Network, FileCtx | None]] = [
        (n, None) for n in existing.networks.values() if n.name != name]
    _cross([*others, (net, ctx)])
    _cross_forwards([*others, (net, ctx)])
    filled = check_overlays([*others, (net, ctx)], existing.settings)
    if issues:
        raise ConfigError(_ordered(issues, [filename]))
    return filled.get(name, net)


def choose_default_subnet(host_routes: Iterable[IPNetwork] = ()) -> ipaddress.IPv4Network:
    """The first candidate /24 that overlaps no route of the host (default routes aside)."""
    taken = [r for r in _routes(host_routes) if r.version == 4]
    for subnet in default_candidates():
        if not any(subnet.overlaps(t) for t in taken):
            return subnet
    raise ConfigError([ConfigIssue(BUILTIN, 0, "network.default.ipv4",
                                   "every candidate subnet overlaps a host route; "
                                   "declare a network in the configuration")])


def default_network(host_routes: Iterable[IPNetwork] = (),
                    subnet: ipaddress.IPv4Network | None = None) -> Network:
    """The network used when no configuration exists: NAT with DHCP on a free /24.

    `subnet` is the one chosen at an earlier start: kept even where a route now
    overlaps it, so the network does not move under its guests.
    """
    if subnet is None:
        subnet = choose_default_subnet(host_routes)
    base = subnet.network_address
    return Network(
        name="default",
        mode=Mode.NAT,
        bridge="kvbr0",
        ipv4=ipaddress.IPv4Interface(f"{base + 1}/{subnet.prefixlen}"),
        dhcp=Dhcp(ranges=(DhcpRange(base + 2, subnet.broadcast_address - 1),)),
        dns=Dns(domain=None),
        source=Source(BUILTIN, 0),
    )
