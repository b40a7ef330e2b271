"""Desired state: what the operator declared. Plain frozen data, no I/O."""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field

from kvmnetd.model.forward import Forward
from kvmnetd.model.guard import PortIdentity
from kvmnetd.model.overlay import HostOverlay, NetworkOverlay
from kvmnetd.model.policy import AttachPolicy

IPv4Interface = ipaddress.IPv4Interface
IPv6Interface = ipaddress.IPv6Interface


class Mode(enum.StrEnum):
    NAT = "nat"
    ISOLATED = "isolated"
    ROUTED = "routed"
    BRIDGED = "bridged"


@dataclass(frozen=True)
class Source:
    """Where a value was declared, so errors can name file and line."""

    file: str
    line: int


@dataclass(frozen=True)
class DhcpRange:
    start: ipaddress.IPv4Address | ipaddress.IPv6Address
    end: ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class DhcpHost:
    # By MAC, or by the host name the client sends (then ip is set): dnsmasq matches either.
    mac: str | None = None  # lower case, colon separated
    ip: ipaddress.IPv4Address | None = None
    name: str | None = None
    lease_time: str | None = None  # dnsmasq syntax: "1h", "30m", "infinite"


@dataclass(frozen=True)
class DhcpHost6:
    """A DHCPv6 host by client DUID (id), by the name it sends, or both."""

    id: str | None = None  # DUID, lower-case hex octets separated by ':'
    ip: ipaddress.IPv6Address | None = None
    name: str | None = None
    lease_time: str | None = None


@dataclass(frozen=True)
class BootFiles:
    """Boot files by client architecture (DHCP option 93) and for iPXE itself.

    A client that matches none of them gets Dhcp.boot_file.
    """

    bios: str | None = None  # client-arch 0: x86 BIOS PXE
    efi_x86_64: str | None = None  # client-arch 7 and 9: x86-64 UEFI
    efi_arm64: str | None = None  # client-arch 11: arm64 UEFI
    # iPXE asking again after being chain-loaded, whatever its architecture: without
    # this, iPXE would be handed itself and load in a loop.
    ipxe: str | None = None

    def items(self) -> list[tuple[str, str]]:
        names = ("bios", "efi_x86_64", "efi_arm64", "ipxe")
        return [(n, v) for n in names if (v := getattr(self, n)) is not None]


@dataclass(frozen=True)
class Dhcp:
    ranges: tuple[DhcpRange, ...] = ()
    lease_time: str = "1h"
    hosts: tuple[DhcpHost, ...] = ()
    # None: the mode decides (isolated networks hand out no default route).
    router: bool | None = None
    # dnsmasq pings an address before offering it; off by default because it
    # delays every first lease by ~3 s and the range is ours alone.
    ping_check: bool = False
    tftp_root: str | None = None
    boot_file: str | None = None
    next_server: ipaddress.IPv4Address | None = None
    boot: BootFiles = field(default_factory=BootFiles)
    ra: bool = True
    dhcpv6: str = "off"  # off | stateless | stateful
    ranges6: tuple[DhcpRange, ...] = ()
    hosts6: tuple[DhcpHost6, ...] = ()


@dataclass(frozen=True)
class DnsHost:
    """Names answered by the network's DNS with one address (A or AAAA, and its PTR)."""

    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    names: tuple[str, ...]


@dataclass(frozen=True)
class Dns:
    enabled: bool = True
    domain: str | None = None
    forwarders: tuple[str, ...] = ()
    hosts: tuple[DnsHost, ...] = ()


@dataclass(frozen=True)
class Network:
    name: str
    mode: Mode
    bridge: str
    ipv4: IPv4Interface | None = None  # gateway address with prefix
    ipv6: IPv6Interface | None = None
    # bridged: the physical NIC enslaved into the bridge.
    # nat/routed: optional, restricts forwarding/NAT to this outgoing device.
    uplink: str | None = None
    stp: bool = False
    forward_delay: int = 0  # seconds; with STP on the kernel wants 2..30
    mtu: int | None = None
    autostart: bool = True
    # isolated only: may guests reach the host's gateway address (beyond DHCP/DNS)?
    host_access: bool = False
    # guests' ports are isolated from each other (bridge port isolation)
    isolate_ports: bool = False
    # every guest port's limit in each direction, bytes/s (model/rate.py); None: none
    port_rate: int | None = None
    # each guest port may send only from its own MAC and addresses (bridge-family nftables)
    anti_spoofing: bool = False
    dhcp: Dhcp | None = None
    dns: Dns = field(default_factory=Dns)
    allow_users: tuple[str, ...] = ()
    allow_groups: tuple[str, ...] = ()
    # Extra dnsmasq options ("name" or "name=value"), each on the config's allow list;
    # written after kvmnetd's own.
    dnsmasq_options: tuple[str, ...] = ()
    # Port forwards ([[network.NAME.forward]] and runtime ones), in declaration order.
    port_forwards: tuple[Forward, ...] = ()
    # One L2 segment across hosts (VXLAN); None: this host only.
    overlay: NetworkOverlay | None = None
    source: Source | None = field(default=None, compare=False)

    @property
    def forwards(self) -> bool:
        """Does the host route this network's traffic (needs ip_forward)?"""
        return self.mode in (Mode.NAT, Mode.ROUTED)

    @property
    def needs_dnsmasq(self) -> bool:
        return self.dhcp is not None or (self.dns.enabled and self.ipv4 is not None)


