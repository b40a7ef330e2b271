"""Value checks and a typed reader over one parsed TOML table.

Every check returns an error message (or raises ValueError with one) instead
of stopping, so the loader can report every issue of a file at once.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from kvmnetd.config.addresses import (
    IPAddress,
    parse_gateway4,
    parse_gateway6,
    parse_ip,
    parse_ipv4,
    parse_range,
)
from kvmnetd.config.dnsmasq_options import check_option
from kvmnetd.config.forwards import read_forwards
from kvmnetd.config.locate import FileCtx, Table, suggest
from kvmnetd.config.overlay import read_network_overlay
from kvmnetd.model.desired import (
    AttachRule,
    BootFiles,
    Dhcp,
    DhcpHost,
    DhcpHost6,
    DhcpRange,
    Dns,
    DnsHost,
    Mode,
    Network,
    ifname_problem,
    is_nft_name,
)
from kvmnetd.model.rate import NO_LIMIT, parse_rate

NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,32}")
USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
LEASE_RE = re.compile(r"([0-9]+)([smhdw]?)|infinite")
MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
MAC_GLOB_RE = re.compile(r"[0-9a-f:*?\[\]!-]{1,64}")
LABEL_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_LEASE_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MIN_LEASE = 120  # dnsmasq's own floor; shorter values are silently raised


def check_ifname(s: str) -> str:
    problem = ifname_problem(s)
    if problem is not None:
        raise ValueError(problem)
    return s


def check_network_name(s: str) -> str:
    if not NAME_RE.fullmatch(s):
        raise ValueError(f"network name {s!r} must be 1 to 32 of A-Z a-z 0-9 _ -")
    return s


def check_hostname(s: str, what: str = "host name") -> str:
    labels = s.split(".")
    if len(s) > 253 or not all(LABEL_RE.fullmatch(x) for x in labels):
        raise ValueError(
            f"{what} {s!r} is not valid: dot-separated labels of 1 to 63 letters, digits"
            " and '-', not starting or ending with '-', 253 characters at most"
        )
    return s


def check_dhcp_name(s: str) -> str:
    """A host name dnsmasq's dhcp-host reads as a name, not as a lease time or keyword."""
    if LEASE_RE.fullmatch(s) or s in ("ignore", "infinite"):
        raise ValueError(f"host name {s!r} would be read by dnsmasq as a lease time or keyword")
    return check_hostname(s)


def check_domain(s: str) -> str:
    return check_hostname(s, "domain")


def check_lease(s: str) -> str:
    m = LEASE_RE.fullmatch(s)
    if not m:
        raise ValueError(f"lease time {s!r} must be a number with optional unit s/m/h/d/w, "
                         "or 'infinite'")
    if m.group(1) is not None and int(m.group(1)) * _LEASE_UNIT[m.group(2)] < MIN_LEASE:
        raise ValueError(f"lease time {s!r} is shorter than {MIN_LEASE} s")
    return s


def check_mac(s: str) -> str:
    mac = s.lower().replace("-", ":")
    if not MAC_RE.fullmatch(mac):
        raise ValueError(f"{s!r} is not a MAC address (six hex octets like 52:54:00:12:34:56)")
    return mac


DUID_RE = re.compile(r"[0-9a-f]{1,2}(:[0-9a-f]{1,2})+")
MAX_DUID = 130  # octets: a 2-octet type and at most 128 more (RFC 8415)


def check_duid(s: str) -> str:
    """A DHCPv6 client DUID as hex octets separated by ':', written with two digits each."""
    duid = s.lower()
    if not DUID_RE.fullmatch(duid) or len(duid.split(":")) > MAX_DUID:
        raise ValueError(f"{s!r} is not a DUID (hex octets separated by ':', like "
                         "00:03:00:01:52:54:00:12:34:56)")
    return ":".join(octet.rjust(2, "0") for octet in duid.split(":"))


def check_mac_glob(s: str) -> str:
    mac = s.lower()
    if not MAC_GLOB_RE.fullmatch(mac):
        raise ValueError(f"{s!r} is not a MAC pattern (hex digits, ':', and * ? [ ] wildcards)")
    return mac


def check_glob(s: str) -> str:
    if not s or len(s) > 64 or "/" in s or any(c.isspace() for c in s):
        raise ValueError(f"pattern {s!r} must be 1 to 64 characters without '/' or spaces")
    return s


def check_user(s: str) -> str:
    if not USER_RE.fullmatch(s):
        raise ValueError(f"{s!r} is not a plain user or group name ([a-z_][a-z0-9_-]*)")
    return s


