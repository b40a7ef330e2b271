"""Real test guests: a Debian kernel + busybox initramfs booted under qemu TCG.

The images come from contrib/guest/build-guest.sh (cached). The guest's /init prints
`KVMNET ...` lines on the serial console and, in hold mode, takes commands there; see
contrib/guest/init for the protocol.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "contrib" / "guest" / "build-guest.sh"
QEMU = "qemu-system-x86_64"
BUILD_IMPOSSIBLE = 3  # build-guest.sh's "cannot be built here" status


class GuestError(RuntimeError):
    pass


@functools.cache
def _build() -> tuple[str, str] | str:
    outdir = Path(os.environ.get("KVMNETD_GUEST_DIR")
                  or Path.home() / ".cache" / "kvmnetd-guest")
    r = subprocess.run(["bash", str(BUILD_SCRIPT), str(outdir)], capture_output=True, text=True,
                       timeout=900)
    if r.returncode == BUILD_IMPOSSIBLE:
        reason = (r.stderr.strip().splitlines() or ["build-guest.sh gave no reason"])[-1]
        return f"guest images cannot be built here: {reason}"
    if r.returncode != 0:
        raise GuestError(f"build-guest.sh failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return str(outdir / "vmlinux"), str(outdir / "initrd.img")


def guest_images() -> tuple[str, str]:
    """(kernel, initrd), built once and cached; skips if guests cannot boot here."""
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} not installed (apt-get install --no-install-recommends "
                    "qemu-system-x86)")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("/dev/net/tun missing: qemu cannot create tap devices")
    result = _build()
    if isinstance(result, str):
        pytest.skip(result)
    return result


def wait_for_link(ns: str | None, name: str, timeout: float = 10) -> None:
    """Poll until interface `name` exists (e.g. the tap qemu creates itself with script=no)."""
    path = f"/sys/class/net/{name}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ns is None:
            if os.path.exists(path):
                return
        else:
            # /sys shows the caller's namespace; ask inside the target one instead.
            r = subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "show", name],
                               capture_output=True)
            if r.returncode == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"link {name} did not appear in {ns or 'this namespace'} within {timeout}s")


def _parse_fields(line: str) -> dict[str, str]:
    return dict(w.split("=", 1) for w in line.split()[2:] if "=" in w)


class Guest:
    """A running qemu process under TCG, its serial console on stdin/stdout."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes]):
        self.name = name
        self.proc = proc
        self.started = time.monotonic()
        self.transcript: list[str] = []  # every console line, for failure messages
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"guest-{name}", daemon=True)
        self._reader.start()

    @classmethod
    def boot(cls, name: str, ns: str | None, tap: str, mac: str, ifup: str | None = None,
             ifdown: str | None = None, hold: bool = True, hostname: str | None = None,
             extra_append: str = "", pings: Sequence[str] = (), wait: int | None = None,
             dhcp: bool = True, memory: int = 256,
             images: tuple[str, str] | None = None,
             env: dict[str, str] | None = None) -> Guest:
        kernel, initrd = images or guest_images()
        # A throwaway test guest: no speculation workarounds, crypto self-tests or TSC checks.
        # Together they take ~0.5 s off a ~3.3 s boot under TCG.
        append = ["console=ttyS0", "quiet", "panic=-1", "mitigations=off", "cryptomgr.notests",
                  "tsc=reliable", "no_timer_check"]
        if hold:
            append.append("kvmnet.hold=1")
        if hostname:
            append.append(f"kvmnet.hostname={hostname}")
        if pings:
            append.append("kvmnet.ping=" + ",".join(pings))
        if wait is not None:
            append.append(f"kvmnet.wait={wait}")
        if not dhcp:
            append.append("kvmnet.nodhcp=1")
        if extra_append:
            append.append(extra_append)
        argv = [
            QEMU, "-name", name, "-accel", "tcg", "-cpu", "max", "-machine", "q35",
            "-m", str(memory), "-smp", "1", "-no-reboot", "-nodefaults",
            "-display", "none", "-monitor", "none", "-serial", "stdio",
            "-kernel", kernel, "-initrd", initrd, "-append", " ".join(append),
            "-netdev", f"tap,id=n0,ifname={tap},script={ifup or 'no'},downscript={ifdown or 'no'}",
            "-device", f"virtio-net-pci,netdev=n0,mac={mac},romfile=",
        ]
        if ns is not None:
            # `ip netns exec` execs qemu, so the pid we hold is qemu's own.
            argv = ["ip", "netns", "exec", ns, *argv]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **env} if env else None)
        return cls(name, proc)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            # Kernel output may leave a partial line before ours: take KVMNET from where it starts.
            at = line.find("KVMNET ")
            if at > 0:
                line = line[at:]
            self.transcript.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def _tail(self, n: int = 30) -> str:
        return "\n".join(self.transcript[-n:])

    def wait_for(self, prefix: str, timeout: float) -> str:
        """Read console lines until one starts with `prefix`; earlier lines are dropped."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"guest {self.name}: no {prefix!r} within {timeout}s; console:\n"
                                   f"{self._tail()}")
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self._lines.put(None)  # later callers must see the end too
                raise GuestError(f"guest {self.name}: qemu exited ({self.proc.poll()}) before "
                                 f"{prefix!r}; console:\n{self._tail()}")
            if line.startswith(prefix):
                return line

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()

    def lease(self, timeout: float = 20) -> dict[str, str]:
        """The next lease line (the boot-time one first; call renew() for a fresh one)."""
        fields = _parse_fields(self.wait_for("KVMNET lease ", timeout))
        if fields.get("ok") != "1":
            raise GuestError(f"guest {self.name}: no DHCP lease; console:\n{self._tail()}")
        return fields

    def renew(self, timeout: float = 20) -> dict[str, str]:
        """Run DHCP again now (e.g. after its port moved to another network)."""
        self.send("lease")
        return self.lease(timeout)

    def ping(self, ip: str, timeout: float = 10) -> bool:
        # The guest keeps retrying for `wait` seconds; leave it room to answer before we give up.
        wait = max(1, int(timeout) - 2)
        self.send(f"ping {ip} {wait}")
        line = self.wait_for(f"KVMNET ping target={ip} ", timeout)
        return _parse_fields(line).get("ok") == "1"

    def run(self, command: str, timeout: float = 10) -> tuple[int, list[str]]:
        """Run a shell command in the guest; (exit status, output lines)."""
        mark = len(self.transcript)
        self.send(f"run {command}")
        line = self.wait_for("KVMNET run rc=", timeout)
        end = len(self.transcript) - 1
        out = [ln for ln in self.transcript[mark:end] if not ln.startswith("KVMNET ")]
        return int(line.rsplit("=", 1)[1]), out

    def stop(self, timeout: float = 5) -> None:
        """Power off; kill if it does not go. Always reaps qemu."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.send("poweroff")
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        # qemu is gone, so its stdout reaches EOF and the reader ends on its own.
        self._reader.join(5)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def libvirt_guest_xml(name: str, nic: str, console: Path, images: tuple[str, str],
                      ping: str = "10.0.0.254") -> str:
    """A libvirt domain booting the tiny guest with one NIC (`nic`: an <interface> element);
    it leases, pings `ping` and says so on the serial console file."""
    kernel, initrd = images
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel><initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 mitigations=off kvmnet.hold=1 kvmnet.hostname={name}
      kvmnet.ping={ping}</cmdline>
  </os>
  <cpu mode='custom'><model>qemu64</model></cpu>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {nic}
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>"""


def console_lease(console: Path) -> dict[str, str] | None:
    """The lease a libvirt_guest_xml guest reported on its console, once it has."""
    if not console.exists():
        return None
    for line in console.read_text(errors="replace").splitlines():
        if line.startswith("KVMNET lease ok=1"):
            return dict(f.split("=", 1) for f in line.split()[2:] if "=" in f)
    return None
