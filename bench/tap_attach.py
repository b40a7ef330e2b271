"""100 taps made at once (one `ip -batch`); each tap's time from its first NEWLINK to the
first NEWLINK showing it enslaved and up, from a netlink listener in the namespace."""

from __future__ import annotations

import time
from typing import Any

from bench.common import (
    DAEMON_TOML,
    Box,
    Watch,
    attach_rule,
    log,
    median,
    network_toml,
    pct,
    r,
    stack,
)

TAPS = 100
GOAL_P99_MS = 5.0


def run(quick: bool) -> dict[str, Any]:
    rounds = 3 if quick else 7
    names = [f"bt{i:03d}" for i in range(TAPS)]
    per_round: list[dict[str, float]] = []
    failures: list[str] = []
    with Box() as box:
        box.write_config(DAEMON_TOML + network_toml("ta", "kvta0", "10.61.0.1/24")
                         + attach_rule("ta", "bt*"))
        box.start()
        watch = Watch(box.host, "bt", ["kvta0"])
        try:
            for k in range(rounds):
                box.batch(f"tuntap add dev {n} mode tap" for n in names)
                try:
                    got = watch.wait(names, timeout=30)
                except TimeoutError as e:
                    failures.append(f"round {k}: {e}; {stack(box.pid)}")
                    log("tap_attach:", failures[-1])
                    box.batch(f"link del {n}" for n in names)
                    time.sleep(1)
                    continue
                lat = [(up - seen) * 1000 for seen, up in got.values()]
                burst = (max(u for _, u in got.values())
                         - min(s for s, _ in got.values())) * 1000
                per_round.append({"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
                                  "max_ms": max(lat), "burst_ms": burst})
                log(f"tap_attach round {k}: p50 {pct(lat, 50):.2f} p99 {pct(lat, 99):.2f} "
                    f"max {max(lat):.2f} burst {burst:.1f} ms")
                box.batch(f"link del {n}" for n in names)
                time.sleep(0.7)
        finally:
            watch.close()
    if not per_round:
        return {"error": "no round completed", "failures": failures}
    p99 = median(x["p99_ms"] for x in per_round)
    return {
        "taps": TAPS, "rounds": rounds,
        "p50_ms": r(median(x["p50_ms"] for x in per_round)),
        "p99_ms": r(p99),
        "max_ms": r(median(x["max_ms"] for x in per_round)),
        "burst_first_seen_to_last_up_ms": r(median(x["burst_ms"] for x in per_round)),
        "per_round": [{k: r(v) for k, v in x.items()} for x in per_round],
        "failures": failures,
        "goal_p99_ms": GOAL_P99_MS, "goal_met": p99 < GOAL_P99_MS and not failures,
    }
