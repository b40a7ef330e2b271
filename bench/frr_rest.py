"""FRR watched at rest: how often kvmnetd runs vtysh, and what that costs.

    .venv/bin/python -m bench.frr_rest [--hosts 3] [--settle 40] [--seconds 120]   (as root)
    bench/run --only frr_rest                                                     (the same)

A fabric of simulated hosts with one evpn network (as bench.evpn), its BGP sessions up,
then SETTLE seconds for the reads that follow an apply to end, then SECONDS at rest.
Counted per host over those seconds: vtysh runs (a counting wrapper first on kvmnetd's
PATH), and kvmnetd's CPU time, its own and its reaped children's (vtysh). Nobody asks
for status meanwhile: what is left is what kvmnetd starts by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import CLK_TCK, log, machine
from bench.evpn import Bench
from tests.support.fabric import fabric
from tests.support.rig import wait_until

WRAPPER = """#!/bin/sh
echo "$PPID" >> {count}
exec {vtysh} "$@"
"""


def cpu(pid: int) -> tuple[float, float]:
    """(own, reaped children's) CPU seconds of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return ((int(fields[11]) + int(fields[12])) / CLK_TCK,
            (int(fields[13]) + int(fields[14])) / CLK_TCK)


def measure(hosts: int, settle: float, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kvmnetd-frr-rest-") as tmp:
        count = Path(tmp) / "vtysh-runs"
        count.touch()
        wrapper = Path(tmp) / "vtysh"
        wrapper.write_text(WRAPPER.format(count=count, vtysh="/usr/bin/vtysh"))
        wrapper.chmod(0o755)
        path = os.environ.get("PATH", "")
        os.environ["PATH"] = f"{tmp}:{path}"  # kvmnetd inherits it
        try:
            return _measure(hosts, settle, seconds, count)
        finally:
            os.environ["PATH"] = path


def _measure(hosts: int, settle: float, seconds: float, count: Path) -> dict[str, Any]:
    holder: list[Bench] = []
    with fabric(hosts, "evpn", before_start=lambda h: holder[0].start_frr(h)) as fab:
        b = Bench(fab)
        holder.append(b)
        fab.start()
        assert wait_until(b.established, 120, 0.5), "sessions not established"
        time.sleep(settle)
        pids = []
        for h in fab.hosts:
            assert h.box.daemon is not None
            pids.append(h.box.daemon.pid)  # `ip netns exec` execs kvmnetd in place
        runs_before = len(count.read_text().split())
        before = [cpu(p) for p in pids]
        time.sleep(seconds)
        after = [cpu(p) for p in pids]
        runs = count.read_text().split()[runs_before:]
        per_host = [sum(r == str(p) for r in runs) for p in pids]
        own = [a[0] - b_[0] for a, b_ in zip(after, before, strict=True)]
        children = [a[1] - b_[1] for a, b_ in zip(after, before, strict=True)]
        minute = 60.0 / seconds
        return {
            "hosts": hosts, "seconds": seconds,
            "vtysh_runs_per_minute_per_host": round(sum(per_host) / hosts * minute, 1),
            "kvmnetd_cpu_ms_per_minute": round(1000 * sum(own) / hosts * minute, 1),
            "children_cpu_ms_per_minute": round(1000 * sum(children) / hosts * minute, 1),
        }


def run(quick: bool) -> dict[str, Any]:
    return measure(3, 40.0, 60.0 if quick else 120.0)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.frr_rest", description=__doc__)
    p.add_argument("--hosts", type=int, default=3)
    p.add_argument("--settle", type=float, default=40.0)
    p.add_argument("--seconds", type=float, default=120.0)
    a = p.parse_args()
    if os.geteuid() != 0:
        p.error("run as root: the benchmark makes network namespaces")
    res = measure(a.hosts, a.settle, a.seconds)
    log(f"frr_rest: {res}")
    doc = {"machine": machine(), "command": " ".join(["python -m bench.frr_rest", *sys.argv[1:]]),
           **res}
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
