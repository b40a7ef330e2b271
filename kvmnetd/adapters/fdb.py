"""Which bridge port a MAC was seen on, from the kernel's forwarding database in sysfs."""

from __future__ import annotations

import os
import struct

SYS_NET = "/sys/class/net"
# struct __fdb_entry (linux/if_bridge.h): mac[6], port_no, is_local, ageing_timer, port_hi,
# pad, unused
_ENTRY = struct.Struct("=6sBBIBBH")


def bridge_fdb(bridge: str, root: str = SYS_NET) -> dict[str, str]:
    """MAC -> the port of `bridge` where it was last seen (local entries left out)."""
    if not bridge or "/" in bridge or bridge in (".", ".."):
        return {}
    base = os.path.join(root, bridge)
    try:
        with open(os.path.join(base, "brforward"), "rb") as f:
            data = f.read()
        names = os.listdir(os.path.join(base, "brif"))
    except OSError:
        return {}
    ports: dict[int, str] = {}
    for name in names:
        try:
            with open(os.path.join(base, "brif", name, "port_no")) as f:
                ports[int(f.read().strip(), 0)] = name
        except (OSError, ValueError):
            continue
    out: dict[str, str] = {}
    for off in range(0, len(data) - _ENTRY.size + 1, _ENTRY.size):
        addr, lo, local, _age, hi, _pad, _unused = _ENTRY.unpack_from(data, off)
        port = ports.get(lo | (hi << 8))
        if not local and port is not None:
            out[addr.hex(":")] = port
    return out
