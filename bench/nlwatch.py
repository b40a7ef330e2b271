"""Link-event listener run inside a benchmark namespace (pyroute2, RTMGRP_LINK).

argv: PREFIX BRIDGE[,BRIDGE...]. For each link named PREFIX*, prints one JSON line
{"n": name, "seen": t0, "up": t1}: t0 when a NEWLINK first showed it, t1 when one first
showed it enslaved to one of BRIDGES with IFF_UP (time.monotonic(), seconds). A name
deleted and made again is timed again. Prints "ready" once subscribed.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.rtnl import RTMGRP_LINK

RTM_NEWLINK, RTM_DELLINK = 16, 17
IFF_UP = 0x1
SO_RCVBUFFORCE = 33


async def main() -> None:
    prefix, bridges = sys.argv[1], set(sys.argv[2].split(","))
    ev = AsyncIPRoute(groups=RTMGRP_LINK, rcvbuf=32 << 20)
    await ev.bind(RTMGRP_LINK)
    ev.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
    ipr = AsyncIPRoute()
    br_index: set[int] = set()
    async for msg in await ipr.link("dump"):
        if msg.get("ifname") in bridges:
            br_index.add(msg["index"])
    ipr.close()
    seen: dict[str, float] = {}
    done: set[str] = set()
    print("ready", flush=True)
    while True:
        async for msg in ev.get():
            t = time.monotonic()
            if msg.get("family", 0) != socket.AF_UNSPEC:
                continue
            name = msg.get("ifname")
            kind = msg["header"]["type"]
            if name in bridges and kind == RTM_NEWLINK:
                br_index.add(msg["index"])
            if not name or not name.startswith(prefix):
                continue
            if kind == RTM_DELLINK:
                seen.pop(name, None)
                done.discard(name)
                continue
            first = seen.setdefault(name, t)
            if (name not in done and msg.get("master") in br_index
                    and msg["flags"] & IFF_UP):
                done.add(name)
                print(json.dumps({"n": name, "seen": first, "up": t}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
