"""One network across simulated hosts, static VXLAN mode (tests/support/fabric.py).

- appear: from a guest's port appearing on host 1 to its first answer to a probe that a
  guest on every other host keeps sending (UDP, every 2 ms);
- move: from the guest's port leaving host 1 for host 2 (and its gratuitous ARP) to its
  first answer to the probes from host 3;
- cost per host at 3, 5 and 10 hosts: each daemon's start to READY=1, host 1's writes at
  start, its RSS and CPU time after starting and one guest appearing and moving, the
  flood entries per network, and how many packets one broadcast from a guest puts on
  the underlay (head-end replication: one per peer).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any

from bench.common import drain_notify, log, summary
from tests.support.fabric import Fabric, FabricGuest, FabricHost
from tests.support.netns import netns, sh
from tests.support.rig import PY, wait_until

GUEST_IP = "10.60.0.5"
PROBE_PORT = 5003

# A guest's answering side: UDP echo, bound before its NIC exists.
ECHO = f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", {PROBE_PORT}))
while True:
    data, peer = s.recvfrom(64)
    s.sendto(data, peer)
"""

# The probing side: waits for "go T0" on stdin, probes every 2 ms, prints the time from
# T0 (CLOCK_MONOTONIC, shared by all namespaces) to the first answer.
PROBE = f"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
t0 = float(sys.stdin.readline().split()[1])
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        s.sendto(b"p", (sys.argv[1], {PROBE_PORT}))
    except OSError:
        pass
    end = time.monotonic() + 0.002
    while time.monotonic() < end:
        try:
            s.recv(64)
            print(round((time.monotonic() - t0) * 1000, 2), flush=True)
            sys.exit(0)
        except BlockingIOError:
            time.sleep(0.0002)
print("timeout", flush=True)
"""


def _probers(watchers: list[FabricGuest], target: str) -> list[subprocess.Popen[str]]:
    return [subprocess.Popen(["ip", "netns", "exec", w.ns, PY, "-c", PROBE, target],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for w in watchers]


def _fire(probers: list[subprocess.Popen[str]], t0: float) -> list[float]:
    for p in probers:
        assert p.stdin is not None
        p.stdin.write(f"go {t0}\n")
        p.stdin.flush()
    out = []
    for p in probers:
        assert p.stdout is not None
        line = p.stdout.readline().strip()
        p.wait(35)
        out.append(float(line) if line and line != "timeout" else float("nan"))
    return out


def _watcher(fab: Fabric, host: FabricHost, i: int) -> FabricGuest:
    g = fab.guest(host)
    sh("ip", "addr", "add", f"10.60.0.{150 + i}/24", "dev", "eth0", ns=g.ns)
    sh("ip", "link", "set", "eth0", "mtu", "1450", ns=g.ns)
    return g


def _guest_ns(fab: Fabric) -> tuple[str, subprocess.Popen[str]]:
    ns = fab.stack.enter_context(netns("g"))
    echo = subprocess.Popen(["ip", "netns", "exec", ns, PY, "-c", ECHO])
    fab.stack.callback(echo.kill)
    return ns, echo


def _appear_and_move(fab: Fabric, rep: int) -> tuple[list[float], list[float]]:
    h1, h2, h3 = fab.hosts[:3]
    watchers = [_watcher(fab, h, rep * 10 + i) for i, h in enumerate(fab.hosts[1:])]
    ns, _ = _guest_ns(fab)
    port = f"vmb{rep}x"  # the fabric's attach rule takes vm*
    mac = f"52:54:00:7b:00:{rep:02x}"
    time.sleep(0.3)  # the probers' and the echo's start-up is not part of the figure
    probers = _probers(watchers, GUEST_IP)
    time.sleep(0.3)
    t0 = time.monotonic()
    # The guest appears: its port on host 1, its NIC configured as after a boot.
    sh("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
       ns=h1.ns)
    sh("ip", "link", "set", "eth0", "address", mac, "mtu", "1450", "up", ns=ns)
    sh("ip", "addr", "add", f"{GUEST_IP}/24", "dev", "eth0", ns=ns)
    appear = _fire(probers, t0)
    move_watchers = [w for w in watchers if w.host is h3]
    probers = _probers(move_watchers, GUEST_IP)
    time.sleep(0.3)
    t0 = time.monotonic()
    sh("ip", "link", "set", port, "netns", h2.ns, ns=h1.ns)
    wait_until(lambda: h2.box.master_of(port) is not None, 10, 0.001)
    sh("busybox", "arping", "-U", "-c", "1", "-w", "1", "-I", "eth0", "-s", GUEST_IP,
       GUEST_IP, ns=ns, check=False)
    move = _fire(probers, t0)
    sh("ip", "link", "del", port, ns=h2.ns, check=False)
    return appear, move


BROADCASTS = 40
# argv[1] "send": BROADCASTS datagrams to the subnet's broadcast address; "idle": the
# same time without them, for the baseline.
BROADCAST = f"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
for _ in range({BROADCASTS}):
    if sys.argv[1] == "send":
        s.sendto(b"b", ("10.60.0.255", 9))
    time.sleep(0.005)
"""


