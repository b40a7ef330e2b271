"""Shared pieces: the daemon in a sandbox, a netlink listener, a timing agent, statistics."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import queue
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tests.support.netns import sh
from tests.support.rig import Sandbox

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
KVMNETCTL = str(VENV_BIN / "kvmnetctl")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(*parts: object) -> None:
    print("[bench]", *parts, file=sys.stderr, flush=True)


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def pct(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


def r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def summary(xs: Sequence[float], nd: int = 2) -> dict[str, Any]:
    return {"median": r(median(xs), nd), "min": r(min(xs), nd), "max": r(max(xs), nd),
            "n": len(xs)}


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"nproc": os.cpu_count(), "kernel": platform.release(), "cpu": model,
            "python": platform.python_version(), "loadavg_at_start": os.getloadavg()[0]}


def network_toml(name: str, bridge: str, ipv4: str, *, dhcp: bool = True, dns: bool = False,
                 autostart: bool = True, ping_check: bool = False) -> str:
    net = ipv4.rsplit(".", 1)[0]
    out = [f"[network.{name}]", 'mode = "nat"', f'bridge = "{bridge}"', f'ipv4 = "{ipv4}"']
    if not autostart:
        out.append("autostart = false")
    if dhcp:
        out += [f"[network.{name}.dhcp]", f'ranges = ["{net}.10-{net}.250"]']
        if ping_check:
            out.append("ping_check = true")
    out += [f"[network.{name}.dns]", f"enabled = {'true' if dns else 'false'}"]
    return "\n".join(out) + "\n"


def attach_rule(network: str, ifname: str) -> str:
    return f'[[attach]]\nnetwork = "{network}"\nifname = "{ifname}"\n'


DAEMON_TOML = '[daemon]\nlibvirt_uri = ""\n'


def drain_notify(sock: Any) -> threading.Event:
    """Read a daemon's NOTIFY_SOCKET in a thread, as systemd does (kvmnetd's sendto blocks
    when it is full), until the returned event is set or the socket closes."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return

    threading.Thread(target=loop, daemon=True).start()
    return stop


