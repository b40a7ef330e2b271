"""Per-port traffic counters, read from the kernel's statistics of the host side of a port.

A tap or veth on the host is the guest's cable end turned around: what the guest sends
arrives as the port's rx, what it receives leaves as the port's tx. The swap is made here,
once, so everything above speaks from the guest's side.
"""

from __future__ import annotations

import os

SYS_NET = "/sys/class/net"
_FIELDS = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets", "rx_dropped", "tx_dropped")

# (rx_bytes, tx_bytes, rx_packets, tx_packets, drops), from the guest's side
GuestCounters = tuple[int, int, int, int, int]


def read_port_counters(ifname: str, root: str = SYS_NET) -> GuestCounters | None:
    """The guest-side counters of port `ifname`; None when there is no such device."""
    if not ifname or "/" in ifname or ifname in (".", ".."):
        return None
    base = os.path.join(root, ifname, "statistics")
    host: dict[str, int] = {}
    try:
        for name in _FIELDS:
            with open(os.path.join(base, name), "rb") as f:
                host[name] = int(f.read())
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return (host["tx_bytes"], host["rx_bytes"], host["tx_packets"], host["rx_packets"],
            host["rx_dropped"] + host["tx_dropped"])
