"""What the core reports: plain records shared by the bus, the CLI and the DHCP supervisor."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Caller:
    """Who asked: uid and groups, from the bus or from socket peer credentials."""

    uid: int
    gids: tuple[int, ...] = ()
    pid: int | None = None
    bus_name: str | None = None  # the unique name of a bus caller (polkit's subject)
    # A socket caller's process start time (/proc/PID/stat, clock ticks since boot):
    # with pid, polkit's unix-process subject, safe against a reused pid.
    start_time: int | None = None

    @property
    def is_root(self) -> bool:
        return self.uid == 0


ROOT = Caller(uid=0)


@dataclass(frozen=True)
class Lease:
    mac: str
    ip: str
    hostname: str = ""
    client_id: str = ""
    expires: int = 0  # epoch seconds; 0 = infinite

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DhcpStatus:
    state: str = "off"  # off | starting | running | degraded | failed
    reason: str = ""
    pid: int | None = None


@dataclass(frozen=True)
class NetworkStatus:
    name: str
    mode: str
    bridge: str
    addresses: tuple[str, ...] = ()
    state: str = "inactive"  # inactive | pending | configuring | active | failed | degraded
    reason: str = ""
    ports: tuple[str, ...] = ()
    dhcp: DhcpStatus = field(default_factory=DhcpStatus)
    autostart: bool = True
    isolate_ports: bool = False
    anti_spoofing: bool = False
    port_rate: str = "none"  # each guest port's limit by default, as in the config

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["addresses"] = list(self.addresses)
        d["ports"] = list(self.ports)
        return d


@dataclass(frozen=True)
class PortStatus:
    ifname: str
    network: str
    bridge: str
    state: str = "pending"  # pending | attached | missing | failed
    domain: str = ""  # the libvirt domain whose NIC this is, if known
    rate: str = "none"  # its rate limit in each direction ("20mbit"), or "none"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PortCounters:
    """A port's traffic as its guest sees it: tx is what the guest sent."""

    ifname: str
    network: str
    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    tx_packets: int = 0
    drops: int = 0
    spoof_drops: int = 0  # frames the port's anti-spoofing dropped

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CoreEvent:
    """kind: network-changed | port-attached | port-detached | lease-added | lease-removed."""

    kind: str
    network: str
    ifname: str = ""
    lease: Lease | None = None
