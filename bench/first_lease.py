"""From a stopped NAT network to a fresh MAC's first DHCP lease in a guest namespace.

kvmnetd: `kvmnetctl network start` of a defined, not autostarted network, the guest's
veth attached by an [[attach]] rule, udhcpc. Also with ping_check = true (dnsmasq
without --no-ping). libvirt: `virsh net-start`, `ip link set ... master virbrN up`,
udhcpc. The article: qemu-natup (makes the bridge, iptables, dnsmasq, attaches), udhcpc.
The same client everywhere: busybox udhcpc sending a DISCOVER each second. The slow
baselines (timer bound) run their repetitions concurrently, each in its own namespaces.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import (
    DAEMON_TOML,
    REPO,
    Box,
    article_agent,
    attach_rule,
    fresh_mac,
    log,
    median,
    network_toml,
    r,
    summary,
    udhcpc_argv,
    write_udhcpc_script,
)
from tests.support.libvirtd import Libvirtd
from tests.support.netns import netns, sh, veth_into

NATUP = str(REPO / "bench" / "baseline" / "qemu-natup")
GOAL_S = 0.5
GOAL_RATIO = 0.07


def _lease(ns: str, script: str, tries: int) -> str:
    out = subprocess.run(udhcpc_argv(ns, script, tries), capture_output=True, text=True,
                         timeout=tries + 30)
    ip = [ln[3:] for ln in out.stdout.splitlines() if ln.startswith("ip=")]
    if not ip:
        raise RuntimeError(f"no lease in {ns}: {out.stderr[-300:]}")
    return ip[0]


def kvmnetd_side(runs: int, script: str, quick: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"ping_check": None}  # --quick skips it
    with Box() as box:
        box.write_config(DAEMON_TOML
                         + network_toml("fl", "kvfl0", "10.63.0.1/24", autostart=False)
                         + network_toml("fp", "kvfp0", "10.64.0.1/24", autostart=False,
                                        ping_check=True)
                         + attach_rule("fl", "fl*") + attach_rule("fp", "fp*"))
        box.start()
        for net in ("fl",) if quick else ("fl", "fp"):
            total, start = [], []
            for i in range(runs):
                g = box.guest(f"{net}{i}", mac=fresh_mac(i, 0x10 if net == "fl" else 0x11))
                t0 = time.perf_counter()
                box.ctl("network", "start", net)
                t1 = time.perf_counter()
                _lease(g, script, 30)
                t2 = time.perf_counter()
                total.append(t2 - t0)
                start.append(t1 - t0)
                box.ctl("network", "stop", net)
                sh("ip", "link", "del", f"{net}{i}", ns=box.host)
                time.sleep(0.2)
            key = "no_ping" if net == "fl" else "ping_check"
            out[key] = {"total_s": summary(total, 3), "network_start_s": summary(start, 3)}
            log(f"first_lease kvmnetd {key}: median {median(total):.3f} s")
    return out


def libvirt_side(runs: int, script: str, results: dict[str, Any]) -> None:
    base = Path(tempfile.mkdtemp(prefix="kvmnetd-bench-lv-"))
    try:
        with netns("lv") as ns, contextlib.ExitStack() as stack:
            lv = Libvirtd(ns, base)
            stack.callback(lv.stop)
            results["libvirtd_start_s"] = r(lv.start(), 2)
            guests = []
            for k in range(runs):
                xml = base / f"net{k}.xml"
                xml.write_text(
                    f"<network><name>bl{k}</name><forward mode='nat'/>"
                    f"<bridge name='virbr7{k}' stp='on' delay='0'/>"
                    f"<ip address='10.70.{k}.1' netmask='255.255.255.0'><dhcp>"
                    f"<range start='10.70.{k}.10' end='10.70.{k}.250'/></dhcp></ip></network>")
                lv.virsh("net-define", str(xml))
                g = stack.enter_context(netns("lg"))
                veth_into(ns, g, f"lvp{k}", "eth0")
                sh("ip", "link", "set", "eth0", "address", fresh_mac(k, 0x20), ns=g)
                guests.append(g)
            times: list[float] = [0.0] * runs
            split: list[float] = [0.0] * runs

            def one(k: int) -> None:
                t0 = time.perf_counter()
                lv.virsh("net-start", f"bl{k}")
                split[k] = time.perf_counter() - t0
                sh("ip", "link", "set", f"lvp{k}", "master", f"virbr7{k}", "up", ns=ns)
                _lease(guests[k], script, 60)
                times[k] = time.perf_counter() - t0

            _concurrently(one, runs)
            rules = sh("iptables-save", ns=ns).stdout.count("\n-A ")
            results["libvirt"] = {"total_s": summary(times, 3),
                                  "net_start_s": summary(split, 3),
                                  "iptables_rules_for_runs_networks": rules}
            log(f"first_lease libvirt: median {median(times):.3f} s")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def article_side(runs: int, script: str, results: dict[str, Any]) -> None:
    with contextlib.ExitStack() as stack:
        envs = []
        for k in range(runs):
            a = stack.enter_context(netns("fa"))
            g = stack.enter_context(netns("fg"))
            veth_into(a, g, "vnet1", "eth0")
            sh("ip", "link", "set", "eth0", "address", fresh_mac(k, 0x30), ns=g)
            agent = article_agent(a)
            stack.callback(agent.close)
            envs.append((agent, g))
        times: list[float] = [0.0] * runs

        def one(k: int) -> None:
            agent, g = envs[k]
            t0 = time.perf_counter()
            agent.run([NATUP, "vnet1"])
            _lease(g, script, 90)
            times[k] = time.perf_counter() - t0

        _concurrently(one, runs)
        results["article"] = {"total_s": summary(times, 3)}
        log(f"first_lease article: median {median(times):.3f} s")


def _concurrently(fn: Any, n: int) -> None:
    errors: list[BaseException] = []

    def wrap(k: int) -> None:
        try:
            fn(k)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def run(quick: bool) -> dict[str, Any]:
    runs = 3 if quick else 5
    slow_runs = 3
    tmp = Path(tempfile.mkdtemp(prefix="kvmnetd-bench-fl-"))
    try:
        script = write_udhcpc_script(tmp)
        slow: dict[str, Any] = {}
        errors: dict[str, str] = {}

        def side(name: str, fn: Any) -> None:
            try:
                fn(slow_runs, script, slow)
            except Exception as e:
                errors[name] = f"{type(e).__name__}: {e}"
                log(f"first_lease {name} failed: {e}")

        # The timer-bound baselines run in the background while kvmnetd is measured after.
        bg = [threading.Thread(target=side, args=("libvirt", libvirt_side)),
              threading.Thread(target=side, args=("article", article_side))]
        for t in bg:
            t.start()
        for t in bg:
            t.join()
        ours = kvmnetd_side(runs, script, quick)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res: dict[str, Any] = {"kvmnetd": ours, **slow, "errors": errors,
                           "client": "busybox udhcpc -T 1 (a DISCOVER each second)"}
    k = ours["no_ping"]["total_s"]["median"]
    lv = slow.get("libvirt", {}).get("total_s", {}).get("median")
    art = slow.get("article", {}).get("total_s", {}).get("median")
    res["ratio_vs_libvirt"] = r(k / lv, 4) if lv else None
    res["ratio_vs_article"] = r(k / art, 4) if art else None
    if ours["ping_check"]:
        res["ping_check_cost_s"] = r(ours["ping_check"]["total_s"]["median"] - k, 3)
    res["goal_s"], res["goal_ratio_vs_libvirt"] = GOAL_S, GOAL_RATIO
    res["goal_met"] = k < GOAL_S and lv is not None and k / lv <= GOAL_RATIO
    return res
