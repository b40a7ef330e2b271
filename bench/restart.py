"""50 networks and 1,000 taps (--quick: 300) in place and converged; SIGTERM, start again:
seconds to READY (NOTIFY_SOCKET) and the writes it counts in `daemon.ready ... writes=N`."""

from __future__ import annotations

import subprocess
import time
from typing import Any

from bench import fleet
from bench.common import Box, log, median, r, stack, summary

TAPS = 1000
GOAL_S = 2.0


def run(quick: bool) -> dict[str, Any]:
    restarts = 3 if quick else 5
    ntaps = 300 if quick else TAPS
    taps = fleet.tap_names(0, ntaps)
    want = {t: fleet.bridge_of(t) for t in taps}
    with Box() as box:
        box.write_config(fleet.config())
        cold = box.timed_start()
        t0 = time.perf_counter()
        box.batch(f"tuntap add dev {t} mode tap" for t in taps)
        box.wait_masters(want, timeout=300)
        burst = time.perf_counter() - t0
        log(f"restart: cold start {cold:.2f} s, {ntaps} taps attached in {burst:.2f} s")
        ready, stop, writes, rss = [], [], [], []
        hung = 0
        for k in range(restarts):
            time.sleep(1.0)
            t1 = time.perf_counter()
            try:
                box.stop_daemon(timeout=10)
                stop.append(time.perf_counter() - t1)
            except subprocess.TimeoutExpired:
                hung += 1
                log(f"restart {k}: no exit 10 s after SIGTERM; {stack(box.pid)}")
                box.kill_daemon()
            ready.append(box.timed_start())
            writes.append(box.ready_writes())
            box.wait_masters(want, timeout=60)
            rss.append(box.rss_mb())
            log(f"restart {k}: READY in {ready[-1]:.2f} s, writes={writes[-1]}")
    return {
        "networks": fleet.NETS, "taps": ntaps, "restarts": restarts,
        "ready_s": summary(ready, 3),
        "sigterm_to_exit_s": summary(stop, 3) if stop else None,
        "sigterm_hangs_killed": hung,
        "writes": writes, "rss_mb_after_restart": r(median(rss), 1),
        "cold_start_ready_s": r(cold, 3), "taps_burst_attached_s": r(burst, 3),
        "goal_s": GOAL_S,
        "goal_met": median(ready) < GOAL_S and max(writes) == 0,
    }
