"""Link-event listener run inside a benchmark namespace (raw rtnetlink, RTMGRP_LINK).

argv: PREFIX BRIDGE[,BRIDGE...]. For each link named PREFIX*, prints one JSON line
{"n": name, "seen": t0, "up": t1}: t0 when a NEWLINK first showed it, t1 when one first
showed it enslaved to one of BRIDGES with IFF_UP. A name deleted and made again is timed
again. Prints "ready" once subscribed.

Netlink sockets carry no kernel receive timestamps (SO_TIMESTAMPNS is ignored on them), so
each message is stamped with time.monotonic() the moment it is read. To keep that close to
the kernel's send, the loop only reads and stamps while messages keep coming; decoding waits
until the socket has been quiet for a moment. A listener that decoded as it read would fall
behind a burst and measure its own backlog.
"""

from __future__ import annotations

import json
import select
import socket
import sys
import time

from kvmnetd.adapters.rtnl.decode import LinkRec, decode_all

RTMGRP_LINK = 1
SO_RCVBUFFORCE = 33
QUIET_S = 0.02


def main() -> None:
    prefix, bridges = sys.argv[1], set(sys.argv[2].split(","))
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                         socket.NETLINK_ROUTE)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
    sock.bind((0, RTMGRP_LINK))
    br_index: set[int] = set()
    for name in bridges:
        try:
            br_index.add(socket.if_nametoindex(name))
        except OSError:
            pass  # made later: its NEWLINK adds it
    seen: dict[str, float] = {}
    done: set[str] = set()
    backlog: list[tuple[float, bytes]] = []
    recv, now = sock.recv, time.monotonic
    print("ready", flush=True)
    while True:
        try:
            while True:
                data = recv(1 << 16)
                backlog.append((now(), data))
        except BlockingIOError:
            pass
        if select.select([sock], [], [], QUIET_S if backlog else None)[0]:
            continue
        for t, data in backlog:
            for rec in decode_all(data, len(data), port_flags=False):
                if not isinstance(rec, LinkRec):
                    continue
                link = rec.link
                if link.name in bridges and rec.new:
                    br_index.add(link.index)
                if not link.name.startswith(prefix):
                    continue
                if not rec.new:
                    seen.pop(link.name, None)
                    done.discard(link.name)
                    continue
                first = seen.setdefault(link.name, t)
                if link.name not in done and link.master in br_index and link.up:
                    done.add(link.name)
                    print(json.dumps({"n": link.name, "seen": first, "up": t}), flush=True)
        backlog.clear()


if __name__ == "__main__":
    main()