def _underlay_copies(fab: Fabric) -> float:
    """Packets one broadcast from a guest on host 1 puts on the underlay: what the
    hosts send into the underlay bridge while the guest sends BROADCASTS of them, less
    what they send in the same time without (ND, ARP between the hosts)."""
    g = _watcher(fab, fab.hosts[0], 90)
    wait_until(lambda: fab.hosts[0].box.master_of(g.port) is not None, 10)

    def sent() -> int:
        out = sh("ip", "-s", "-j", "link", "show", "master", "underlay",
                 ns=fab.fabric_ns).stdout
        return sum(lk["stats64"]["rx"]["packets"] for lk in json.loads(out))

    time.sleep(0.5)
    t0, before = time.monotonic(), sent()
    sh(PY, "-c", BROADCAST, "idle", ns=g.ns)
    quiet = sent() - before
    span = time.monotonic() - t0
    before = sent()
    t0 = time.monotonic()
    sh(PY, "-c", BROADCAST, "send", ns=g.ns)
    busy = sent() - before
    busy -= round(quiet * (time.monotonic() - t0) / span) if span else 0
    return round(busy / BROADCASTS, 1)


def _cost(count: int) -> dict[str, Any]:
    with Fabric(count) as fab:
        starts = []
        for host in fab.hosts:
            host.box.write_config(fab.config(host))
            t0 = time.perf_counter()
            host.box.start_daemon("--no-bus")
            starts.append(time.perf_counter() - t0)
            _drain(host)
        h1 = fab.hosts[0]
        pid = h1.box.daemon.pid if h1.box.daemon else 0
        flood = sh("bridge", "fdb", "show", "dev", "kvx100", ns=h1.ns).stdout.count("dst ")
        appear, move = _appear_and_move(fab, 0) if count >= 3 else ([], [])
        copies = _underlay_copies(fab)
        cpu = _cpu(pid)
        log(f"overlay: {count} hosts: start {summary(starts)}, flood entries {flood}, "
            f"copies of a broadcast {copies}")
        return {"hosts": count, "start_s": summary(starts, 3), "flood_entries": flood,
                "writes_at_ready": _ready_writes(h1), "rss_mb": round(_rss(pid), 1),
                "cpu_s": round(cpu, 2),
                "broadcast_copies_on_underlay": copies,
                "appear_ms": appear, "move_ms": move}


def _drain(host: FabricHost) -> None:
    assert host.box.notify is not None
    drain_notify(host.box.notify)


def _ready_writes(host: FabricHost) -> int:
    import re
    found = re.findall(r"event='daemon.ready'.*?writes=(\d+)", host.box.log.read_text())
    return int(found[-1]) if found else -1


def _cpu(pid: int) -> float:
    """CPU seconds of the daemon so far (start, a guest appearing and moving)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run(quick: bool) -> dict[str, Any]:
    reps = 2 if quick else 5
    appear: list[float] = []
    move: list[float] = []
    with Fabric(3) as fab:
        fab.start()
        for host in fab.hosts:
            _drain(host)
        for rep in range(reps):
            a, m = _appear_and_move(fab, rep + 1)
            appear += a
            move += m
    sizes = (3, 5) if quick else (3, 5, 10)
    cost = [_cost(n) for n in sizes]
    return {
        "mode": "static",
        "appear_ms": summary(appear),
        "move_ms": summary(move),
        "per_hosts": cost,
    }
