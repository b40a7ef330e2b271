"""A whole testbed in namespaces: a "host" running kvmnetd, an upstream router, guests.

host ns: uplink0 198.51.100.1/24, default route via the upstream router.
upstream ns: eth0 198.51.100.2/24, 203.0.113.1/32 on lo (a far host), a UDP echo
server that answers with the source address it saw. It has no route to guest
subnets, so a reply reaching a NAT guest proves the masquerade.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.support.netns import netns, sh, veth_into

UPSTREAM_IP = "198.51.100.2"
FAR_HOST = "203.0.113.1"
HOST_UPLINK_IP = "198.51.100.1"
ECHO_PORT = 9999
PY = "/usr/bin/python3"

# One socket per address (UDP, and TCP for busybox nc in guests): a reply must leave
# from the address the guest asked, or
# conntrack cannot match it to the masqueraded flow.
ECHO_SERVER = f"""
import select, socket
udp, tcp = [], []
for addr in ("{UPSTREAM_IP}", "{FAR_HOST}"):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, {ECHO_PORT}))
    udp.append(s)
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind((addr, {ECHO_PORT}))
    t.listen(16)
    tcp.append(t)
while True:
    for s in select.select(udp + tcp, [], [])[0]:
        if s in udp:
            data, peer = s.recvfrom(512)
            s.sendto(peer[0].encode(), peer)
        else:
            conn, peer = s.accept()
            conn.sendall(peer[0].encode() + b"\\n")
            conn.close()
"""

UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    echo "ip=$ip"; echo "mask=$mask"; echo "router=$router"; echo "dns=$dns"
    echo "domain=$domain";;
esac
"""

ECHO_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(float(sys.argv[3]))
for _ in range(3):
    s.sendto(b"who am i", (sys.argv[1], int(sys.argv[2])))
    try:
        print(s.recvfrom(512)[0].decode()); break
    except socket.timeout:
        continue
else:
    sys.exit(1)
