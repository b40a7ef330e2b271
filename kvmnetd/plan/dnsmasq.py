"""dnsmasq configuration for one network. Pure: text in, text out, no I/O.

Every value is checked again here even though the config loader validated it:
whatever reaches these files is parsed by a root process, so a stray newline
or comma must never turn into an extra option.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import os.path
import re
from dataclasses import dataclass

from kvmnetd.config.dnsmasq_options import check_option
from kvmnetd.model.desired import BootFiles, Dhcp, Mode, Network, Settings, ifname_problem
from kvmnetd.model.errors import InvalidArgument
from kvmnetd.model.overlay import split_range

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,251}[A-Za-z0-9])?")
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
_DUID = re.compile(r"[0-9a-fA-F]{1,2}(:[0-9a-fA-F]{1,2}){1,129}")
_LEASE = re.compile(r"\d{1,9}[smhdw]?|infinite")
_USER = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./+:?=&%~-]{0,254}")

# Client architectures (DHCP option 93, RFC 4578 and IANA's registry) per boot file key,
# with the tag dnsmasq sets for them; the tags are documented for extra options.
_ARCH_TAGS = {
    "bios": ("bios", (0,)),
    "efi_x86_64": ("efi-x86_64", (7, 9)),  # 9 is what early firmware sent for x86-64
    "efi_arm64": ("efi-arm64", (11,)),
}


@dataclass(frozen=True)
class DnsmasqPaths:
    conf: str
    hosts: str
    pid: str
    digest: str
    leases: str
    user: str


def dnsmasq_paths(settings: Settings, network: str) -> DnsmasqPaths:
    check_name(network)
    run, state = settings.run_dir, settings.state_dir
    return DnsmasqPaths(
        conf=os.path.join(run, f"{network}.conf"),
        hosts=os.path.join(run, f"{network}.hosts"),
        pid=os.path.join(run, f"{network}.pid"),
        digest=os.path.join(run, f"{network}.digest"),
        leases=os.path.join(state, f"{network}.leases"),
        user=settings.dnsmasq_user,
    )


def _plain(value: str, what: str) -> str:
    """The rule for every string: no control characters, no option-looking start."""
    if not value:
        raise InvalidArgument(f"{what}: empty value")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise InvalidArgument(f"{what}: control characters are not allowed: {value!r}")
    if value.startswith("-"):
        raise InvalidArgument(f"{what}: must not start with '-': {value!r}")
    return value


def _ifname(value: str, what: str) -> str:
    _plain(value, what)
    problem = ifname_problem(value)
    if problem is not None:
        raise InvalidArgument(f"{what}: {problem}")
    return value


def _match(pattern: re.Pattern[str], value: str, what: str) -> str:
    _plain(value, what)
    if not pattern.fullmatch(value):
        raise InvalidArgument(f"{what}: invalid value {value!r}")
    return value


def _path(value: str, what: str) -> str:
    _plain(value, what)
    # A comma would start the next field of a dnsmasq option; blanks get trimmed.
    if not value.startswith("/") or "," in value or any(c.isspace() for c in value):
        raise InvalidArgument(f"{what}: must be an absolute path without commas or blanks: "
                              f"{value!r}")
    return value


def check_name(name: str) -> str:
    # Also a file name under run_dir and state_dir.
    return _match(_NAME, name, "network name")


def _forwarder(value: str) -> str:
    _plain(value, "dns forwarder")
    addr, _, port = value.partition("#")
    try:
        ipaddress.ip_address(addr)
    except ValueError:
        raise InvalidArgument(f"dns forwarder: not an IP address: {value!r}") from None
    if port and not (port.isdigit() and 0 < int(port) < 65536):
        raise InvalidArgument(f"dns forwarder: bad port: {value!r}")
    return value


def _check_paths(paths: DnsmasqPaths) -> None:
    for what in ("conf", "hosts", "pid", "leases"):
        _path(getattr(paths, what), f"{what} file")
    _match(_USER, paths.user, "dnsmasq user")


def _lease(value: str) -> str:
    return _match(_LEASE, value, "lease time")


def _router_off(net: Network, dhcp: Dhcp) -> bool:
    if dhcp.router is None:
        return net.mode is Mode.ISOLATED
    return not dhcp.router


def _dns_lines(net: Network) -> list[str]:
    dns = net.dns
    if not dns.enabled:
        return ["port=0"]
    out: list[str] = []
    if dns.forwarders:
        out.append("no-resolv")
        out += [f"server={_forwarder(f)}" for f in dns.forwarders]
    domain = None
    if dns.domain:
        domain = _match(_HOSTNAME, dns.domain, "dns domain")
        out += [f"domain={domain}", f"local=/{domain}/", "expand-hosts"]
    for host in dns.hosts:
        names = [_match(_HOSTNAME, n, "dns host name") for n in host.names]
        if not names:
            raise InvalidArgument(f"dns host {host.ip}: no names")
        if domain:
            # dnsmasq does not expand host-record names as it does a hosts file's; libvirt's
            # hosts answer in the domain too.
            names += [f"{n}.{domain}" for n in names if "." not in n]
        out.append(f"host-record={','.join(names)},{ipaddress.ip_address(host.ip)}")
    return out


def _dhcp4_lines(net: Network, dhcp: Dhcp, paths: DnsmasqPaths) -> list[str]:
    out: list[str] = []
    lease = _lease(dhcp.lease_time)
    if net.ipv4 is not None:
        mask = net.ipv4.network.netmask
        share = net.overlay.share if net.overlay is not None else (0, 1)
        for r in dhcp.ranges:
            if r.start.version != 4:
                continue
            # An overlay network: only this host's slice, so no address goes out twice.
            part = split_range(int(r.start), int(r.end), *share)
            if part is not None:
                first, last = (ipaddress.IPv4Address(a) for a in part)
                out.append(f"dhcp-range={first},{last},{mask},{lease}")
        if not out:
            # Static hosts only: DHCP on, nothing handed out dynamically.
            out.append(f"dhcp-range={net.ipv4.network.network_address},static,{mask},{lease}")
    out += [
        f"dhcp-leasefile={paths.leases}",
        f"dhcp-hostsfile={paths.hosts}",
        "dhcp-authoritative",
        "dhcp-no-override",
    ]
    if _router_off(net, dhcp):
        out.append("dhcp-option=3")
    if net.overlay is not None and net.mtu is not None:
        # The guests' MTU leaves room for VXLAN's headers on the underlay.
        out.append(f"dhcp-option=option:mtu,{int(net.mtu)}")
    if not net.dns.enabled:
        out.append("dhcp-option=6")
    if not dhcp.ping_check:
        # dnsmasq would ping each new address first, delaying every first lease
        # by ~3 s. Nobody else allocates from our range, and addresses of static
        # hosts are never offered to other clients, so the check buys nothing.
        out.append("no-ping")
    if dhcp.tftp_root:
        out += ["enable-tftp", f"tftp-root={_path(dhcp.tftp_root, 'tftp root')}"]
    out += _boot_lines(dhcp)
    return out


def _boot_lines(dhcp: Dhcp) -> list[str]:
    """dhcp-boot per client architecture, iPXE first, then the default boot_file.

    dnsmasq prefers a dhcp-boot whose tags all match over an untagged one; the tags
    here never match together, so the order of the lines does not matter to it.
    """
    server = f",,{dhcp.next_server}" if dhcp.next_server else ""
    boot: BootFiles = dhcp.boot
    out: list[str] = []
    not_ipxe = ""
    if boot.ipxe:
        # iPXE sends its own option 175 and the user class "iPXE".
        out += ["dhcp-match=set:ipxe,175", "dhcp-userclass=set:ipxe,iPXE",
                f"dhcp-boot=tag:ipxe,{_match(_FILE, boot.ipxe, 'boot file')}{server}"]
        not_ipxe = ",tag:!ipxe"
    for key, (tag, arches) in _ARCH_TAGS.items():
        name = getattr(boot, key)
        if name is None:
            continue
        out += [f"dhcp-match=set:{tag},option:client-arch,{a}" for a in arches]
        out.append(f"dhcp-boot=tag:{tag}{not_ipxe},{_match(_FILE, name, 'boot file')}{server}")
    if dhcp.boot_file:
        out.append(f"dhcp-boot={_match(_FILE, dhcp.boot_file, 'boot file')}{server}")
    return out


def _extra_lines(net: Network) -> list[str]:
    out: list[str] = []
    for option in net.dnsmasq_options:
        try:
            out.append(check_option(option))
        except ValueError as e:
            raise InvalidArgument(f"extra dnsmasq option: {e}") from None
    if out:
        out.insert(0, f"# extra options from [network.{net.name}.dnsmasq]")
    return out


def _ipv6_lines(net: Network, dhcp: Dhcp) -> list[str]:
    if net.ipv6 is None:
        return []
    bridge = net.bridge
    lease = _lease(dhcp.lease_time)
    out: list[str] = ["enable-ra"] if dhcp.ra else []
    if dhcp.ra and net.overlay is not None and net.mtu is not None:
        out.append(f"ra-param={bridge},mtu:{int(net.mtu)},600")
    if dhcp.dhcpv6 == "stateful":
        plen = net.ipv6.network.prefixlen
        ranges = [r for r in dhcp.ranges6 if r.start.version == 6]
        if not ranges:
            raise InvalidArgument(f"network {net.name}: dhcpv6 stateful needs ranges6")
        out += [f"dhcp-range={r.start},{r.end},{plen},{lease}" for r in ranges]
    elif dhcp.dhcpv6 == "stateless":
        mode = "ra-stateless" if dhcp.ra else "static"
        out.append(f"dhcp-range=::,constructor:{bridge},{mode},{lease}")
    elif dhcp.dhcpv6 == "off":
        if dhcp.ra:
            out.append(f"dhcp-range=::,constructor:{bridge},ra-only")
    else:
        raise InvalidArgument(f"network {net.name}: unknown dhcpv6 mode {dhcp.dhcpv6!r}")
    return out


def render_config(net: Network, paths: DnsmasqPaths) -> str:
    """The whole config file; static hosts live in the hosts file (see render_hosts)."""
    check_name(net.name)
    bridge = _ifname(net.bridge, "bridge")
    _check_paths(paths)
    lines = [
        f"# kvmnetd: network {net.name}; regenerated on every change.",
        # Empty: never pull in /etc/dnsmasq.conf or anything it includes.
        "conf-file=",
        "strict-order",
        "bind-interfaces",
        f"interface={bridge}",
        "except-interface=lo",
    ]
    if net.ipv4 is not None:
        lines.append(f"listen-address={net.ipv4.ip}")
    if net.ipv6 is not None:
        lines.append(f"listen-address={net.ipv6.ip}")
    lines += [f"pid-file={paths.pid}", f"user={paths.user}"]
    lines += _dns_lines(net)
    if net.dhcp is not None:
        lines += _dhcp4_lines(net, net.dhcp, paths)
        lines += _ipv6_lines(net, net.dhcp)
    # Last: kvmnetd's own options come first and cannot be changed by these.
    lines += _extra_lines(net)
    return "\n".join(lines) + "\n"


def render_hosts(net: Network) -> str:
    """dhcp-hostsfile lines `[mac|id:DUID],[ip|[ipv6]],name,leasetime`; re-read by dnsmasq
    on SIGHUP. A line without mac or id matches the host name the client sends."""
    if net.dhcp is None:
        return ""
    lines: list[str] = []
    for h in net.dhcp.hosts:
        fields = []
        if h.mac is not None:
            fields.append(_match(_MAC, h.mac, "dhcp host mac").lower())
        elif h.name is None or h.ip is None:
            raise InvalidArgument("dhcp host: needs a mac, or a name and an address")
        if h.ip is not None:
            fields.append(str(ipaddress.IPv4Address(h.ip)))
        if h.name is not None:
            fields.append(_match(_HOSTNAME, h.name, "dhcp host name"))
        if h.lease_time is not None:
            fields.append(_lease(h.lease_time))
        lines.append(",".join(fields))
    for h6 in net.dhcp.hosts6:
        fields = []
        if h6.id is not None:
            duid = _match(_DUID, h6.id, "dhcpv6 host id").lower()
            fields.append("id:" + ":".join(o.rjust(2, "0") for o in duid.split(":")))
        elif h6.name is None:
            raise InvalidArgument("dhcpv6 host: needs an id or a name")
        if h6.ip is None:
            raise InvalidArgument("dhcpv6 host: needs an address")
        fields.append(f"[{ipaddress.IPv6Address(h6.ip)}]")
        if h6.name is not None:
            fields.append(_match(_HOSTNAME, h6.name, "dhcpv6 host name"))
        if h6.lease_time is not None:
            fields.append(_lease(h6.lease_time))
        lines.append(",".join(fields))
    return "".join(line + "\n" for line in lines)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def config_digest(net: Network, paths: DnsmasqPaths | None = None) -> tuple[str, str]:
    """(restart, reload): a changed restart digest needs a new process, a changed
    reload digest only a rewritten hosts file and SIGHUP (leases stay)."""
    if paths is None:
        paths = dnsmasq_paths(Settings(), net.name)
    return _config_digest(net, paths)


@functools.lru_cache(maxsize=256)
def _config_digest(net: Network, paths: DnsmasqPaths) -> tuple[str, str]:
    # Every pass asks again for unchanged, frozen networks: render once per change.
    return _sha(render_config(net, paths)), _sha(render_hosts(net))