class Box(Sandbox):
    """The tests' Sandbox (host + upstream namespaces, the real daemon) with bench helpers."""

    def __init__(self) -> None:
        tmp = Path(tempfile.mkdtemp(prefix="kvmnetd-bench-"))
        tmp.chmod(0o755)  # dnsmasq runs as nobody and reads its files here
        super().__init__(tmp)
        # The run dir on a tmpfs, as /run/kvmnetd is under systemd: owned.json is rewritten
        # after changes, and a rename on this machine's disk costs more than the write.
        self.run_dir.mkdir(mode=0o755)
        sh("mount", "-t", "tmpfs", "-o", "mode=0755,size=64m", "kvmnetd-bench-run",
           str(self.run_dir))

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)
        finally:
            sh("umount", "-l", str(self.run_dir), check=False)
            shutil.rmtree(self.tmp, ignore_errors=True)

    @property
    def pid(self) -> int:
        assert self.daemon is not None
        return self.daemon.pid

    def rss_mb(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def cpu_s(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime

    def batch(self, lines: Iterable[str]) -> None:
        sh("ip", "-batch", "-", ns=self.host, input="\n".join(lines) + "\n", timeout=120)

    def timed_start(self, *extra: str, env: dict[str, str] | None = None,
                    timeout: float = 120) -> float:
        """Seconds from spawning the daemon to READY=1 on NOTIFY_SOCKET."""
        t0 = time.perf_counter()
        self.start(*extra, env=env, timeout=timeout)
        return time.perf_counter() - t0

    def start(self, *extra: str, env: dict[str, str] | None = None, timeout: float = 120,
              bus: str | None = None) -> None:
        """The daemon, on a private bus or on none (never the host's)."""
        more = ["--bus-address", bus] if bus else ["--no-bus"]
        self._drain_stop.set()
        self.start_daemon(*more, *extra, env=env, timeout=timeout)
        # Keep reading NOTIFY_SOCKET as systemd does: kvmnetd's sendto blocks when it is full.
        self._drain_stop = drain_notify(self.notify)

    _drain_stop = threading.Event()

    def ready_writes(self) -> int:
        lines = [ln for ln in self.log.read_text().splitlines() if "daemon.ready" in ln]
        m = re.search(r"writes=(\d+)", lines[-1])
        assert m, lines[-1]
        return int(m.group(1))

    def masters(self) -> dict[str, str | None]:
        links = json.loads(sh("ip", "-j", "link", ns=self.host, timeout=60).stdout)
        return {lk["ifname"]: lk.get("master") for lk in links}

    def wait_masters(self, want: dict[str, str], timeout: float = 120) -> float:
        t0 = time.perf_counter()
        while True:
            have = self.masters()
            if all(have.get(i) == b for i, b in want.items()):
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout:
                bad = [i for i, b in want.items() if have.get(i) != b][:5]
                raise TimeoutError(f"ports not attached: {bad}")
            time.sleep(0.1)

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([KVMNETCTL, "--socket", str(self.run_dir / "control.sock"), *args],
                              capture_output=True, text=True, check=check, timeout=60)


class Watch:
    """bench/nlwatch.py inside a namespace; collects its attach records.

    It runs ahead of ordinary tasks (nice -10): it is the clock, and netlink gives no
    kernel timestamps, so it must read each message as soon as it is sent. It only reads
    and stamps during a burst, which takes little CPU from what it measures.
    """

    def __init__(self, ns: str, prefix: str, bridges: Sequence[str]) -> None:
        self.proc = subprocess.Popen(
            ["nice", "-n", "-10", "ip", "netns", "exec", ns, sys.executable, "-m",
             "bench.nlwatch", prefix, ",".join(bridges)],
            stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line == "ready", line
        self.q: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.q.put(json.loads(line))

    def wait(self, names: Iterable[str], timeout: float = 30) -> dict[str, tuple[float, float]]:
        """{name: (seen, up)} once every name is attached and up."""
        want = set(names)
        got: dict[str, tuple[float, float]] = {}
        deadline = time.monotonic() + timeout
        while want - got.keys():
            try:
                rec = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"not attached: {sorted(want - got.keys())[:5]}") from None
            if rec["n"] in want:
                got[rec["n"]] = (rec["seen"], rec["up"])
        return got

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(5)


ARTICLE_WRAP = 'mount -t tmpfs kvmnetd-bench-run /run && exec "$0" "$@"'


class Agent:
    """bench/agent.py started under `prefix` (e.g. ip netns exec NS unshare ...)."""

    def __init__(self, prefix: Sequence[str]) -> None:
        self.proc = subprocess.Popen([*prefix, sys.executable, str(REPO / "bench" / "agent.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=REPO)

    def run(self, argv: Sequence[str], env: dict[str, str] | None = None,
            check: bool = True) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"argv": list(argv), "env": env or {}}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"agent died running {argv}")
        rep: dict[str, Any] = json.loads(line)
        if check and rep["rc"] != 0:
            raise RuntimeError(f"{argv} exited {rep['rc']}: {rep['err']}")
        return rep

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def article_agent(ns: str) -> Agent:
    """An agent in `ns` inside its own PID + mount namespace, /run a private tmpfs: the
    article's `ps -ef | grep dnsmasq` sees only its own dnsmasq, its files stay there."""
    return Agent(["ip", "netns", "exec", ns, "unshare", "-m", "-p", "-f", "--mount-proc",
                  "sh", "-c", ARTICLE_WRAP])


UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in bound|renew) echo "ip=$ip" ;; esac
"""


def udhcpc_argv(ns: str, script: str, tries: int = 60) -> list[str]:
    """busybox udhcpc in a guest namespace, the same client for every side: a DISCOVER
    each second, exit with the first lease."""
    return ["ip", "netns", "exec", ns, "busybox", "udhcpc", "-i", "eth0", "-q", "-n", "-f",
            "-t", str(tries), "-T", "1", "-s", script]


def write_udhcpc_script(directory: Path) -> str:
    path = directory / "udhcpc.sh"
    path.write_text(UDHCPC_SCRIPT)
    path.chmod(0o755)
    return str(path)


def fresh_mac(i: int, tag: int = 0) -> str:
    salt = (os.getpid() + int(time.time())) & 0xFF
    return f"52:54:{tag:02x}:{salt:02x}:{(i >> 8) & 0xFF:02x}:{i & 0xFF:02x}"


def stack(pid: int) -> str:
    """The daemon's Python stack (py-spy dump), for a report when it hangs."""
    spy = VENV_BIN / "py-spy"
    if not spy.exists():
        return "(py-spy not installed)"
    out = subprocess.run([str(spy), "dump", "--pid", str(pid)], capture_output=True, text=True,
                         timeout=30)
    return " | ".join(ln.strip() for ln in out.stdout.splitlines() if "(" in ln)[:1500]
