"""The event socket's kernel-side filter (classic BPF): which rtnetlink messages are
worth waking the daemon for."""

from __future__ import annotations

import ctypes
import socket
import struct

from kvmnetd.adapters.rtnl.decode import RTM_DELLINK, RTM_DELNEIGH, RTM_NEWLINK, RTM_NEWNEIGH


def _be16(value: int) -> int:
    # Classic BPF reads packet halfwords big-endian; netlink headers are host order.
    return int.from_bytes(struct.pack("=H", value), "big")


def _be32(value: int) -> int:
    return int.from_bytes(struct.pack("=I", value), "big")


SO_ATTACH_FILTER = 26
_LD, _LDH, _LDB, _JEQ, _RET = 0x20, 0x28, 0x30, 0x15, 0x06  # classic BPF, absolute loads
IFF_PROMISC = 0x100
_ACCEPT, _DROP = 0xFFFFFFFF, 0


def event_filter(port_flags: bool, fdb: bool) -> list[tuple[int, int, int, int]]:
    """Classic BPF for the event socket: which copies the kernel need not wake us for.

    Always dropped: a bridge port's AF_BRIDGE RTM_DELLINK (the device's own event says the
    same); a link event whose only change is IFF_PROMISC (a bridge sets it on each new
    port; nothing here reads it); neighbours other than the bridge family's (fdb) and
    IPv4's (which guest holds which address), so the host's IPv6 neighbour churn never
    wakes the daemon.
    port_flags: keep the ports' AF_BRIDGE RTM_NEWLINK copies, the only news of a
    `bridge link set ... isolated` (three come with every enslave).
    fdb: keep fdb entries (one comes with every enslave; only the overlay reads them).
    """
    link_bridge = "accept" if port_flags else "drop"
    neigh_bridge = "accept" if fdb else "drop"
    # (op, k, jump-if-true label or None: next, jump-if-false label or None: next)
    code: list[tuple[int, int, str | None, str | None] | str] = [
        (_LDH, 4, None, None),  # nlmsg_type
        (_JEQ, _be16(RTM_NEWLINK), "newlink", None),
        (_JEQ, _be16(RTM_DELLINK), "dellink", None),
        (_JEQ, _be16(RTM_NEWNEIGH), "neigh", None),
        (_JEQ, _be16(RTM_DELNEIGH), "neigh", "accept"),
        "newlink", (_LDB, 16, None, None),  # ifi_family
        (_JEQ, socket.AF_BRIDGE, link_bridge, None),
        (_LD, 28, None, None),  # ifi_change
        (_JEQ, _be32(IFF_PROMISC), "drop", "accept"),
        "dellink", (_LDB, 16, None, None),
        (_JEQ, socket.AF_BRIDGE, "drop", "accept"),
        "neigh", (_LDB, 16, None, None),  # ndm_family
        (_JEQ, socket.AF_BRIDGE, neigh_bridge, None),
        (_JEQ, socket.AF_INET, "accept", "drop"),
        "accept", (_RET, _ACCEPT, None, None),
        "drop", (_RET, _DROP, None, None),
    ]
    at: dict[str, int] = {}  # label -> the index of the instruction after it
    count = 0
    for item in code:
        if isinstance(item, str):
            at[item] = count
        else:
            count += 1
    prog: list[tuple[int, int, int, int]] = []
    for item in code:
        if isinstance(item, str):
            continue
        op, k, yes, no = item
        pc = len(prog)
        jt = at[yes] - pc - 1 if yes is not None else 0
        jf = at[no] - pc - 1 if no is not None else 0
        prog.append((op, jt, jf, k))
    return prog


def attach_filter(sock: socket.socket, prog: list[tuple[int, int, int, int]]) -> None:
    """Install (or replace) a socket's classic BPF filter."""
    code = b"".join(struct.pack("=HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HP", len(prog), ctypes.addressof(buf))  # sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
