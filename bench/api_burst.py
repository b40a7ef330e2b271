"""1,000 taps attached through the control socket across 50 networks (no [[attach]] rule
matches them): from the first call to the last reply and to every tap on its bridge.
Calls come from 32 clients at once, as many guests starting together would make them."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench import fleet
from bench.common import Box, log, r
from kvmnetd.cli import socket_call

TAPS = 1000
CLIENTS = 32
GOAL_S = 2.0


def run(quick: bool) -> dict[str, Any]:
    taps = 300 if quick else TAPS
    names = [f"a{j % fleet.NETS:02d}-{j:04d}" for j in range(taps)]  # no rule matches a..
    with Box() as box:
        box.write_config(fleet.config())
        box.start()
        box.batch(f"tuntap add dev {t} mode tap" for t in names)
        time.sleep(2.0)  # the creation events settle: only the calls are timed
        sock = str(box.run_dir / "control.sock")
        load = os.getloadavg()[0]
        c0 = box.cpu_s()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            list(pool.map(lambda t: socket_call(sock, "AttachPort", [t, f"n{t[1:3]}", False]),
                          names))
        replied = time.perf_counter() - t0
        box.wait_masters({t: fleet.bridge_of("t" + t[1:]) for t in names}, timeout=300)
        attached = time.perf_counter() - t0
        cpu = box.cpu_s() - c0
    log(f"api_burst: {taps} taps, replies after {replied:.2f} s, attached {attached:.2f} s "
        f"(daemon CPU {cpu:.2f} s, load {load:.2f})")
    return {"taps": taps, "networks": fleet.NETS, "clients": CLIENTS,
            "all_replied_s": r(replied, 3), "all_attached_s": r(attached, 3),
            "daemon_cpu_s": r(cpu, 3),
            "load_avg_1m": r(load, 2), "goal_s": GOAL_S, "goal_met": replied < GOAL_S}