EVERY_USER = "*"


def check_allowed_user(s: str) -> str:
    """A user name, or "*": every user on the host."""
    return s if s == EVERY_USER else check_user(s)


def check_abs_path(s: str) -> str:
    if not s.startswith("/"):
        raise ValueError(f"{s!r} must be an absolute path")
    return s


def check_tftp_root(s: str) -> str:
    # dnsmasq reads a comma as the start of an interface list.
    if "," in s:
        raise ValueError(f"{s!r} may not contain ','")
    return check_abs_path(s)


# A name relative to the TFTP root, or a URL for iPXE; nothing dnsmasq would split on.
BOOT_FILE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./+:?=&%~-]{0,254}")


def check_boot_file(s: str) -> str:
    if not s or "," in s or any(c.isspace() for c in s):
        raise ValueError(f"boot file {s!r} may not be empty or contain spaces or ','")
    if not BOOT_FILE_RE.fullmatch(s):
        raise ValueError(f"boot file {s!r} must start with a letter, digit or '_' and hold "
                         "only letters, digits and _ . / + : ? = & % ~ -, 255 at most")
    return s


def check_command(s: str) -> str:
    if not s or ("/" in s and not s.startswith("/")) or any(c.isspace() for c in s):
        raise ValueError(f"{s!r} must be a command name or an absolute path, without spaces")
    return s


def check_nft_name(s: str) -> str:
    if not is_nft_name(s):
        raise ValueError(f"table name {s!r} must be 1 to 32 of A-Z a-z 0-9 _, starting "
                         "with a letter")
    return s


def parse_port_rate(s: str) -> int | None:
    """A network's default per-port limit: a rate such as "100mbit", or "none"."""
    return None if s.strip().lower() == NO_LIMIT else parse_rate(s)


def one_of(*choices: str) -> Callable[[str], str]:
    def check(s: str) -> str:
        if s not in choices:
            raise ValueError(f"{s!r} is not one of {', '.join(choices)}{suggest(s, choices)}")
        return s

    return check


NETWORK_KEYS = ("mode", "bridge", "ipv4", "ipv6", "uplink", "stp", "forward_delay", "mtu",
                "autostart", "host_access", "isolate_ports", "port_rate", "anti_spoofing",
                "allow_users", "allow_groups", "dhcp", "dns", "dnsmasq", "forward", "overlay")
DHCP_KEYS = ("ranges", "ranges6", "lease_time", "router", "ping_check", "tftp_root",
             "boot_file", "next_server", "ra", "dhcpv6", "host", "host6", "boot")
BOOT_KEYS = ("bios", "efi_x86_64", "efi_arm64", "ipxe")
DNSMASQ_KEYS = ("options",)
HOST_KEYS = ("mac", "ip", "name", "lease_time")
HOST6_KEYS = ("id", "ip", "name", "lease_time")
DNS_KEYS = ("enabled", "domain", "forwarders", "host")
DNS_HOST_KEYS = ("ip", "names")
ATTACH_KEYS = ("network", "ifname", "mac", "domain")
_MODES = one_of(*(m.value for m in Mode))


def _in_subnet(ip: IPAddress, iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface,
               what: str) -> None:
    net = iface.network
    if ip not in net:
        raise ValueError(f"{what} {ip} is outside the network's subnet {net}")
    if ip == iface.ip:
        raise ValueError(f"{what} {ip} is the gateway address")
    if isinstance(net, ipaddress.IPv4Network) and net.prefixlen <= 30 and ip in (
            net.network_address, net.broadcast_address):
        raise ValueError(f"{what} {ip} is the network or broadcast address of {net}")
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen <= 126 \
            and ip == net.network_address:
        raise ValueError(f"{what} {ip} is the subnet-router anycast address of {net}")


def _auto_ranges(gw: ipaddress.IPv4Interface) -> tuple[DhcpRange, ...]:
    """The whole host part of the subnet except the gateway."""
    net = gw.network
    lo, hi = net.network_address + 1, net.broadcast_address - 1
    if net.prefixlen >= 31:
        lo, hi = net.network_address, net.broadcast_address
    parts = [(lo, gw.ip - 1), (gw.ip + 1, hi)]
    return tuple(DhcpRange(a, b) for a, b in parts if lo <= a <= b <= hi)


