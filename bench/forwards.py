"""The cost of 1,000 port forwards: tap attach latency (as bench/tap_attach.py: 100 taps at
once, each from its first NEWLINK to enslaved and up) and `kvmnetctl reload` time, with 0
and with 1,000 `[[network.NAME.forward]]` tables on the network, plus the daemon's start."""

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
)

TAPS = 100
COUNTS = (0, 1000)
FIRST_PORT = 10000


def forwards_toml(count: int, shift: int = 0) -> str:
    """`count` TCP forwards, host port FIRST_PORT+i to guest 10.62.x.y:80 (one guest each);
    `shift` moves the first one's port, so a reload has one forward to change."""
    out = []
    for i in range(count):
        port = FIRST_PORT + i + (shift if i == 0 else 0) * 50000
        out.append(f'[[network.fb.forward]]\nproto = "tcp"\nport = {port}\n'
                   f'to = "10.62.{i // 250}.{i % 250 + 2}"\nto_port = 80\n')
    return "".join(out)


def config(count: int, shift: int = 0) -> str:
    net = network_toml("fb", "kvfb0", "10.62.255.1/16", dhcp=False)
    return DAEMON_TOML + net + forwards_toml(count, shift) + attach_rule("fb", "bf*")


def attach_rounds(box: Box, rounds: int) -> list[dict[str, float]]:
    names = [f"bf{i:03d}" for i in range(TAPS)]
    out: list[dict[str, float]] = []
    watch = Watch(box.host, "bf", ["kvfb0"])
    try:
        for _ in range(rounds):
            box.batch(f"tuntap add dev {n} mode tap" for n in names)
            got = watch.wait(names, timeout=60)
            lat = [(up - seen) * 1000 for seen, up in got.values()]
            out.append({"p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)})
            box.batch(f"link del {n}" for n in names)
            time.sleep(0.7)
    finally:
        watch.close()
    return out


def reload_ms(box: Box, count: int, rounds: int) -> tuple[float, float]:
    """Median wall time of `kvmnetctl reload`: unchanged files, and one forward changed."""
    same: list[float] = []
    changed: list[float] = []
    for k in range(rounds):
        t0 = time.perf_counter()
        box.ctl("reload")
        same.append((time.perf_counter() - t0) * 1000)
        if count:
            box.write_config(config(count, shift=(k + 1) % 2))
            t0 = time.perf_counter()
            box.ctl("reload")
            changed.append((time.perf_counter() - t0) * 1000)
    return median(same), median(changed) if changed else 0.0


def run(quick: bool) -> dict[str, Any]:
    rounds = 3 if quick else 7
    results: dict[str, Any] = {}
    for count in COUNTS:
        with Box() as box:
            box.write_config(config(count))
            start_s = box.timed_start()
            listing = box.nft()
            rules, elements = listing.count("dnat ip to"), listing.count(" . 80")
            per_round = attach_rounds(box, rounds)
            same, changed = reload_ms(box, count, rounds)
            row = {
                "forwards": count, "dnat_rules": rules, "map_elements": elements,
                "start_ms": r(start_s * 1000),
                "attach_p50_ms": r(median(x["p50_ms"] for x in per_round)),
                "attach_p99_ms": r(median(x["p99_ms"] for x in per_round)),
                "reload_unchanged_ms": r(same),
                "reload_one_changed_ms": r(changed) if count else None,
            }
            log(f"forwards {count}: {row}")
            results[str(count)] = row
    return {"taps": TAPS, "rounds": rounds, "by_forwards": results}