@dataclass(frozen=True)
class AttachRule:
    """Auto-attach policy: a tap matching every given field joins `network`."""

    network: str
    ifname: str | None = None  # glob, e.g. "vnet*"
    mac: str | None = None  # glob or prefix, e.g. "52:54:00:12:*"
    domain: str | None = None  # libvirt domain name or UUID
    source: Source | None = field(default=None, compare=False)


# nft's own identifier rule (a letter first), kept to what needs no quoting and to
# 32 bytes. The config check, the renderer and the adapter all ask this one.
_NFT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")


def is_nft_name(name: str) -> bool:
    """True if `name` can be our nftables table's name."""
    return _NFT_NAME.fullmatch(name) is not None


# The kernel refuses "/", ":" and white space (dev_valid_name); "%" makes a name a template
# for the kernel to fill in; "," "=" "#" would split a dnsmasq option or start a comment.
_IFNAME_BAD = frozenset("/:%,=#")


def ifname_problem(name: str) -> str | None:
    """Why `name` cannot be an interface name, or None when it can."""
    size = len(name.encode("utf-8", "surrogatepass"))
    if not 1 <= size <= 15:
        return f"interface name {name!r} must be 1 to 15 bytes, not {size}"
    if name in (".", ".."):
        return f"{name!r} is not a valid interface name"
    bad = [c for c in name if c in _IFNAME_BAD or c.isspace() or not c.isprintable()]
    if bad:
        return f"interface name {name!r} may not contain {bad[0]!r}"
    return None


def is_ifname(name: str) -> bool:
    """True if `name` can name a bridge, uplink or port (the one rule for all callers)."""
    return ifname_problem(name) is None


@dataclass(frozen=True)
class Settings:
    """Daemon-wide settings; every path can be overridden for side-by-side daemons."""

    run_dir: str = "/run/kvmnetd"
    state_dir: str = "/var/lib/kvmnetd"
    config_file: str = "/etc/kvmnetd/kvmnetd.toml"
    networks_dir: str = "/etc/kvmnetd/networks.d"
    bus_address: str | None = None  # None: the system bus
    firewall_table: str = "kvmnetd"
    teardown_on_stop: bool = False
    dnsmasq_path: str = "dnsmasq"
    dnsmasq_user: str = "kvmnetd-dnsmasq"  # made by sysusers.d/kvmnetd.conf
    libvirt_uri: str | None = "qemu:///system"
    libvirt_networks: bool = True  # each active network also defined in libvirt (needs the URI)
    # kvmnetd's file for qemu-bridge-helper (include it from /etc/qemu/bridge.conf); None: off
    qemu_bridge_conf: str | None = None
    log_format: str = "kv"  # kv | json | journal
    # Accepts for our networks in foreign firewalls that drop forwarded traffic:
    # auto (iptables chains such as DOCKER-USER), off, all (also foreign nft chains).
    coexist: str = "auto"
    log_level: str = "info"
    # Per-port counters in the Prometheus text format, for node exporter's textfile
    # collector; None: not written (and nothing runs for it).
    metrics_file: str | None = None
    # [daemon.overlay]: this host in a fabric of hosts sharing overlay networks.
    overlay: HostOverlay | None = None


@dataclass(frozen=True)
class DesiredState:
    networks: dict[str, Network] = field(default_factory=dict)
    # Networks that should be up: autostart ones plus runtime starts.
    active: frozenset[str] = frozenset()
    # Explicit port requests: ifname -> network name.
    ports: dict[str, str] = field(default_factory=dict)
    rules: tuple[AttachRule, ...] = ()
    # Per-port rate overrides: ifname -> bytes/s, 0 for no limit (the network's default
    # applies to ports not named here).
    rates: dict[str, int] = field(default_factory=dict)
    # This host's place among the hosts sharing overlay networks ([daemon.overlay]).
    overlay: HostOverlay | None = None
    # What is known of the guest behind each port (anti-spoofing): ifname -> identity.
    identities: dict[str, PortIdentity] = field(default_factory=dict)
    # Built once per config load and carried through replace(): it keeps its match memo.
    policy: AttachPolicy = field(default=None, compare=False, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.policy is None or self.policy.rules is not self.rules:
            object.__setattr__(self, "policy", AttachPolicy(self.rules))

    def active_networks(self) -> list[Network]:
        return [n for name, n in sorted(self.networks.items()) if name in self.active]
