"""What a per-port rate limit costs and what a guest gets: guest <-> upstream throughput
(a bounded TCP transfer each way) and ping RTT, with no limit, with a limit far above
what the path carries (10gbit: the per-packet cost of tbf and the ifb redirect) and at
20mbit (plus the RTT while the guest downloads: the queue tbf keeps in front of it)."""

from __future__ import annotations

import json
import re
import subprocess
import time
from typing import Any

from bench.common import DAEMON_TOML, Box, attach_rule, log, network_toml, summary
from tests.support.netns import sh
from tests.support.rig import FAR_HOST, PY, wait_until

BR, GW = "kvrc0", "10.67.0.1"
PORT, TCP_PORT = "rc1", 9995

# Upstream: "u" + size: take size bytes, answer the rate seen (bits/s); "d" + size: send.
SERVER = f"""
import socket, threading, time
def serve(c):
    with c:
        head = c.recv(16).decode()
        op, size = head[0], int(head[1:])
        if op == "u":
            n, t0 = 0, None
            while n < size and (data := c.recv(1 << 16)):
                t0 = t0 or time.monotonic()
                n += len(data)
            c.sendall(str(n * 8 / (time.monotonic() - t0)).encode())
        else:
            block = b"y" * 65536
            for _ in range(size // 65536):
                c.sendall(block)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{FAR_HOST}", {TCP_PORT}))
s.listen(8)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],)).start()
"""

CLIENT = f"""
import socket, sys, time
op, size = sys.argv[1], int(sys.argv[2]) // 65536 * 65536
s = socket.create_connection(("{FAR_HOST}", {TCP_PORT}), timeout=60)
s.sendall(f"{{op}}{{size:015d}}".encode())
if op == "u":
    block = b"x" * 65536
    for _ in range(size // 65536):
        s.sendall(block)
    print(s.recv(100).decode())
else:
    n, t0 = 0, None
    while data := s.recv(1 << 16):
        t0 = t0 or time.monotonic()
        n += len(data)
    print(n * 8 / (time.monotonic() - t0))
"""

# (label, the port's limit, bytes per transfer: ~2 s at 20mbit, more where it is fast)
CASES = (("none", "none", 200_000_000), ("10gbit", "10gbit", 200_000_000),
         ("20mbit", "20mbit", 5_000_000))


def run(quick: bool) -> dict[str, Any]:
    reps = 3 if quick else 5
    with Box() as box:
        box.write_config(DAEMON_TOML + network_toml("rc", BR, f"{GW}/24", dhcp=False)
                         + attach_rule("rc", "rc*"))
        box.start()
        guest = box.guest(PORT, "10.67.0.11/24", GW)
        box.wait_masters({PORT: BR})
        server = subprocess.Popen(["ip", "netns", "exec", box.upstream, PY, "-c", SERVER])
        out: dict[str, Any] = {"repetitions": reps}
        try:
            time.sleep(0.3)
            # Interleaved, one transfer each way per case and round: the machine's load
            # then weighs on every case alike.
            runs: dict[str, dict[str, list[float]]] = {
                c[0]: {"u": [], "d": []} for c in CASES}
            for _ in range(reps):
                for label, rate, size in CASES:
                    _set_limit(box, rate)
                    for op in ("u", "d"):
                        runs[label][op].append(_speed(guest, op, size // (5 if quick else 1)))
            for label, rate, size in CASES:
                _set_limit(box, rate)
                log(f"rate_cost: {label}")
                out[label] = {"bytes": size // (5 if quick else 1),
                              "up_mbit_s": summary(runs[label]["u"], 1),
                              "down_mbit_s": summary(runs[label]["d"], 1),
                              "rtt": _ping(guest)}
                if rate == "20mbit":
                    out[label]["rtt_while_downloading"] = _loaded_rtt(guest, size)
        finally:
            server.kill()
            server.wait(5)
        out["attach_burst"] = _attach_burst(box, 20 if quick else 50)
        return out


def _attach_burst(box: Box, n: int) -> dict[str, Any]:
    """n veths at once on a network with port_rate and on one without: seconds until all
    are attached (and limited). What the tc and ip processes cost per port."""
    res: dict[str, Any] = {"ports": n}
    box.write_config(DAEMON_TOML + network_toml("rc", BR, f"{GW}/24", dhcp=False)
                     + attach_rule("rc", "rc*")
                     + '[network.rl]\nmode = "nat"\nbridge = "kvrl0"\nipv4 = "10.68.0.1/24"\n'
                     + 'port_rate = "20mbit"\n[network.rl.dns]\nenabled = false\n'
                     + attach_rule("rl", "rl*"))
    box.ctl("reload")
    for label, prefix, bridge in (("no_limit_s", "rc1", BR), ("limited_s", "rl", "kvrl0")):
        names = [f"{prefix}{i:03d}" for i in range(n)]
        t0 = time.perf_counter()
        box.batch(f"link add {i} type veth peer name x{i}" for i in names)
        box.wait_masters(dict.fromkeys(names, bridge))
        if bridge != BR:
            assert wait_until(lambda names=names: _limited(box) >= set(names), timeout=120,
                              interval=0.02)
        res[label] = round(time.perf_counter() - t0, 3)
        log(f"rate_cost: {n} ports {label} {res[label]}")
    res["per_port_ms"] = round((res["limited_s"] - res["no_limit_s"]) / n * 1000, 2)
    return res


def _limited(box: Box) -> set[str]:
    """Devices with a 20mbit root tbf (2,500,000 bytes/s), from one tc call."""
    got = json.loads(sh("tc", "-j", "qdisc", "show", ns=box.host).stdout or "[]")
    return {q["dev"] for q in got if q.get("kind") == "tbf" and q.get("root")
            and q.get("options", {}).get("rate") == 2_500_000}


def _tbf_rate(box: Box, dev: str = PORT) -> str | None:
    got = sh("tc", "qdisc", "show", "dev", dev, ns=box.host).stdout
    m = re.search(r"qdisc tbf \S+ root .*?rate (\S+)", got)
    return m.group(1).lower() if m else None


def _speed(guest: str, op: str, size: int) -> float:
    return float(sh(PY, "-c", CLIENT, op, str(size), ns=guest, timeout=120).stdout) / 1e6


def _ping(guest: str, count: int = 50) -> dict[str, Any]:
    out = sh("busybox", "ping", "-c", str(count), "-i", "0.02", "-q", FAR_HOST, ns=guest,
             timeout=60).stdout
    m = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+) ms", out)
    assert m, out
    return {"min_ms": float(m.group(1)), "avg_ms": float(m.group(2)),
            "max_ms": float(m.group(3))}


def _set_limit(box: Box, rate: str) -> None:
    box.ctl("port", "limit", PORT, rate)
    want = None if rate == "none" else rate
    assert wait_until(lambda: _tbf_rate(box) == want, timeout=10), rate


def _loaded_rtt(guest: str, size: int) -> dict[str, Any]:
    """The RTT while the guest downloads at its limit: tbf's queue in the way."""
    dl = subprocess.Popen(["ip", "netns", "exec", guest, PY, "-c", CLIENT, "d", str(size * 2)],
                          stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        return _ping(guest, 30)
    finally:
        dl.wait(60)
