"""Link-event listener run inside a benchmark namespace (raw rtnetlink, RTMGRP_LINK).

argv: PREFIX BRIDGE[,BRIDGE...]. For each link named PREFIX*, prints one JSON line
{"n": name, "seen": t0, "up": t1}: t0 when a NEWLINK first showed it, t1 when one first
showed it enslaved to one of BRIDGES with IFF_UP. A name deleted and made again is timed
again. Prints "ready" once subscribed.

Times are the kernel's receive timestamps of each message (SO_TIMESTAMPNS), moved onto
time.monotonic(): a listener that decodes slower than a burst arrives would otherwise
measure its own backlog. Decoding uses kvmnetd's lean decoder.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

from kvmnetd.adapters.netlink_parse import LinkRec, decode_all

RTMGRP_LINK = 1
SO_RCVBUFFORCE = 33
SO_TIMESTAMPNS = 35


def main() -> None:
    prefix, bridges = sys.argv[1], set(sys.argv[2].split(","))
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sock.bind((0, RTMGRP_LINK))
    br_index: set[int] = set()
    for name in bridges:
        try:
            br_index.add(socket.if_nametoindex(name))
        except OSError:
            pass  # made later: its NEWLINK adds it
    offset = time.monotonic() - time.time()  # kernel timestamps are CLOCK_REALTIME
    seen: dict[str, float] = {}
    done: set[str] = set()
    print("ready", flush=True)
    while True:
        data, anc, _, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(16))
        t = time.monotonic()
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(raw) >= 16:
                sec, nsec = struct.unpack("qq", raw[:16])
                t = sec + nsec / 1e9 + offset
        for rec in decode_all(data, len(data)):
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


if __name__ == "__main__":
    main()
