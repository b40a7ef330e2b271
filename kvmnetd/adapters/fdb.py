"""Which bridge port a MAC was seen on, from the kernel's forwarding database in sysfs."""

from __future__ import annotations

import os
import struct

SYS_NET = "/sys/class/net"
# struct __fdb_entry (linux/if_bridge.h): mac[6], port_no, is_local, ageing_timer, port_hi,
# pad, unused
_ENTRY = struct.Struct("=6sBBIBBH")


def port_of_mac(bridge: str, mac: str, root: str = SYS_NET) -> str | None:
    """The port of `bridge` where `mac` was last seen; None if unknown or local."""
    if not bridge or "/" in bridge or bridge in (".", ".."):
        return None
    try:
        want = bytes(int(x, 16) for x in mac.split(":"))
    except ValueError:
        return None
    try:
        with open(os.path.join(root, bridge, "brforward"), "rb") as f:
            data = f.read()
    except OSError:
        return None
    port_no = None
    for off in range(0, len(data) - _ENTRY.size + 1, _ENTRY.size):
        addr, lo, local, _age, hi, _pad, _unused = _ENTRY.unpack_from(data, off)
        if addr == want and not local:
            port_no = lo | (hi << 8)
            break
    if port_no is None:
        return None
    try:
        names = os.listdir(os.path.join(root, bridge, "brif"))
    except OSError:
        return None
    for name in names:
        try:
            with open(os.path.join(root, bridge, "brif", name, "port_no")) as f:
                if int(f.read().strip(), 0) == port_no:
                    return name
        except (OSError, ValueError):
            continue
    return None
