"""One network across simulated hosts with BGP EVPN (FRR): how fast and at what cost.

    .venv/bin/python -m bench.evpn [--hosts 3,5,10] [--reps 5]     (as root)

Per fabric size: the time from start until every host's BGP sessions are established,
the time from a guest appearing on one host (its port made, the guest announcing
itself) until a guest on another host gets its UDP echo back and until that host holds
the guest's MAC as an EVPN route, the live-move outage (the guest's port leaves host A
and appears on host B, the guest announces itself; the longest time a guest on a third
host sending every 2 ms gets no answer), and
the cost per host (resident memory of kvmnetd, zebra and bgpd; their CPU time over 10
idle seconds; EVPN routes held). Probes go every 2 ms; clocks are CLOCK_MONOTONIC,
shared by every namespace.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from typing import Any

from bench.common import CLK_TCK, log, machine, summary
from tests.support.fabric import Fabric, FabricHost, fabric
from tests.support.frr import FrrDaemons
from tests.support.netns import netns, sh
from tests.support.rig import PY, wait_until

ECHO = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 7002))
while True:
    data, peer = s.recvfrom(64)
    s.sendto(data, peer)
"""

# Sends a probe (its send time inside) every 2 ms for argv[2] seconds; prints
# "sent received" for every echo.
PROBE = """
import socket, struct, sys, time, select
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
target = (sys.argv[1], 7002)
end = time.monotonic() + float(sys.argv[2])
nxt = 0.0
while time.monotonic() < end:
    now = time.monotonic()
    if now >= nxt:
        try:
            s.sendto(struct.pack("d", now), target)
        except OSError:
            pass
        nxt = now + 0.002
    r, _, _ = select.select([s], [], [], max(0.0, nxt - time.monotonic()))
    if r:
        try:
            data = s.recv(64)
        except OSError:
            continue
        print(struct.unpack("d", data)[0], time.monotonic(), flush=True)
"""

STATIC_BASE = 240  # guests with fixed addresses, above the DHCP ranges


class Bench:
    def __init__(self, fab: Fabric) -> None:
        self.fab = fab
        self.frr: dict[str, FrrDaemons] = {}
        self.n = 0

    def start_frr(self, host: FabricHost) -> None:
        d = FrrDaemons(host.ns, self.fab.pathspace(host))
        self.fab.stack.callback(d.cleanup)
        d.start()
        self.frr[host.name] = d

    def established(self) -> bool:
        want = len(self.fab.hosts) - 1
        for d in self.frr.values():
            out = d.vtysh("show bgp l2vpn evpn summary json", check=False)
            try:
                peers = json.loads(out).get("peers", {})
            except ValueError:
                return False
            if sum(p.get("state") == "Established" for p in peers.values()) != want:
                return False
        return True

    def static_guest(self, host: FabricHost, echo: bool = True) -> tuple[str, str, str]:
        """A guest namespace with a fixed address and a UDP echo server; its port is made
        later (guest_port), so the guest "appears" when the bench says."""
        self.n += 1
        ip = f"10.60.0.{STATIC_BASE + self.n}"
        ns = self.fab.stack.enter_context(netns("g"))
        if echo:
            p = subprocess.Popen(["ip", "netns", "exec", ns, PY, "-c", ECHO])
            self.fab.stack.callback(p.kill)
        return ns, ip, f"vme{self.n}x{os.getpid() % 1000}"

    def guest_port(self, host: FabricHost, ns: str, ip: str, port: str, n: int) -> None:
        mac = f"52:54:00:7e:00:{n:02x}"
        sh("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
           ns=host.ns)
        sh("ip", "link", "set", "eth0", "address", mac, "up", ns=ns)
        sh("ip", "addr", "add", f"{ip}/24", "dev", "eth0", ns=ns)
        sh("ip", "route", "add", "default", "via", "10.60.0.1", ns=ns)


def first_reply_after(lines: list[str], t0: float) -> float | None:
    for line in lines:
        sent, got = (float(x) for x in line.split())
        if sent >= t0:
            return got - t0
    return None


def longest_gap(lines: list[str]) -> float | None:
    """The longest time between two answered probes (by their send times): how long
    the guest was out of reach."""
    sent = [float(line.split()[0]) for line in lines]
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    return max(gaps) if gaps else None


def remote_mac_seen(host: FabricHost, mac: str) -> bool:
    out = sh("bridge", "fdb", "show", "dev", "kvx100", ns=host.ns, check=False).stdout
    return any(mac in ln and "extern_learn" in ln for ln in out.splitlines())