"""


class Sandbox:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.stack = contextlib.ExitStack()
        self.daemon: subprocess.Popen[str] | None = None
        self.notify: socket.socket | None = None
        self.notes: list[str] = []
        self.run_dir = tmp / "run"
        self.state_dir = tmp / "lib"
        self.config = tmp / "kvmnetd.toml"
        self.networks_dir = tmp / "networks.d"
        self.log = tmp / "kvmnetd.log"

    def __enter__(self) -> Sandbox:
        try:
            self.host = self.stack.enter_context(netns("h"))
            self.upstream = self.stack.enter_context(netns("u"))
            veth_into(self.host, self.upstream, "uplink0", "eth0", f"{UPSTREAM_IP}/24")
            sh("ip", "addr", "add", f"{HOST_UPLINK_IP}/24", "dev", "uplink0", ns=self.host)
            sh("ip", "link", "set", "uplink0", "up", ns=self.host)
            sh("ip", "route", "add", "default", "via", UPSTREAM_IP, ns=self.host)
            sh("ip", "addr", "add", f"{FAR_HOST}/32", "dev", "lo", ns=self.upstream)
            echo = subprocess.Popen(["ip", "netns", "exec", self.upstream, PY, "-c", ECHO_SERVER])
            self.stack.callback(_reap, echo)
            self.stack.callback(self.kill_daemon)
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None and self.log.exists():
            sys.stderr.write(f"--- kvmnetd log ---\n{self.log.read_text()[-6000:]}\n")
        self.stack.close()

    # ---- guests ------------------------------------------------------------------------

    def guest(self, port: str, address: str | None = None, gateway: str | None = None,
              mac: str | None = None) -> str:
        """A guest namespace whose eth0 is cabled to `port` (a veth left in the host ns)."""
        ns = self.stack.enter_context(netns("g"))
        veth_into(self.host, ns, port, "eth0")
        if mac:
            sh("ip", "link", "set", "eth0", "address", mac, ns=ns)
        if address:
            sh("ip", "addr", "add", address, "dev", "eth0", ns=ns)
        if gateway:
            sh("ip", "route", "add", "default", "via", gateway, ns=ns)
        return ns

    def dhcp(self, ns: str, *extra: str) -> dict[str, str]:
        """Run busybox udhcpc in a guest: the lease's fields, or {} without one."""
        script = self.tmp / "udhcpc.sh"
        if not script.exists():
            script.write_text(UDHCPC_SCRIPT)
            script.chmod(0o755)
        r = sh("busybox", "udhcpc", "-i", "eth0", "-q", "-n", "-f", "-t", "5", "-T", "1",
               "-s", str(script), *extra, ns=ns, check=False)
        return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)

    def source_seen_by_upstream(self, ns: str, target: str = FAR_HOST,
                                timeout: float = 1.0) -> str | None:
        r = sh(PY, "-c", ECHO_CLIENT, target, str(ECHO_PORT), str(timeout), ns=ns, check=False)
        return r.stdout.strip() if r.returncode == 0 else None

    # ---- the daemon --------------------------------------------------------------------

    def write_config(self, text: str) -> None:
        self.config.write_text(text)
        self.networks_dir.mkdir(exist_ok=True)

    def argv(self, *extra: str) -> list[str]:
        # Without a file, the default path (absent on test hosts): the built-in network.
        config = ["--config", str(self.config)] if self.config.exists() else []
        return [sys.executable, "-m", "kvmnetd", *config,
                "--networks-dir", str(self.networks_dir), "--run-dir", str(self.run_dir),
                "--state-dir", str(self.state_dir), *extra]

    def start_daemon(self, *extra: str, timeout: float = 30, env: dict[str, str] | None = None,
                     wrap: list[str] | None = None) -> subprocess.Popen[str]:
        """Start kvmnetd in the host namespace; `wrap` goes before it (e.g. setpriv ...)."""
        notify_path = str(self.tmp / "notify.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(notify_path)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(notify_path)
        full_env = {**os.environ, "NOTIFY_SOCKET": notify_path, **(env or {})}
        logf = open(self.log, "a")
        self.daemon = subprocess.Popen(["ip", "netns", "exec", self.host, *(wrap or []),
                                        *self.argv(*extra)],
                                       env=full_env, stdout=logf, stderr=logf, text=True)
        logf.close()
        self.wait_notify("READY=1", timeout)
        return self.daemon

    def wait_notify(self, what: str, timeout: float = 20) -> str:
        assert self.notify is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.daemon is not None and self.daemon.poll() is not None:
                raise AssertionError(f"kvmnetd exited with {self.daemon.returncode}:\n"
                                     f"{self.log.read_text()[-4000:]}")
            self.notify.settimeout(0.2)
            try:
                msg = self.notify.recv(4096).decode()
            except TimeoutError:
                continue
            self.notes.append(msg)
            if what in msg:
                return msg
        raise AssertionError(f"no {what!r} from kvmnetd within {timeout}s; got {self.notes}:\n"
                             f"{self.log.read_text()[-4000:]}")

    def stop_daemon(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        assert self.daemon is not None
        self.daemon.send_signal(sig)
        rc = self.daemon.wait(timeout)
        self.daemon = None
        return rc

    def kill_daemon(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.kill()
            self.daemon.wait(5)
        self.daemon = None

    def cli_argv(self) -> list[str]:
        return [sys.executable, "-m", "kvmnetd.cli", "--socket", str(self.run_dir / "control.sock")]

    def ctl(self, *args: str, check: bool = True, user: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        """kvmnetctl over the control socket, in the host namespace (optionally as `user`)."""
        prefix = (["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups"]
                  if user else [])
        return subprocess.run(["ip", "netns", "exec", self.host, *prefix, *self.cli_argv(), *args],
                              capture_output=True, text=True, check=check, timeout=30)

    def ctl_out(self, *args: str) -> str:
        return self.ctl(*args).stdout

    def jctl(self, *args: str) -> Any:
        return json.loads(self.ctl(*args, "--json").stdout)

    def master_of(self, ifname: str) -> str | None:
        """The bridge `ifname` is enslaved to in the host namespace (None: none, or no such)."""
        out = sh("ip", "-o", "link", "show", ifname, ns=self.host, check=False).stdout
        m = re.search(r" master (\S+)", out)
        return m.group(1) if m else None

    def link_table(self) -> list[tuple[int, str, str | None]]:
        links = json.loads(sh("ip", "-j", "link", ns=self.host).stdout)
        return [(lk["ifindex"], lk["ifname"], lk.get("master")) for lk in links]

    def nft(self) -> str:
        return sh("nft", "list", "ruleset", ns=self.host).stdout


def wait_until(pred: Any, timeout: float = 5.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            return value
        time.sleep(interval)


def _reap(p: subprocess.Popen[Any]) -> None:
    if p.poll() is None:
        p.kill()
    p.wait(5)
