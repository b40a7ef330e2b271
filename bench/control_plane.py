"""Control-plane figures against the real core over in-memory adapter fakes, on a private
bus; prints JSON.

Read calls/s (concurrent), AttachPort calls/s, and kvmnetctl wall time
(median of 20 `kvmnetctl port attach` runs, over the socket and over the bus).
Run as root from the repository: .venv/bin/python bench/control_plane.py
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dbus_fast import BusType, Message, MessageType

from kvmnetd.control.dbus_objects import SteadyBus
from kvmnetd.control.names import BUS_NAME, MANAGER_IFACE, MANAGER_PATH
from kvmnetd.control.server import serve
from tests.support.core import SERVED_CONFIG, make_core, tap
from tests.support.dbus import KVMNETCTL, open_dir, start_bus, stop_bus

# dbus-daemon caps pending replies per connection (128 by default).
IN_FLIGHT = 100


async def rate(client: SteadyBus, member: str, sig: str, bodies: list[list[object]]) -> float:
    sem = asyncio.Semaphore(IN_FLIGHT)

    async def one(body: list[object]) -> None:
        async with sem:
            reply = await client.call(Message(destination=BUS_NAME, path=MANAGER_PATH,
                                              interface=MANAGER_IFACE, member=member,
                                              signature=sig, body=body))
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body

    start = time.perf_counter()
    await asyncio.gather(*(one(b) for b in bodies))
    return len(bodies) / (time.perf_counter() - start)


async def sequential_latency_us(client: SteadyBus, n: int = 500) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await client.call(Message(destination=BUS_NAME, path=MANAGER_PATH,
                                  interface=MANAGER_IFACE, member="ListNetworks"))
    return (time.perf_counter() - start) / n * 1e6


async def wall_ms(argv: list[str], runs: int = 20) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(*argv)
        assert await proc.wait() == 0, argv
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


async def main() -> None:
    scratch = open_dir("kvmnetd-bus-")
    bus = start_bus(scratch)
    server = None
    try:
        rig = await make_core(Path(scratch), SERVED_CONFIG, tap("vnet0"),
                              *(tap(f"b{i}") for i in range(50)))
        server = await serve(rig.core, bus.address, f"{scratch}/control.sock")
        assert await server.wait_for_bus(10), server.bus_error
        client = await SteadyBus(bus_address=bus.address, bus_type=BusType.SYSTEM).connect()
        latency = await sequential_latency_us(client)
        reads = await rate(client, "ListNetworks", "", [[]] * 10000)
        attaches = await rate(client, "AttachPort", "ssb",
                              [[f"b{i % 50}", "default", False] for i in range(5000)])
        client.disconnect()
        sock_ms = await wall_ms([KVMNETCTL, "--socket", server.socket.path,
                                 "--quiet", "port", "attach", "vnet0", "default"])
        bus_ms = await wall_ms([KVMNETCTL, "--bus-address", bus.address,
                                "--quiet", "port", "attach", "vnet0", "default"])
    finally:
        if server is not None:
            await server.close()
        stop_bus(bus)
        shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps({
        "read_sequential_latency_us": round(latency, 1),
        "read_calls_per_s": round(reads),
        "read_in_flight": IN_FLIGHT,
        "read_goal_calls_per_s": 2000,
        "attach_port_calls_per_s": round(attaches),
        "kvmnetctl_port_attach_ms_median_socket": round(sock_ms, 1),
        "kvmnetctl_port_attach_ms_median_bus": round(bus_ms, 1),
    }, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
