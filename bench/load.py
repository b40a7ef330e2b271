"""Load: bursts of taps across many networks, attached and detached, round after round.

Most taps join by [[attach]] rules (created in one `ip -batch -`), some through the
control socket. Per round: time until all are on their bridges, time until all are
gone again, and the daemon's open fds and RSS once idle. Prints JSON.
Run as root from the repository: .venv/bin/python bench/load.py [TAPS NETWORKS ROUNDS]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvmnetd.cli import socket_call
from tests.support.netns import sh
from tests.support.rig import Sandbox, wait_until

DHCP_NETWORKS = 3  # the rest run without dnsmasq
EXPLICIT_EVERY = 10  # one tap in ten is attached through the socket


def config(networks: int) -> str:
    parts = []
    for i in range(networks):
        mode = ("nat", "routed", "isolated")[i % 3]
        parts.append(f'[network.l{i:02d}]\nmode = "{mode}"\nbridge = "kvl{i:02d}"\n'
                     f'ipv4 = "10.{100 + i // 200}.{i % 200}.1/24"\n')
        if i < DHCP_NETWORKS:
            parts.append(f"[network.l{i:02d}.dhcp]\n")
        parts.append(f'[network.l{i:02d}.dns]\nenabled = false\n'
                     f'[[attach]]\nnetwork = "l{i:02d}"\nifname = "t{i:02d}x*"\n')
    return "\n".join(parts)


def tap_plan(taps: int, networks: int) -> dict[str, str]:
    """ifname -> network; names t..x.. match a rule, m..x.. are attached explicitly."""
    out = {}
    for k in range(taps):
        i = k % networks
        prefix = "m" if k % EXPLICIT_EVERY == EXPLICIT_EVERY - 1 else "t"
        out[f"{prefix}{i:02d}x{k:04d}"] = f"l{i:02d}"
    return out


def masters(ns: str) -> dict[str, str | None]:
    links = json.loads(sh("ip", "-j", "link", ns=ns, timeout=60).stdout)
    return {lk["ifname"]: lk.get("master") for lk in links}


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def idle_figures(pid: int) -> tuple[int, int]:
    """fds and RSS once the daemon is idle: the least of a few samples (children come and go)."""
    time.sleep(1.2)  # past one periodic verification
    samples = []
    for _ in range(5):
        samples.append(fds(pid))
        time.sleep(0.1)
    return min(samples), rss_kb(pid)


def ip_batch(ns: str, lines: list[str]) -> None:
    sh("ip", "-batch", "-", ns=ns, input="\n".join(lines) + "\n", timeout=120)


def run_round(box: Sandbox, plan: dict[str, str], pid: int) -> dict[str, Any]:
    sock = str(box.run_dir / "control.sock")
    bridge = {n: f"kv{n}" for n in set(plan.values())}
    want = {t: bridge[n] for t, n in plan.items()}
    explicit = [t for t in plan if t.startswith("m")]
    t0 = time.monotonic()
    ip_batch(box.host, [f"tuntap add {t} mode tap" for t in plan])
    created = time.monotonic() - t0
    for t in explicit:
        socket_call(sock, "AttachPort", [t, plan[t], False])
    ok = wait_until(lambda: all(masters(box.host).get(t) == b for t, b in want.items()),
                    timeout=120, interval=0.2)
    attach_s = time.monotonic() - t0
    m = masters(box.host)
    assert ok, f"{sum(m.get(t) != b for t, b in want.items())} taps not on their bridges"
    listed = {p[0]: (p[1], p[2]) for p in socket_call(sock, "ListPorts", [])}
    assert listed == {t: (n, "attached") for t, n in plan.items()}, "ListPorts disagrees"
    t1 = time.monotonic()
    for t in explicit:
        socket_call(sock, "DetachPort", [t])
    ip_batch(box.host, [f"tuntap del {t} mode tap" for t in plan])

    def gone() -> bool:
        owned = json.loads((box.run_dir / "owned.json").read_text())
        return (not socket_call(sock, "ListPorts", [])) and not owned.get("ports")
    ok = wait_until(gone, timeout=60, interval=0.2)
    detach_s = time.monotonic() - t1
    assert ok, "ports left after every tap was deleted"
    m = masters(box.host)
    assert not [t for t, mm in m.items() if mm in bridge.values()], "a port is still on a bridge"
    n_fds, rss = idle_figures(pid)
    return {"create_s": round(created, 3), "attach_s": round(attach_s, 3),
            "detach_s": round(detach_s, 3), "fds": n_fds, "rss_kb": rss}


def run(box: Sandbox, taps: int, networks: int, rounds: int,
        report: Any = None) -> dict[str, Any]:
    box.write_config(config(networks))
    t0 = time.monotonic()
    box.start_daemon("--no-bus", timeout=120)
    ready = time.monotonic() - t0
    assert box.daemon is not None
    pid = box.daemon.pid
    plan = tap_plan(taps, networks)
    start_fds, start_rss = idle_figures(pid)
    out: dict[str, Any] = {"taps": taps, "networks": networks, "rounds": rounds,
                           "dhcp_networks": min(DHCP_NETWORKS, networks),
                           "explicit_taps": sum(t.startswith("m") for t in plan),
                           "ready_s": round(ready, 3), "idle_fds": start_fds,
                           "idle_rss_kb": start_rss, "per_round": []}
    for r in range(rounds):
        fig = run_round(box, plan, pid)
        out["per_round"].append(fig)
        if report:
            report(r, fig)
    return out


def main() -> None:
    taps, networks, rounds = (int(a) for a in (sys.argv[1:4] or ("1000", "50", "10")))
    tmp = Path(tempfile.mkdtemp(prefix="kvmnetd-load-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    try:
        with Sandbox(tmp) as box:
            result = run(box, taps, networks, rounds,
                         lambda r, f: print(f"round {r}: {f}", file=sys.stderr))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
