"""Port forwards: a host port (or range) sent on to a guest. Plain frozen data, no I/O."""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
PROTOS = ("tcp", "udp")


@dataclass(frozen=True)
class Forward:
    """`proto` `port`..`port_end` on the host's addresses (or `address`) -> `to`:`to_port`.

    `to` is a guest address as text, or the name of a static DHCP host of the network,
    looked up when rules are rendered, so the forward follows that host's address.
    """

    proto: str  # tcp | udp
    port: int
    port_end: int  # == port for a single port
    to: str
    to_port: int | None = None  # None: the same port(s) as on the host
    address: IPAddress | None = None  # None: every host address outside our networks
    # Position in its network's [[forward]] array, so checks across files name its line.
    index: int | None = field(default=None, compare=False)

    @property
    def ports(self) -> str:
        """"8080" or "8000-8010": the form the config and kvmnetctl use."""
        return str(self.port) if self.port == self.port_end else f"{self.port}-{self.port_end}"

    @property
    def key(self) -> tuple[str, int]:
        """What `forward remove` names: protocol and first port."""
        return self.proto, self.port

    def to_address(self) -> IPAddress | None:
        """The guest address when `to` is one; None when it names a host."""
        return _address(self.to)

    def overlaps(self, other: Forward) -> bool:
        """Would both catch the same packet (same protocol, port and listening address)?"""
        if self.proto != other.proto:
            return False
        if self.port > other.port_end or other.port > self.port_end:
            return False
        return self.address is None or other.address is None or self.address == other.address

    def describe(self) -> str:
        at = f" on {self.address}" if self.address is not None else ""
        to_port = f":{self.to_port}" if self.to_port is not None else ""
        return f"{self.proto} {self.ports}{at} -> {self.to}{to_port}"


def parse_ports(text: str) -> tuple[int, int]:
    """"8080" or "8000-8010" -> (first, last); ValueError with a message otherwise."""
    first, sep, last = text.partition("-")
    try:
        lo = int(first)
        hi = int(last) if sep else lo
    except ValueError:
        raise ValueError(f"port {text!r} must be a number or a range like \"8000-8010\"") \
            from None
    for p in (lo, hi):
        if not 1 <= p <= 65535:
            raise ValueError(f"port {p} is outside 1..65535")
    if hi < lo:
        raise ValueError(f"port range {text!r} ends before it starts")
    return lo, hi


@functools.lru_cache(maxsize=4096)
def _address(text: str) -> IPAddress | None:
    # Asked for by every check and every render of a thousand forwards.
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
