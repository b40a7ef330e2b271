"""The control plane of the real daemon (bench/control_plane.py measures the core over fakes):
D-Bus read calls/s (100 in flight) and sequential latency, AttachPort calls/s (each one a
reconcile pass), and `kvmnetctl port attach` wall time over the socket and over the bus."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from typing import Any

from dbus_fast import BusType

from bench.common import (
    DAEMON_TOML,
    KVMNETCTL,
    Box,
    attach_rule,
    log,
    median,
    network_toml,
    r,
)
from bench.control_plane import IN_FLIGHT, rate, sequential_latency_us
from kvmnetd.control.dbus_objects import SteadyBus
from tests.support.dbus import open_dir, start_bus, stop_bus

PORTS = 50


def run(quick: bool) -> dict[str, Any]:
    reads, attaches, walls = (2000, 200, 20) if quick else (10000, 1000, 30)
    scratch = open_dir("kvmnetd-bus-")
    bus = start_bus(scratch)
    try:
        with Box() as box:
            box.write_config(DAEMON_TOML + network_toml("ct", "kvct0", "10.65.0.1/24")
                             + attach_rule("ct", "ct*"))
            box.start(bus=bus.address)
            taps = [f"ct{i:02d}" for i in range(PORTS)]
            box.batch(f"tuntap add dev {t} mode tap" for t in taps)
            box.wait_masters(dict.fromkeys(taps, "kvct0"))
            res = asyncio.run(_calls(bus.address, reads, attaches))
            sock = str(box.run_dir / "control.sock")
            res["kvmnetctl_port_attach_ms_socket"] = r(wall_ms(
                [KVMNETCTL, "--socket", sock, "--quiet", "port", "attach", "ct00", "ct"], walls))
            res["kvmnetctl_port_attach_ms_bus"] = r(wall_ms(
                [KVMNETCTL, "--bus-address", bus.address, "--quiet", "port", "attach", "ct00",
                 "ct"],
                walls))
            res["kvmnetctl_network_list_ms_socket"] = r(wall_ms(
                [KVMNETCTL, "--socket", sock, "network", "list"], walls))
            res["kvmnetctl_runs"] = walls
    finally:
        stop_bus(bus)
        shutil.rmtree(scratch, ignore_errors=True)
    log(f"control: {res}")
    return res


def wall_ms(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
        times.append((time.perf_counter() - t0) * 1000)
    return median(times)


async def _calls(address: str, reads: int, attaches: int) -> dict[str, Any]:
    client = await SteadyBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
    try:
        latency = await sequential_latency_us(client)
        read_rate = await rate(client, "ListNetworks", "", [[]] * reads)
        attach_rate = await rate(client, "AttachPort", "ssb",
                                 [[f"ct{i % PORTS:02d}", "ct", False] for i in range(attaches)])
    finally:
        client.disconnect()
    return {"read_sequential_latency_us": r(latency, 1), "read_calls_per_s": round(read_rate),
            "read_calls": reads, "in_flight": IN_FLIGHT,
            "attach_port_calls_per_s": round(attach_rate), "attach_port_calls": attaches}
