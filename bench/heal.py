"""Self-healing: one fault at a time on a converged NAT network with two ports; the time
until it is right again, polled every ~5 ms (median of 5). Netlink state is polled over a
netlink socket in the namespace, nftables with `nft list table`, dnsmasq by its pid file."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from pyroute2 import IPRoute

from bench.common import DAEMON_TOML, Box, attach_rule, log, network_toml, summary
from tests.support.netns import entered, sh

BR, GW, PREFIX = "kvhl0", "10.66.0.1", 24
POLL = 0.005


def run(quick: bool) -> dict[str, Any]:
    reps = 3 if quick else 5
    with Box() as box:
        box.write_config(DAEMON_TOML + network_toml("hl", BR, f"{GW}/{PREFIX}")
                         + attach_rule("hl", "pn*"))
        box.start()
        for p in ("pn1", "pn2"):
            sh("ip", "link", "add", p, "type", "veth", "peer", "name", f"q{p}", ns=box.host)
        box.wait_masters({"pn1": BR, "pn2": BR})
        with entered(box.host):
            ipr = IPRoute()
        try:
            return _faults(box, ipr, reps)
        finally:
            ipr.close()


def _faults(box: Box, ipr: Any, reps: int) -> dict[str, Any]:
    def idx(name: str) -> int | None:
        got = ipr.link_lookup(ifname=name)
        return got[0] if got else None

    def port_ok(name: str = "pn1") -> bool:
        br, p = idx(BR), idx(name)
        if br is None or p is None:
            return False
        return bool(ipr.get_links(p)[0].get("master") == br)

    def addr_ok() -> bool:
        br = idx(BR)
        return br is not None and any(a.get("address") == GW for a in ipr.get_addr(index=br))

    def bridge_ok() -> bool:
        br = idx(BR)
        return (br is not None and bool(ipr.get_links(br)[0]["flags"] & 1) and addr_ok()
                and port_ok("pn1") and port_ok("pn2"))

    def table_ok() -> bool:
        out = sh("nft", "list", "table", "inet", "kvmnetd", ns=box.host, check=False)
        return out.returncode == 0 and "masquerade" in out.stdout

    def dnsmasq_pid() -> int | None:
        try:
            pid = int((box.run_dir / "hl.pid").read_text().strip())
            with open(f"/proc/{pid}/stat") as f:
                return pid if f.read().rsplit(")", 1)[1].split()[0] != "Z" else None
        except (OSError, ValueError):
            return None

    killed: list[int] = []

    def kill_dnsmasq() -> None:
        pid = dnsmasq_pid()
        assert pid is not None
        killed.append(pid)
        os.kill(pid, signal.SIGKILL)

    def dnsmasq_ok() -> bool:
        pid = dnsmasq_pid()
        return pid is not None and pid not in killed

    faults: dict[str, tuple[Callable[[], object], Callable[[], bool]]] = {
        "nft_table_deleted": (lambda: sh("nft", "delete", "table", "inet", "kvmnetd",
                                         ns=box.host), table_ok),
        "ruleset_flushed": (lambda: sh("nft", "flush", "ruleset", ns=box.host), table_ok),
        "bridge_deleted": (lambda: ipr.link("del", index=idx(BR)), bridge_ok),
        "bridge_address_removed": (lambda: ipr.addr("del", index=idx(BR), address=GW,
                                                    prefixlen=PREFIX), addr_ok),
        "port_detached": (lambda: ipr.link("set", index=idx("pn1"), master=0), port_ok),
        "dnsmasq_killed_9": (kill_dnsmasq, dnsmasq_ok),
    }
    out: dict[str, Any] = {"poll_ms": POLL * 1000, "repetitions": reps}
    for name, (fault, ok) in faults.items():
        times: list[float] = []
        for _ in range(reps):
            deadline = time.monotonic() + 10
            while not (ok() and bridge_ok() and table_ok()) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)
            fault()
            t0 = time.perf_counter()
            while not ok():
                if time.perf_counter() - t0 > 15:
                    raise TimeoutError(f"heal: {name} not undone within 15 s")
                time.sleep(POLL)
            times.append((time.perf_counter() - t0) * 1000)
        out[name] = summary(times, 1)
        log(f"heal {name}: median {out[name]['median']} ms")
    return out
