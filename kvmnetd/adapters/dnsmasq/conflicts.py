"""Who else serves DHCP/DNS where our dnsmasq wants to? Read-only: nothing here signals anyone.

Socket tables are per network namespace, and so is this view: it is the namespace of
the calling thread (sock_diag netlink socket, /proc/thread-self/net).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from kvmnetd.adapters.rtnl.decode import (
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSGHDR,
    messages,
)
from kvmnetd.model.desired import Network

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
_REQ = struct.Struct("=BBBxI48x")  # inet_diag_req_v2, socket id left zero (dump all)
_MSG = struct.Struct("=BBBB2s2s16s16sIQIIIII")  # inet_diag_msg


@dataclass(frozen=True)
class UdpSocket:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    inode: int
    ifindex: int  # SO_BINDTODEVICE; 0: any device, or unknown


@dataclass(frozen=True)
class Holder:
    pid: int
    cmdline: str
    why: str

    def message(self, bridge: str) -> str:
        return (f"{self.why}: pid {self.pid} ({self.cmdline}); stop it or bind it to its own "
                f"interface with bind-interfaces so it leaves {bridge} alone")


def _diag_dump(family: int) -> list[UdpSocket]:
    """Every UDP socket of `family` in this namespace (inet_diag dump)."""
    out: list[UdpSocket] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as s:
        body = _REQ.pack(family, socket.IPPROTO_UDP, 0, 0xFFFFFFFF)
        s.sendall(NLMSGHDR.pack(NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY,
                                NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body)
        while data := s.recv(65536):
            for kind, _flags, _seq, start, end in messages(data, len(data)):
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR or end - start < _MSG.size:
                    raise OSError("sock_diag dump refused")
                (_fam, _st, _t, _r, sport, _dport, src, _dst, ifindex, _cookie,
                 _exp, _rq, _wq, _uid, inode) = _MSG.unpack_from(data, start)
                raw = src[:4] if family == socket.AF_INET else src
                out.append(UdpSocket(ipaddress.ip_address(raw), int.from_bytes(sport, "big"),
                                     inode, ifindex))
    return out


def _proc_table(family: int) -> list[UdpSocket]:
    """Fallback without sock_diag: /proc knows no bound device, so ifindex is 0."""
    name = "udp" if family == socket.AF_INET else "udp6"
    out: list[UdpSocket] = []
    with open(f"/proc/thread-self/net/{name}") as f:
        next(f, None)
        for line in f:
            parts = line.split()
            local, inode = parts[1], int(parts[9])
            hexaddr, hexport = local.split(":")
            raw = bytes.fromhex(hexaddr)
            # The kernel prints each 32-bit word in host (little endian) order.
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            out.append(UdpSocket(ipaddress.ip_address(raw), int(hexport, 16), inode, 0))
    return out


def udp_sockets() -> list[UdpSocket]:
    out: list[UdpSocket] = []
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            out += _diag_dump(family)
        except OSError:
            out += _proc_table(family)
    return out


def read_cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _netns_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def same_netns(pid: int) -> bool | None:
    """None when the other process's namespace cannot be seen: under the unit, root has no
    CAP_SYS_PTRACE, and dnsmasq runs as its own user, so /proc/PID/ns is closed to us."""
    mine = _netns_id("/proc/thread-self/ns/net")
    theirs = _netns_id(f"/proc/{pid}/ns/net")
    if mine is None or theirs is None:
        return None
    return theirs == mine


def _pids() -> Iterable[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def socket_owners(inodes: set[int]) -> dict[int, list[int]]:
    """inode -> pids holding it, from the /proc/PID/fd links."""
    owners: dict[int, list[int]] = {}
    for pid in _pids():
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inode = int(link[8:-1])
                        if inode in inodes and pid not in owners.setdefault(inode, []):
                            owners[inode].append(pid)
    return owners


def names_interface(argv: list[str], bridge: str) -> bool:
    """Does a dnsmasq command line serve `bridge` (-i/--interface, comma lists allowed)?"""
    for i, arg in enumerate(argv):
        value = None
        if arg.startswith("--interface="):
            value = arg.split("=", 1)[1]
        elif arg in ("-i", "--interface") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("-i") and not arg.startswith("--"):
            value = arg[2:]
        if value is not None and bridge in value.split(","):
            return True
    return False


def _interested(net: Network) -> set[int]:
    ports = set()
    if net.dhcp is not None:
        ports.add(67)
    if net.dns.enabled:
        ports.add(53)
    return ports


def find_conflicts(net: Network, ours: set[int]) -> list[Holder]:
    """Processes (not in `ours`) that would take DHCP/DNS packets meant for `net`."""
    ports = _interested(net)
    gateways = {a.ip for a in (net.ipv4, net.ipv6) if a is not None}
    try:
        brindex = socket.if_nametoindex(net.bridge)
    except OSError:
        brindex = -1
    why: dict[int, str] = {}
    for s in udp_sockets():
        if s.port not in ports:
            continue
        if s.address.is_unspecified:
            if s.ifindex not in (0, brindex):
                continue  # bound to some other interface: not in our way
        elif s.address not in gateways:
            continue
        where = f"{s.address}%{net.bridge}" if s.ifindex == brindex else str(s.address)
        why.setdefault(s.inode, f"UDP port {s.port} on {where} is already taken")
    holders: dict[int, Holder] = {}
    for inode, pids in socket_owners(set(why)).items():
        for pid in pids:
            if pid not in ours:
                holders.setdefault(pid, Holder(pid, " ".join(read_cmdline(pid)), why[inode]))
    for pid in _pids():
        if pid in ours or pid in holders:
            continue
        argv = read_cmdline(pid)
        if (argv and os.path.basename(argv[0]) == "dnsmasq"
                and names_interface(argv, net.bridge) and same_netns(pid)):
            holders[pid] = Holder(pid, " ".join(argv),
                                  f"another dnsmasq already serves {net.bridge}")
    return sorted(holders.values(), key=lambda h: h.pid)


def is_our_dnsmasq(pid: int, conf: str) -> bool:
    """A dnsmasq in this namespace running exactly our config file: one we started."""
    argv = read_cmdline(pid)
    # The config file lives in our own run_dir, so its path alone names our dnsmasq when
    # the namespace cannot be compared; another namespace's is refused when it can.
    return (bool(argv) and os.path.basename(argv[0]) == "dnsmasq"
            and f"--conf-file={conf}" in argv and same_netns(pid) is not False)


def pids_running(conf: str) -> list[int]:
    return [pid for pid in _pids() if is_our_dnsmasq(pid, conf)]