def probe(ns: str, ip: str, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(["ip", "netns", "exec", ns, PY, "-c", PROBE, ip, str(seconds)],
                            stdout=subprocess.PIPE, text=True)


def appear(b: Bench, reps: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A guest appears on h1 (port made, kvmnetd attaches it, the guest announces itself):
    (until h2's guest is answered, until h2 holds its MAC as an EVPN route)."""
    h1, h2 = b.fab.hosts[0], b.fab.hosts[1]
    src_ns, src_ip, src_port = b.static_guest(h2, echo=False)
    b.guest_port(h2, src_ns, src_ip, src_port, 200)
    reach, learned = [], []
    for i in range(reps):
        ns, ip, port = b.static_guest(h1)
        mac = f"52:54:00:7e:00:{i + 1:02x}"
        # The sender knows the address's MAC already (ARP retries every second would
        # otherwise be what is measured): what counts is the frame getting there.
        sh("ip", "neigh", "replace", ip, "lladdr", mac, "dev", "eth0", "nud", "permanent",
           ns=src_ns)
        time.sleep(0.3)  # its echo server listening
        p = probe(src_ns, ip, 5.0)
        time.sleep(0.2)
        t0 = time.monotonic()
        b.guest_port(h1, ns, ip, port, i + 1)
        wait_until(lambda box=h1.box, port=port: box.master_of(port) is not None, 5, 0.002)
        sh("busybox", "arping", "-U", "-c", "1", "-w", "1", "-I", "eth0", "-s", ip, ip,
           ns=ns, check=False)
        if wait_until(lambda mac=mac: remote_mac_seen(h2, mac), 5, 0.002):
            learned.append((time.monotonic() - t0) * 1000)
        out, _ = p.communicate()
        t = first_reply_after(out.splitlines(), t0)
        if t is not None:
            reach.append(t * 1000)
    return summary(reach, 1), summary(learned, 1)


def move(b: Bench, reps: int) -> dict[str, Any]:
    """A guest's port moves h1 -> h2 (and back), the guest sends a gratuitous ARP; until
    a guest on h3 is answered again."""
    h1, h2, h3 = b.fab.hosts[0], b.fab.hosts[1], b.fab.hosts[2]
    src_ns, src_ip, src_port = b.static_guest(h3, echo=False)
    b.guest_port(h3, src_ns, src_ip, src_port, 201)
    ns, ip, port = b.static_guest(h1)
    b.guest_port(h1, ns, ip, port, 100)
    time.sleep(0.3)
    here, there = h1, h2
    times = []
    for _ in range(reps):
        p = probe(src_ns, ip, 6.0)
        assert p.stdout is not None and p.stdout.readline()  # answered before the move
        sh("ip", "link", "set", port, "netns", there.ns, ns=here.ns)
        wait_until(lambda box=there.box: box.master_of(port) is not None, 5, 0.002)
        sh("busybox", "arping", "-U", "-c", "1", "-w", "1", "-I", "eth0", "-s", ip, ip,
           ns=ns, check=False)
        out, _ = p.communicate()
        t = longest_gap([ln for ln in out.splitlines() if ln])
        if t is not None:
            times.append(t * 1000)
        here, there = there, here
        time.sleep(1.0)  # MAC mobility: each move is a new sequence number
    return summary(times, 1)


def cpu_rss(pid: int) -> tuple[float, int]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:"))
    return cpu, rss


def cost(b: Bench) -> dict[str, Any]:
    pids: dict[str, list[int]] = {"kvmnetd": [], "zebra": [], "bgpd": []}
    for h in b.fab.hosts:
        assert h.box.daemon is not None
        pids["kvmnetd"].append(h.box.daemon.pid)
        for name in ("zebra", "bgpd"):
            pid = b.frr[h.name].pid(name)
            assert pid is not None
            pids[name].append(pid)
    before = {k: [cpu_rss(p) for p in v] for k, v in pids.items()}
    time.sleep(10.0)
    after = {k: [cpu_rss(p) for p in v] for k, v in pids.items()}
    out: dict[str, Any] = {}
    for k in pids:
        cpu = [a[0] - b_[0] for a, b_ in zip(after[k], before[k], strict=True)]
        out[k] = {"rss_mib": round(sum(a[1] for a in after[k]) / len(after[k]) / 1024, 1),
                  "cpu_ms_per_10s": round(1000 * sum(cpu) / len(cpu), 1)}
    routes = b.frr["h1"].vtysh("show bgp l2vpn evpn summary json", check=False)
    try:
        out["evpn_prefixes_received_h1"] = sum(
            p.get("pfxRcd", 0) for p in json.loads(routes).get("peers", {}).values())
    except ValueError:
        pass
    return out


def one(count: int, reps: int) -> dict[str, Any]:
    holder: list[Bench] = []
    with fabric(count, "evpn", before_start=lambda h: holder[0].start_frr(h)) as fab:
        b = Bench(fab)
        holder.append(b)
        t0 = time.monotonic()
        fab.start()
        started = time.monotonic() - t0
        ok = wait_until(b.established, 120, 0.1)
        res: dict[str, Any] = {"hosts": count, "start_s": round(started, 2),
                               "sessions_s": round(time.monotonic() - t0, 2) if ok else None}
        log(f"{count} hosts: sessions after {res['sessions_s']} s")
        res["appear_reachable_ms"], res["appear_route_ms"] = appear(b, reps)
        log(f"{count} hosts: appear {res['appear_reachable_ms']} {res['appear_route_ms']}")
        res["move_outage_ms"] = move(b, reps)
        log(f"{count} hosts: move {res['move_outage_ms']}")
        res["per_host"] = cost(b)
        return res


def run(quick: bool, hosts: tuple[int, ...] = (3, 5, 10)) -> dict[str, Any]:
    reps = 3 if quick else 5
    return {"fabrics": [one(n, reps) for n in hosts]}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.evpn", description=__doc__)
    p.add_argument("--hosts", default="3,5,10", help="fabric sizes, comma separated")
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    if os.geteuid() != 0:
        p.error("run as root: the benchmark makes network namespaces")
    doc = {"machine": machine(), "command": " ".join(["python -m bench.evpn", *sys.argv[1:]]),
           "fabrics": [one(int(n), a.reps) for n in a.hosts.split(",")]}
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
