"""qemu ifup hook wall time, one tap, the network already up: contrib/qemu-ifup as a host
runs it (the control socket through kvmnet-hook, the C client scripts/setup builds), the
same script where only the bus is reachable (dbus-send), the article's qemu-natup, and a
bare `ip link set` script. Runs interleaved (the order rotates every round); each spawned
by an agent in its namespace."""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

from bench.common import (
    DAEMON_TOML,
    REPO,
    VENV_BIN,
    Agent,
    Box,
    article_agent,
    attach_rule,
    log,
    median,
    network_toml,
    r,
    summary,
)
from tests.support.dbus import open_dir, start_bus, stop_bus
from tests.support.netns import netns, sh

IFUP = str(REPO / "contrib" / "qemu-ifup")
NATUP = str(REPO / "bench" / "baseline" / "qemu-natup")
BARE = '#!/bin/sh\nip link set "$1" master isolationbr up\n'
GOAL_RATIO = 0.2


PORT_NETS = 10  # the networks that hold the --ports background ports


def run(quick: bool, ports: int = 0) -> dict[str, Any]:
    runs = 30
    scratch = open_dir("kvmnetd-bus-")
    bus = start_bus(scratch)
    try:
        with Box() as box, netns("a") as art_ns:
            return _run(box, art_ns, bus.address, runs, ports)
    finally:
        stop_bus(bus)
        shutil.rmtree(scratch, ignore_errors=True)


def _run(box: Box, art_ns: str, bus_address: str, runs: int, ports: int) -> dict[str, Any]:
    conf = DAEMON_TOML + network_toml("hk", "kvhk0", "10.62.0.1/24")
    if ports:
        # Guests already running: a hook's cost must not grow with them.
        for i in range(PORT_NETS):
            conf += network_toml(f"bg{i}", f"kvbg{i}", f"10.63.{i}.1/24", dhcp=False)
            conf += attach_rule(f"bg{i}", f"bg{i}-*")
    box.write_config(conf)
    box.start(bus=bus_address)
    if ports:
        taps = {f"bg{j % PORT_NETS}-{j:04d}": f"kvbg{j % PORT_NETS}" for j in range(ports)}
        box.batch(f"tuntap add dev {t} mode tap" for t in taps)
        box.wait_masters(taps, timeout=300)
    bare = box.tmp / "bare-ifup"
    bare.write_text(BARE)
    bare.chmod(0o755)
    path = f"{VENV_BIN}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    env_bus = {"DBUS_SYSTEM_BUS_ADDRESS": bus_address, "KVMNET_NETWORK": "hk", "PATH": path}
    env_sock = {"KVMNETD_SOCKET": str(box.run_dir / "control.sock"), "KVMNET_NETWORK": "hk",
                "PATH": path}
    ours = Agent(["ip", "netns", "exec", box.host])
    art = article_agent(art_ns)
    try:
        art.run(["ip", "tuntap", "add", "dev", "vnet0", "mode", "tap"])
        first = art.run([NATUP, "vnet0"])["ms"]
        variants: list[tuple[str, Agent, list[str], dict[str, str], str | None]] = [
            ("kvmnetd_dbus", ours, [IFUP], env_bus, "kvhk0"),
            ("kvmnetd_socket", ours, [IFUP], env_sock, "kvhk0"),
            ("article_natup", art, [NATUP], {}, "isolationbr"),
            ("bare_sh", art, [str(bare)], {}, "isolationbr"),
            ("spawn_true", ours, ["/bin/true"], {}, None),
        ]
        times: dict[str, list[float]] = {v[0]: [] for v in variants}
        for i in range(runs):
            k = i % len(variants)
            for name, agent, argv, env, bridge in variants[k:] + variants[:k]:
                if bridge is None:
                    times[name].append(agent.run(argv, env)["ms"])
                    continue
                tap = f"hb{i:02d}{name[:3]}{name[-2:]}"
                agent.run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"])
                times[name].append(agent.run([*argv, tap], env)["ms"])
                if i == 0:
                    _check_master(box.host if agent is ours else art_ns, tap, bridge)
                agent.run(["ip", "link", "del", tap])
                time.sleep(0.03)
            if i % 10 == 9:
                log(f"hook: {i + 1}/{runs} rounds")
        masq = sh("iptables", "-t", "nat", "-S", "POSTROUTING", ns=art_ns).stdout.count("MASQ")
    finally:
        ours.close()
        art.close()
    med = {k: median(v) for k, v in times.items()}
    # The goal is on the hook as installed: the daemon always serves its socket.
    ratio = med["kvmnetd_socket"] / med["article_natup"]
    return {
        "runs_each": runs,
        "background_ports": ports,
        "ms": {k: summary(v) for k, v in times.items()},
        "article_natup_first_guest_ms": r(first),
        "ratio_dbus_vs_article": r(med["kvmnetd_dbus"] / med["article_natup"], 3),
        "ratio_socket_vs_article": r(med["kvmnetd_socket"] / med["article_natup"], 3),
        "ratio_bare_sh_vs_article": r(med["bare_sh"] / med["article_natup"], 3),
        "article_masquerade_rules_after_runs": masq,
        "goal_ratio": GOAL_RATIO, "goal_met": ratio <= GOAL_RATIO,
    }


def _check_master(ns: str, tap: str, bridge: str) -> None:
    out = sh("ip", "-o", "link", "show", tap, ns=ns).stdout
    if f"master {bridge}" not in out:
        raise RuntimeError(f"hook left {tap} unattached: {out.strip()}")