def _ranges(t: Table, key: str, gw: ipaddress.IPv4Interface | ipaddress.IPv6Interface | None,
            version: int, gw_given: bool) -> tuple[DhcpRange, ...]:
    family = "ipv4" if version == 4 else "ipv6"

    def conv(s: str) -> DhcpRange:
        a, b = parse_range(s)
        if a.version != version:
            raise ValueError(f"{s!r} is an IPv{a.version} range; use "
                             f"{'ranges' if a.version == 4 else 'ranges6'}")
        if gw is None:
            raise ValueError(f"{family} of the network is {'invalid' if gw_given else 'unset'}")
        for ip in (a, b):
            _in_subnet(ip, gw, "range end")
        if a <= gw.ip <= b:  # type: ignore[operator]  # same family, checked above
            raise ValueError(f"range {s!r} contains the gateway {gw.ip}")
        return DhcpRange(a, b)

    out = t.texts(key, conv)
    for j, r in enumerate(out):
        for other in out[:j]:
            if r.start <= other.end and other.start <= r.end:  # type: ignore[operator]
                t.error((key, j), f"range {r.start}-{r.end} overlaps {other.start}-{other.end}")
    return out


def _hosts(t: Table, gw: ipaddress.IPv4Interface | None) -> tuple[DhcpHost, ...]:
    def conv_ip(s: str) -> ipaddress.IPv4Address:
        ip = parse_ipv4(s)
        if gw is None:
            raise ValueError("a static address needs ipv4 on the network")
        _in_subnet(ip, gw, "address")
        return ip

    hosts: list[DhcpHost] = []
    seen = _Seen()
    for i, data in t.tables("host"):
        h = Table(t.ctx, (*t.path, "host", i), data, HOST_KEYS)
        mac = h.text("mac", check_mac, None)
        ip = h.text("ip", conv_ip, None)
        name = h.text("name", check_dhcp_name, None)
        lease = h.text("lease_time", check_lease, None)
        if not h.has("mac") and not (h.has("name") and h.has("ip")):
            # dnsmasq matches a host by MAC, or by the host name its client sends.
            h.error((), "a host needs mac, or name and ip (a host by name)")
        seen.check(h, i, "mac", mac, f"MAC {mac}")
        seen.check(h, i, "ip", ip, f"address {ip}")
        seen.check(h, i, "name", name, f"name {name}")
        if mac is not None or (name is not None and ip is not None):
            hosts.append(DhcpHost(mac=mac, ip=ip, name=name, lease_time=lease))
    return tuple(hosts)


class _Seen:
    """Values already taken by an earlier host, per key: a second use is an error."""

    def __init__(self) -> None:
        self.by_key: dict[str, dict[object, int]] = {}

    def check(self, h: Table, index: int, key: str, value: object, what: str) -> None:
        if value is None:
            return
        seen = self.by_key.setdefault(key, {})
        if value in seen:
            h.error(key, f"{what} is already used by {h.path[-2]}[{seen[value]}]")
        else:
            seen[value] = index


def _hosts6(t: Table, gw: ipaddress.IPv6Interface | None,
            ranges6: tuple[DhcpRange, ...]) -> tuple[DhcpHost6, ...]:
    def conv_ip(s: str) -> ipaddress.IPv6Address:
        ip = ipaddress.ip_address(parse_ip(s))
        if not isinstance(ip, ipaddress.IPv6Address):
            raise ValueError(f"{s!r} is not an IPv6 address")
        if gw is None:
            raise ValueError("a static DHCPv6 address needs ipv6 on the network")
        _in_subnet(ip, gw, "address")
        return ip

    hosts: list[DhcpHost6] = []
    seen = _Seen()
    for i, data in t.tables("host6"):
        h = Table(t.ctx, (*t.path, "host6", i), data, HOST6_KEYS)
        duid = h.text("id", check_duid, None)
        ip = h.text("ip", conv_ip, None)
        name = h.text("name", check_dhcp_name, None)
        lease = h.text("lease_time", check_lease, None)
        if not (h.has("id") or h.has("name")):
            h.error((), "a DHCPv6 host needs id (the client's DUID) or name")
        if not h.has("ip"):
            h.error((), "a DHCPv6 host needs ip")
        seen.check(h, i, "id", duid, f"DUID {duid}")
        seen.check(h, i, "ip", ip, f"address {ip}")
        seen.check(h, i, "name", name, f"name {name}")
        if ip is not None and (duid is not None or name is not None):
            hosts.append(DhcpHost6(id=duid, ip=ip, name=name, lease_time=lease))
    if hosts and not ranges6:
        # dnsmasq only answers DHCPv6 on a subnet with a stateful range.
        t.error("host6", 'DHCPv6 hosts need dhcpv6 = "stateful" and ranges6')
    return tuple(hosts)


