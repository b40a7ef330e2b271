"""Daemon CPU at rest: 50 networks with 10, 100 and 1,000 taps attached, then nothing
happens for 60 s (--quick: 10 s). CPU is utime + stime of the daemon from /proc/PID/stat."""

from __future__ import annotations

import os
import time
from typing import Any

from bench import fleet
from bench.common import Box, log, r

SIZES = (10, 100, 1000)
GOAL_MS_PER_S = 1.0


def run(quick: bool) -> dict[str, Any]:
    window = 10.0 if quick else float(os.environ.get("KVMNETD_BENCH_IDLE_S", "60"))
    out: dict[str, Any] = {"networks": fleet.NETS, "window_s": window, "sizes": {}}
    have = 0
    with Box() as box:
        box.write_config(fleet.config())
        for n in SIZES:
            fleet.grow(box, have, n)
            have = n
            box.start()
            box.wait_masters({t: fleet.bridge_of(t) for t in fleet.tap_names(0, n)}, timeout=300)
            time.sleep(3.0)  # the last events of the start-up settle
            load = os.getloadavg()[0]
            c0, t0 = box.cpu_s(), time.perf_counter()
            time.sleep(window)
            ms = (box.cpu_s() - c0) / (time.perf_counter() - t0) * 1000
            out["sizes"][str(n)] = {"idle_cpu_ms_per_s": r(ms, 2), "load_avg_1m": r(load, 2)}
            log(f"idle {n} ports: {ms:.2f} ms CPU per s (load {load:.2f})")
    big = out["sizes"][str(SIZES[-1])]["idle_cpu_ms_per_s"]
    out["goal_ms_per_s"] = GOAL_MS_PER_S
    out["goal_met"] = big is not None and big < GOAL_MS_PER_S
    return out
