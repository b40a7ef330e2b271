"""A private libvirtd for tests: own network namespace, own mount namespace, all state in a tmp dir.

The host's /run, /var and /etc/libvirt are never written: inside `unshare -m` fresh tmpfs mounts
cover /run and /var and the tmp dir's folders are bound over libvirt's paths. Only the qemu
capability cache is kept between runs (~/.cache/kvmnetd-libvirt-cache): without it the first
connection waits ~8 s for the capability probe.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.netns import netns, sh

LIBVIRTD = "/usr/sbin/libvirtd"
CACHE = Path(os.environ.get("KVMNETD_LIBVIRT_CACHE")
             or Path.home() / ".cache" / "kvmnetd-libvirt-cache")

LIBVIRTD_CONF = """\
listen_tcp = 0
listen_tls = 0
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:stderr"
"""

QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""

# Runs as `sh -c` inside the new mount namespace; $1 is the state dir, $2 the cache dir.
_MOUNTS = """\
set -e
mount -t tmpfs -o mode=0755 kvmnet-run /run
mount -t tmpfs -o mode=0755 kvmnet-var /var
ln -s /run /var/run
mkdir -m 1777 /var/tmp
mkdir -p /run/libvirt /var/lib/libvirt /var/log/libvirt /var/cache/libvirt
mount --bind "$1/run" /run/libvirt
mount --bind "$1/lib" /var/lib/libvirt
mount --bind "$1/log" /var/log/libvirt
mount --bind "$2" /var/cache/libvirt
mount --bind "$1/etc" /etc/libvirt
exec "$3" --pid-file "$1/libvirtd.pid" --config /etc/libvirt/libvirtd.conf
"""


def libvirt_missing() -> str | None:
    """Why a private libvirtd cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in (LIBVIRTD, "virsh", "qemu-system-x86_64", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    try:
        import libvirt  # noqa: F401
        import libvirtaio  # noqa: F401
    except ImportError:
        return "libvirt-python not installed (pip install libvirt-python)"
    if subprocess.run(["getent", "passwd", "libvirt-qemu"], capture_output=True).returncode:
        return "libvirtd refuses to start without a libvirt-qemu user"
    return None


class Libvirtd:
    """One libvirtd; `stop()` + `start()` restarts it on the same socket and state."""

    def __init__(self, ns: str, base: Path) -> None:
        self.ns = ns
        self.base = base
        self.socket = str(base / "run" / "libvirt-sock")
        self.uri = f"qemu:///system?socket={self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None
        for sub in ("run", "lib", "log", "etc"):
            (base / sub).mkdir(exist_ok=True)
        (base / "etc" / "libvirtd.conf").write_text(LIBVIRTD_CONF)
        (base / "etc" / "qemu.conf").write_text(QEMU_CONF)
        CACHE.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 90) -> float:
        """Start and wait until it answers; returns the seconds that took."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        t0 = time.monotonic()
        log = open(self.base / "libvirtd.log", "ab")
        with log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, "unshare", "-m", "--propagation", "private",
                 "sh", "-c", _MOUNTS, "mounts", str(self.base), str(CACHE), LIBVIRTD],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"libvirtd exited ({self.proc.returncode}):\n{self.log_tail()}")
            if os.path.exists(self.socket) and self.virsh("list", check=False,
                                                          timeout=timeout).returncode == 0:
                return time.monotonic() - t0
            time.sleep(0.05)
        raise TimeoutError(f"libvirtd did not answer within {timeout}s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Stop libvirtd only; its guests keep running (as on a real host)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def virsh(self, *args: str, check: bool = True, timeout: float = 60,
              input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["virsh", "-q", "-c", self.uri, *args], check=check,
                              capture_output=True, text=True, timeout=timeout, input=input)

    def create(self, xml: str) -> None:
        """`virsh create` of a transient domain."""
        path = self.base / f"dom-{time.monotonic_ns()}.xml"
        path.write_text(xml)
        r = self.virsh("create", str(path), check=False)
        if r.returncode != 0:
            raise RuntimeError(f"virsh create failed: {r.stderr.strip()}\n{self.log_tail()}")

    def sh(self, *cmd: str) -> str:
        """A command in libvirtd's network namespace (its guests' taps live there)."""
        return sh(*cmd, ns=self.ns).stdout

    def qemu_pid(self, domain: str) -> int:
        return int((self.base / "run" / "qemu" / f"{domain}.pid").read_text())

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.base / "libvirtd.log").read_text().splitlines()[-lines:])
        except OSError:
            return ""


@contextlib.contextmanager
def private_libvirtd(started: bool = True, ns: str | None = None) -> Iterator[Libvirtd]:
    """A libvirtd (started unless asked not to); stopped with everything in its namespace,
    even on failure. `ns`: run in that (existing) namespace instead of a new one."""
    reason = libvirt_missing()
    if reason:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="kvmnetd-libvirtd-"))
    os.chmod(base, 0o755)
    try:
        with (contextlib.nullcontext(ns) if ns else netns("lv")) as ns:
            daemon = Libvirtd(ns, base)
            try:
                if started:
                    daemon.start()
                yield daemon
            finally:
                daemon.stop()
                # netns() then kills every process left in the namespace: the guests' qemus.
    finally:
        shutil.rmtree(base, ignore_errors=True)


def domain_xml(name: str, interfaces: str, memory_mib: int = 64) -> str:
    """A guest that boots nothing: it sits in the BIOS under TCG, which is all the tests need."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {interfaces}
    <memballoon model='none'/>
  </devices>
</domain>"""


def ethernet_nic(tap: str, mac: str) -> str:
    return (f"<interface type='ethernet'><target dev='{tap}' managed='no'/>"
            f"<mac address='{mac}'/><model type='virtio'/><rom enabled='no'/></interface>")


def bridge_nic(bridge: str, mac: str) -> str:
    return (f"<interface type='bridge'><source bridge='{bridge}'/>"
            f"<mac address='{mac}'/><model type='virtio'/><rom enabled='no'/></interface>")