def _dhcp(t: Table, net: Table, v4: ipaddress.IPv4Interface | None,
          v6: ipaddress.IPv6Interface | None) -> Dhcp:
    if t.has("ranges"):
        ranges = _ranges(t, "ranges", v4, 4, net.has("ipv4"))
    else:
        ranges = _auto_ranges(v4) if v4 else ()
    ranges6 = _ranges(t, "ranges6", v6, 6, net.has("ipv6"))
    dhcpv6 = t.text("dhcpv6", one_of("off", "stateless", "stateful"), "off")
    if dhcpv6 != "off" and not net.has("ipv6"):
        t.error("dhcpv6", "DHCPv6 needs ipv6 on the network")
    elif dhcpv6 == "stateful" and not t.has("ranges6"):
        t.error("dhcpv6", "stateful DHCPv6 needs ranges6")
    if t.has("ranges6") and dhcpv6 != "stateful":
        t.error("ranges6", 'ranges6 are only used with dhcpv6 = "stateful"')
    return Dhcp(
        ranges=ranges,
        lease_time=t.text("lease_time", check_lease, "1h"),
        hosts=_hosts(t, v4),
        router=t.flag("router", False) if t.has("router") else None,
        ping_check=t.flag("ping_check", False),
        tftp_root=t.text("tftp_root", check_tftp_root, None),
        boot_file=t.text("boot_file", check_boot_file, None),
        next_server=t.text("next_server", parse_ipv4, None),
        boot=_boot(t),
        ra=t.flag("ra", True),
        dhcpv6=dhcpv6,
        ranges6=ranges6,
        hosts6=_hosts6(t, v6, ranges6 if dhcpv6 == "stateful" else ()),
    )


def _boot(dhcp: Table) -> BootFiles:
    sub = dhcp.table("boot")
    if sub is None:
        return BootFiles()
    t = Table(dhcp.ctx, (*dhcp.path, "boot"), sub, BOOT_KEYS)
    return BootFiles(**{key: t.text(key, check_boot_file, None) for key in BOOT_KEYS})


def _dnsmasq_options(net: Table) -> tuple[str, ...]:
    sub = net.table("dnsmasq")
    if sub is None:
        return ()
    return Table(net.ctx, (*net.path, "dnsmasq"), sub, DNSMASQ_KEYS).texts("options",
                                                                          check_option)


def _dns(t: Table) -> Dns:
    dns = Dns(enabled=t.flag("enabled", True), domain=t.text("domain", check_domain, None),
              forwarders=t.texts("forwarders", parse_ip), hosts=_dns_hosts(t))
    if dns.hosts and not dns.enabled:
        t.error("host", "DNS hosts need DNS: remove them or set enabled = true")
    return dns


def _dns_hosts(t: Table) -> tuple[DnsHost, ...]:
    hosts: list[DnsHost] = []
    for i, data in t.tables("host"):
        h = Table(t.ctx, (*t.path, "host", i), data, DNS_HOST_KEYS)
        ip = h.text("ip", lambda s: ipaddress.ip_address(parse_ip(s)), None)
        names = h.texts("names", check_hostname)
        if not h.has("ip"):
            h.error((), "ip is required: the address the names stand for")
        if not h.has("names"):
            h.error((), 'names is required: e.g. names = ["web", "www"]')
        elif "names" not in h.bad and not names:
            h.error("names", "give at least one name")
        if ip is not None and names:
            hosts.append(DnsHost(ip=ip, names=names))
    return tuple(hosts)


