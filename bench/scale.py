"""50 networks with 10, 100 and 1,000 taps (--quick: 300 at most): cold start-up (nothing
made yet) to READY and to every tap attached, RSS, idle CPU, and per-event cost: one new
tap's attach latency (netlink listener, median of 20) and the daemon's CPU time per event
(utime + stime)."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from bench import fleet
from bench.common import Box, Watch, log, median, r, stack, summary

SIZES = (10, 100, 1000)
GOAL_RSS_MB = 60.0


def run(quick: bool) -> dict[str, Any]:
    events = 6 if quick else 20
    sizes = (10, 100, 300) if quick else SIZES
    idle_s = 1.0 if quick else 3.0
    out: dict[str, Any] = {"networks": fleet.NETS, "events_per_size": events, "sizes": {}}
    have = 0
    with Box() as box:
        box.write_config(fleet.config())
        for n in sizes:
            fleet.grow(box, have, n)
            have = n
            want = {t: fleet.bridge_of(t) for t in fleet.tap_names(0, n)}
            t0 = time.perf_counter()
            ready = box.timed_start()
            box.wait_masters(want, timeout=300)
            attached = time.perf_counter() - t0
            time.sleep(1.5)
            rss = box.rss_mb()
            c0 = box.cpu_s()
            time.sleep(idle_s)
            idle = (box.cpu_s() - c0) / idle_s
            lat, cpu = per_event(box, events)
            res = {"cold_start_ready_s": r(ready, 3), "cold_start_all_attached_s": r(attached, 3),
                   "writes_at_ready": box.ready_writes(), "rss_mb": r(rss, 1),
                   "idle_cpu_ms_per_s": r(idle * 1000, 1),
                   "event_attach_ms": summary(lat, 2),
                   "event_cpu_ms": r(cpu, 2)}
            out["sizes"][str(n)] = res
            log(f"scale {n}: ready {ready:.2f} s, rss {rss:.1f} MB, event "
                f"{median(lat):.1f} ms, cpu/event {cpu:.1f} ms")
    s, big = out["sizes"], str(sizes[-1])
    lat10, lat1k = s["10"]["event_attach_ms"]["median"], s[big]["event_attach_ms"]["median"]
    out[f"event_latency_ratio_{big}_vs_10"] = r(lat1k / lat10, 2)
    c10, c1k = s["10"]["event_cpu_ms"], s[big]["event_cpu_ms"]
    out[f"event_cpu_ratio_{big}_vs_10"] = r(c1k / c10, 2) if c10 else None
    out["goal_rss_mb"] = GOAL_RSS_MB
    out["goal_rss_met"] = s[big]["rss_mb"] < GOAL_RSS_MB
    # "Flat": within 2x from 10 to the largest size.
    out["goal_flat_met"] = lat1k / lat10 <= 2 and (not c10 or c1k / c10 <= 2)
    return out


def per_event(box: Box, events: int) -> tuple[list[float], float]:
    """Each event: a tap made, waited for until attached and up, then 0.1 s more for any
    trailing pass; CPU read around that window. Deleted outside the window."""
    watch = Watch(box.host, "t", fleet.bridges())
    lat: list[float] = []
    cpu = 0.0
    try:
        for k in range(events):
            tap = f"t{k % fleet.NETS:02d}-e{k:03d}"
            c0 = box.cpu_s()
            box.batch([f"tuntap add dev {tap} mode tap"])
            try:
                seen, up = watch.wait([tap], timeout=30)[tap]
            except TimeoutError as e:
                log(f"scale: {e}; {stack(box.pid)}")
                raise
            time.sleep(0.1)
            cpu += box.cpu_s() - c0
            lat.append((up - seen) * 1000)
            box.batch([f"link del {tap}"])
            time.sleep(0.3)
    finally:
        with contextlib.suppress(Exception):
            watch.close()
    return lat, cpu / events * 1000
