"""Install on a fresh Debian 12 and boot it with a real systemd: the README's path, end to end.

One container for the whole module, checked step by step in file order: install (with the
host's network, for apt and pip only), boot (private network), the service and its
network, the bus, a DHCP lease, the journal, reload and restart, an in-place upgrade
that writes nothing, a reboot that brings it all back, and the man page.

KVMNETD_SYSTEM_SRC names another source tree to install (default: this checkout).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.container import FIGURES, Booted, image_tar, nspawn_run, remove_tree, unpack

pytestmark = [pytest.mark.slow, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
SRC = Path(os.environ.get("KVMNETD_SYSTEM_SRC", str(REPO)))
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"
# The host's trust store, for pip behind an intercepting proxy; install steps only.
INSTALL_ENV = {"PIP_CERT": "/host-ca.crt", "SSL_CERT_FILE": "/host-ca.crt",
               "REQUESTS_CA_BUNDLE": "/host-ca.crt", "PIP_DEFAULT_TIMEOUT": "120"}

UDHCPC = """#!/bin/sh
case "$1" in bound|renew)
    ip addr add "$ip/$mask" dev "$interface"; echo "ip=$ip";;
esac
"""


@dataclass
class System:
    root: Path
    work: Path
    box: Booted
    next_src: Path
    facts: dict[str, Any] = field(default_factory=dict)
    boots: int = 0

    def sh(self, *cmd: str, check: bool = True, timeout: float = 60) -> str:
        return self.box.sh(*cmd, check=check, timeout=timeout).stdout

    def ctl_json(self, *args: str) -> Any:
        # --bus: the real system bus, not the control socket.
        return json.loads(self.sh("kvmnetctl", "--bus", *args, "--json"))

    def journal(self, *args: str) -> list[dict[str, Any]]:
        out = self.sh("journalctl", "-u", "kvmnetd", "-o", "json", "--no-pager", *args)
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def boot(self) -> None:
        self.box.start()
        state = self.box.wait_running()
        failed = self.sh("systemctl", "--failed", "--no-legend", "--plain")
        print(f"system state after boot: {state}; failed units: {failed.strip() or 'none'}")
        assert self.wait_active(), self.sh("systemctl", "status", "kvmnetd", check=False)
        self.boots += 1
        FIGURES.append(f"boot {self.boots}: systemd start to kvmnetd READY "
                       f"{boot_to_ready(self):.3f} s; system {state}")

    def wait_active(self) -> bool:
        r = self.box.sh("systemctl", "is-active", "kvmnetd", check=False)
        return r.stdout.strip() == "active"


def boot_to_ready(s: System) -> float:
    """From systemd's start in the container to kvmnetd's READY (Type=notify: active)."""
    start = int(s.sh("systemctl", "show", "-p", "UserspaceTimestampMonotonic", "--value"))
    ready = int(s.sh("systemctl", "show", "-p", "ActiveEnterTimestampMonotonic", "--value",
                     "kvmnetd"))
    return (ready - start) / 1e6


def copy_tree(src: Path, dst: Path) -> None:
    """The files git knows (tracked and new), as a clean source tree."""
    files = subprocess.run(["git", "-C", str(src), "ls-files", "-co", "--exclude-standard", "-z"],
                           capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        rel = name.decode()
        if (src / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst / rel)


def bump_version(tree: Path) -> str:
    """A newer version string everywhere the version is stated in the tree."""
    init = tree / "kvmnetd" / "__init__.py"
    old = re.search(r'__version__ = "([^"]+)"', init.read_text())
    assert old, init
    new = f"{old.group(1)}.post1"
    for path in (init, tree / "pyproject.toml"):
        text = path.read_text().replace(f'"{old.group(1)}"', f'"{new}"')
        path.write_text(text)
    return new


def install(root: Path, src: Path) -> str:
    r = nspawn_run(root, "/src/scripts/install", env=INSTALL_ENV, binds={str(src): "/src"},
                   ro_binds={HOST_CA: "/host-ca.crt"})
    assert r.returncode == 0, f"scripts/install failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def system() -> Iterator[System]:
    tar = image_tar()
    work = Path(tempfile.mkdtemp(prefix="kvmnetd-systest-", dir="/var/tmp"))
    root = unpack(tar)
    box = Booted(root, work / "console.log")
    try:
        # Copies, as a user's own checkout would be: the install may build in its tree.
        src, next_src = work / "src", work / "next"
        copy_tree(SRC, src)
        copy_tree(SRC, next_src)
        sysobj = System(root, work, box, next_src)
        sysobj.facts["next_version"] = bump_version(next_src)
        t = time.monotonic()
        print(install(root, src)[-2000:])
        FIGURES.append(f"install (apt and pip from the network): {time.monotonic() - t:.1f} s")
        # The README: enable the unit, unless the install did.
        enabled = nspawn_run(root, "systemctl", "is-enabled", "kvmnetd")
        if enabled.stdout.strip() != "enabled":
            r = nspawn_run(root, "systemctl", "enable", "kvmnetd")
            assert r.returncode == 0, r.stderr
        # Seen by the booted system, for the in-place upgrade.
        box.extra = [f"--bind={next_src}:/src-next", f"--bind-ro={HOST_CA}:/host-ca.crt"]
        sysobj.boot()
        yield sysobj
    finally:
        box.kill()
        remove_tree(root)
        shutil.rmtree(work, ignore_errors=True)


def test_kvmnetd_is_active_with_the_default_network_up(system: System) -> None:
    state = system.ctl_json("status")
    nets = {n["name"]: n for n in state["networks"]}
    assert "default" in nets, state
    net = nets["default"]
    assert net["state"] == "active", net
    bridge, address = net["bridge"], net["addresses"][0]
    addrs = json.loads(system.sh("ip", "-j", "addr", "show", bridge))
    have = {f"{a['local']}/{a['prefixlen']}" for a in addrs[0]["addr_info"]}
    assert address in have, addrs
    assert "table inet kvmnetd" in system.sh("nft", "list", "tables")
    # dnsmasq runs in the unit's own cgroup (KillMode=process keeps it across restarts).
    # Read from each process: the container's cgroup layout (v2 or hybrid) follows the host.
    cgroup = system.sh("systemctl", "show", "-p", "ControlGroup", "--value", "kvmnetd").strip()
    assert cgroup.endswith("/kvmnetd.service"), cgroup
    pids = system.sh("pidof", "dnsmasq").split()
    assert pids
    for pid in pids:
        lines = system.sh("cat", f"/proc/{pid}/cgroup").splitlines()
        assert any(line.endswith(f":{cgroup}") for line in lines), lines
    user = system.sh("ps", "-o", "user=", "-C", "dnsmasq").split()
    assert user == ["kvmnetd-dnsmasq"], user
    system.facts.update(bridge=bridge, address=address,
                        ifindex=addrs[0]["ifindex"], version=state["version"])


def test_status_line_and_the_bus_name(system: System) -> None:
    status = system.sh("systemctl", "show", "-p", "StatusText", "--value", "kvmnetd").strip()
    assert re.fullmatch(r"\d+ networks up, \d+ ports, 0 degraded", status), status
    owner = system.sh("busctl", "status", "org.kvmnetd.Kvmnetd1", check=False)
    assert "kvmnetd.service" in owner, owner


def test_an_attached_veth_gets_a_lease_from_the_range(system: System) -> None:
    sh = system.sh
    sh("ip", "link", "add", "sysg0", "type", "veth", "peer", "name", "sysg0p")
    sh("ip", "netns", "add", "guest")
    sh("ip", "link", "set", "sysg0p", "netns", "guest")
    sh("ip", "netns", "exec", "guest", "ip", "link", "set", "sysg0p", "up")
    sh("kvmnetctl", "--bus", "port", "attach", "sysg0", "default")
    sh("ip", "link", "set", "sysg0", "up")
    sh("sh", "-c", f"printf '%s' '{UDHCPC}' > /root/udhcpc.sh && chmod 755 /root/udhcpc.sh")
    out = sh("ip", "netns", "exec", "guest", "busybox", "udhcpc", "-i", "sysg0p", "-q", "-n",
             "-f", "-t", "10", "-T", "1", "-s", "/root/udhcpc.sh", timeout=60)
    m = re.search(r"ip=(\S+)", out)
    assert m, out
    ip = ipaddress.ip_address(m.group(1))
    assert ip in ipaddress.ip_interface(system.facts["address"]).network
    assert ip != ipaddress.ip_interface(system.facts["address"]).ip
    leases = system.ctl_json("leases", "default")
    assert any(x["ip"] == str(ip) for x in leases), leases
    owner = sh("stat", "-c", "%U:%G %a", "/var/lib/kvmnetd/default.leases").strip()
    assert owner == "kvmnetd-dnsmasq:root 664", owner
    ports = system.ctl_json("port", "list")
    assert any(p["ifname"] == "sysg0" and p["state"] == "attached" for p in ports), ports
    # STATUS= followed the port.
    status = sh("systemctl", "show", "-p", "StatusText", "--value", "kvmnetd")
    assert ", 1 ports," in status, status
    system.facts["lease"] = str(ip)


def test_the_journal_carries_structured_fields(system: System) -> None:
    entries = system.journal()
    fields = [e for e in entries if e.get("NETWORK") == "default" and e.get("EVENT")]
    assert fields, entries[-5:]
    assert any(e.get("EVENT") == "daemon.ready" and "WRITES" in e for e in entries)
    assert not any(e.get("EVENT") == "log.journal_unavailable" for e in entries)


def _ready_events(system: System) -> list[dict[str, Any]]:
    return [e for e in system.journal() if e.get("EVENT") == "daemon.ready"]


def _snapshot(system: System) -> tuple[str, str]:
    links = json.loads(system.sh("ip", "-j", "-d", "link"))
    for lk in links:
        for k in ("stats64", "stats", "operstate", "linkinfo"):
            lk.pop(k, None)
    return system.sh("nft", "list", "ruleset"), json.dumps(links, sort_keys=True)


def test_reload_and_restart_keep_it_active_and_the_bridge(system: System) -> None:
    before = _snapshot(system)
    system.sh("systemctl", "reload", "kvmnetd")
    assert system.wait_active()
    n = len(_ready_events(system))
    system.sh("systemctl", "restart", "kvmnetd")
    assert system.wait_active()
    ready = _ready_events(system)
    assert len(ready) > n and ready[-1]["WRITES"] == "0", ready[-1]
    links = json.loads(system.sh("ip", "-j", "link", "show", system.facts["bridge"]))
    assert links[0]["ifindex"] == system.facts["ifindex"]
    assert _snapshot(system) == before
    # The guest kept its port across the restart.
    ports = system.ctl_json("port", "list")
    assert any(p["ifname"] == "sysg0" and p["state"] == "attached" for p in ports), ports


def test_an_upgrade_in_place_writes_nothing(system: System) -> None:
    before = _snapshot(system)
    n = len(_ready_events(system))
    # The guest leased above pings its gateway all through the upgrade.
    assert "lease" in system.facts, "needs the leased guest of the test above"
    dnsmasq = system.sh("pgrep", "-x", "dnsmasq").split()
    gateway = ipaddress.ip_interface(system.facts["address"]).ip
    system.sh("sh", "-c", f"ip netns exec guest busybox ping -q -i 0.2 {gateway} "
              "> /root/upgrade-ping.log 2>&1 & echo $! > /root/upgrade-ping.pid")
    # The install of a newer version, in the running system, with the host's network for
    # apt and pip only: every namespace of the container but its network.
    argv = ["nsenter", "-t", str(system.box.pid), "-m", "-u", "-i", "-p", "-C", "-r", "-w",
            "env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8",
            *(f"{k}={v}" for k, v in INSTALL_ENV.items()),
            # The version is stamped in the tree too, for installs that read it from there.
            f"KVMNETD_VERSION={system.facts['next_version']}", "/src-next/scripts/install"]
    t = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"upgrade failed:\n{r.stdout}\n{r.stderr}"
    FIGURES.append(f"upgrade in place: {time.monotonic() - t:.1f} s")
    if len(_ready_events(system)) == n:  # the install did not restart it: the README does
        system.sh("systemctl", "restart", "kvmnetd")
    assert system.wait_active()
    time.sleep(1.0)
    system.sh("sh", "-c", "kill -INT $(cat /root/upgrade-ping.pid)")
    time.sleep(0.5)
    log = system.sh("cat", "/root/upgrade-ping.log")
    m = re.search(r"(\d+) packets transmitted, (\d+) packets received", log)
    assert m, log
    sent, got = int(m.group(1)), int(m.group(2))
    FIGURES.append(f"guest pinging through the upgrade: {got} of {sent} answered")
    # The interrupt may fall between a request and its reply: at most that one is missing.
    assert sent > 20 and got >= sent - 1, log
    status = system.ctl_json("status")
    assert status["version"] == system.facts["next_version"]
    # The new daemon adopted the running dnsmasq (the unit gives it no CAP_SYS_PTRACE to
    # look into dnsmasq's namespace): same process, network not degraded.
    assert system.sh("pgrep", "-x", "dnsmasq").split() == dnsmasq
    assert [n["state"] for n in status["networks"]] == ["active"], status["networks"]
    ready = _ready_events(system)
    assert ready[-1]["WRITES"] == "0", ready[-1]
    assert _snapshot(system) == before


def test_a_reboot_brings_everything_back(system: System) -> None:
    nets = {n["name"]: (n["bridge"], n["addresses"], n["state"])
            for n in system.ctl_json("status")["networks"]}
    system.box.poweroff()
    system.boot()
    assert {n["name"]: (n["bridge"], n["addresses"], n["state"])
            for n in system.ctl_json("status")["networks"]} == nets
    addrs = json.loads(system.sh("ip", "-j", "addr", "show", system.facts["bridge"]))
    assert system.facts["address"] in {f"{a['local']}/{a['prefixlen']}"
                                       for a in addrs[0]["addr_info"]}
    assert "table inet kvmnetd" in system.sh("nft", "list", "tables")
    leases = system.ctl_json("leases", "default")
    assert any(x["ip"] == system.facts["lease"] for x in leases), leases


def test_man_kvmnetctl_renders(system: System) -> None:
    r = system.box.sh("env", "MANPAGER=cat", "MANWIDTH=80", "man", "kvmnetctl", check=False)
    assert r.returncode == 0, r.stderr
    assert "kvmnetctl" in r.stdout and "NAME" in r.stdout, r.stdout[:500]


def test_a_state_dir_outside_the_units_paths_is_refused_with_the_reason(system: System) -> None:
    conf = "/etc/kvmnetd/kvmnetd.toml"
    assert system.box.sh("test", "-e", conf, check=False).returncode != 0
    system.sh("sh", "-c", f"printf '[daemon]\\nstate_dir = \"/srv/kvmnetd\"\\n' > {conf}")
    try:
        r = system.box.sh("systemctl", "restart", "kvmnetd", check=False, timeout=120)
        assert r.returncode != 0
        text = system.sh("journalctl", "-u", "kvmnetd", "-n", "50", "--no-pager", "-o", "cat")
        assert (f"{conf}:2: state_dir: /srv/kvmnetd is not writable (Read-only file system); "
                "kvmnetd.service may write only its ReadWritePaths") in text, text[-2000:]
    finally:
        system.sh("rm", "-f", conf)
        system.sh("systemctl", "reset-failed", "kvmnetd", check=False)
        system.sh("systemctl", "start", "kvmnetd", timeout=120)
    assert system.wait_active()
    # The networks were left running while it was down; the new start adopts them.
    assert _ready_events(system)[-1]["WRITES"] == "0"