def read_network(ctx: FileCtx, name: str, data: dict[str, Any]) -> Network:
    """One [network.NAME] table. Issues go to ctx; the result is only trusted without them."""
    t = Table(ctx, ("network", name), data, NETWORK_KEYS)
    try:
        check_network_name(name)
    except ValueError as e:
        t.error((), str(e))
    mode = Mode(t.text("mode", _MODES, "nat"))
    bridge = t.text("bridge", check_ifname, f"kv-{name}")
    if not t.has("bridge") and len(bridge.encode()) > 15:
        t.error((), f"the default bridge name {bridge!r} is longer than 15 bytes; "
                    'set bridge = "..." explicitly')
    v4 = t.text("ipv4", parse_gateway4, None)
    v6 = t.text("ipv6", parse_gateway6, None)
    uplink = t.text("uplink", check_ifname, None)
    stp = t.flag("stp", False)
    if stp:
        delay = t.number("forward_delay", 2, 2, 30, ": with stp = true the kernel refuses a "
                         "forward delay under 2 s; use 2..30 or set stp = false")
    else:
        delay = t.number("forward_delay", 0, 0, 30)
    mtu = t.number("mtu", 0, 68, 65535) if t.has("mtu") else 0
    host_access = t.flag("host_access", False)
    anti_spoofing = t.flag("anti_spoofing", False)
    sub = t.table("dhcp")
    dhcp = _dhcp(Table(ctx, (*t.path, "dhcp"), sub, DHCP_KEYS), t, v4, v6) if sub is not None \
        else None
    sub = t.table("dns")
    dns = _dns(Table(ctx, (*t.path, "dns"), sub, DNS_KEYS)) if sub is not None else Dns()
    options = _dnsmasq_options(t)
    overlay = read_network_overlay(t)

    if "mode" not in t.bad:
        if mode != Mode.BRIDGED and not (t.has("ipv4") or t.has("ipv6")):
            t.error((), f"a {mode} network needs ipv4 or ipv6: the gateway address with "
                        'prefix, e.g. ipv4 = "10.0.0.254/24"')
        if mode == Mode.BRIDGED and not t.has("uplink"):
            t.error((), "a bridged network needs uplink: the physical interface to enslave")
        if mode == Mode.BRIDGED and dhcp is not None:
            t.error("dhcp", "a bridged network would answer DHCP on the physical LAN; "
                            "remove the dhcp table")
        if mode == Mode.ISOLATED and t.has("uplink"):
            t.error("uplink", "an isolated network has no uplink; remove it or use "
                              "mode = nat or routed")
        if mode == Mode.BRIDGED and anti_spoofing:
            t.error("anti_spoofing", "a bridged network's guests get their addresses from the "
                                     "LAN, which kvmnetd does not see; anti_spoofing needs "
                                     "mode = nat, routed or isolated")
        if mode != Mode.ISOLATED and host_access:
            t.error("host_access", "host_access only applies to isolated networks")
        # The same rule as Network.needs_dnsmasq: options for a dnsmasq that never runs.
        if t.has("dnsmasq") and dhcp is None and not (dns.enabled and t.has("ipv4")):
            t.error("dnsmasq", "no dnsmasq runs for this network (no dhcp table, and DNS is "
                               "off or there is no ipv4); remove the dnsmasq table")
        if dns.hosts and dhcp is None and not t.has("ipv4"):
            t.error("dns", "DNS hosts are answered by dnsmasq, which runs for this network "
                           "only with ipv4 or a dhcp table")
    if uplink is not None and uplink == bridge:
        t.error("uplink", f"the uplink {uplink!r} is the network's own bridge")
    if mtu and v6 is not None and mtu < 1280:
        t.error("mtu", f"IPv6 needs an MTU of at least 1280, not {mtu}")
    net = Network(
        name=name, mode=mode, bridge=bridge, ipv4=v4, ipv6=v6, uplink=uplink, stp=stp,
        forward_delay=delay, mtu=mtu or None, autostart=t.flag("autostart", True),
        host_access=host_access, isolate_ports=t.flag("isolate_ports", False),
        port_rate=t.text("port_rate", parse_port_rate, None), anti_spoofing=anti_spoofing,
        dhcp=dhcp, dns=dns, dnsmasq_options=options, overlay=overlay,
        allow_users=t.texts("allow_users", check_allowed_user),
        allow_groups=t.texts("allow_groups", check_user),
        source=ctx.source(t.path),
    )
    if t.has("forward"):
        net = replace(net, port_forwards=read_forwards(t, net))
    return net


def read_attach(ctx: FileCtx, index: int, data: dict[str, Any]) -> AttachRule | None:
    t = Table(ctx, ("attach", index), data, ATTACH_KEYS)
    network = t.text("network", check_network_name, None)
    if not t.has("network"):
        t.error((), "network is required")
    if not (t.has("ifname") or t.has("mac") or t.has("domain")):
        t.error((), "a rule needs at least one of ifname, mac, domain")
    rule = AttachRule(
        network=network or "",
        ifname=t.text("ifname", check_glob, None),
        mac=t.text("mac", check_mac_glob, None),
        domain=t.text("domain", _nonempty, None),
        source=ctx.source(t.path),
    )
    return rule if network else None


def _nonempty(s: str) -> str:
    if not s:
        raise ValueError("may not be empty")
    return s
