"""A Debian 12 system booted by a real systemd in a container, for the install and boot test.

The root file system comes from mmdebstrap and is cached as a tar keyed on its package
list. Install steps run with `systemd-nspawn` without `-b` (host network, for apt and pip
only); the booted system always gets `--private-network`. Commands reach the booted
system with `nsenter` into the namespaces of its init.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

# Measurements the tests report; pytest prints them in its summary (conftest.py).
FIGURES: list[str] = []
CACHE_DIR = Path("/var/cache/kvmnetd-test")
SUITE = "bookworm"
# What the test itself needs in the image, beyond what the install brings: a booting
# systemd and its bus, ip netns, busybox's udhcpc, and man to read a page.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "iproute2", "python3", "busybox",
            "man-db", "ca-certificates", "procps")


def image_tar() -> Path:
    """The cached root tar, built once per package list (about 45 s)."""
    key = hashlib.sha256(f"{SUITE}\n{' '.join(sorted(PACKAGES))}".encode()).hexdigest()[:12]
    tar = CACHE_DIR / f"{SUITE}-{key}.tar"
    if tar.exists():
        return tar
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    part = CACHE_DIR / f"{tar.stem}.part{os.getpid()}.tar"
    try:
        subprocess.run(["mmdebstrap", "--variant=minbase", "--format=tar",
                        f"--include={','.join(PACKAGES)}",
                        # Smaller and faster to unpack; copyright files stay.
                        "--dpkgopt=path-exclude=/usr/share/doc/*",
                        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
                        SUITE, str(part)], check=True, capture_output=True, text=True,
                       timeout=900)
        part.rename(tar)
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
    return tar


def unpack(tar: Path, parent: str = "/var/tmp") -> Path:
    root = Path(tempfile.mkdtemp(prefix="kvmnetd-sys-", dir=parent))
    subprocess.run(["tar", "-C", str(root), "-xpf", str(tar)], check=True)
    # The container gets a machine id of its own (first boot otherwise runs firstboot logic).
    (root / "etc/machine-id").write_text(hashlib.md5(str(root).encode()).hexdigest() + "\n")
    return root


def nspawn_run(root: Path, *cmd: str, binds: dict[str, str] | None = None,
               ro_binds: dict[str, str] | None = None, env: dict[str, str] | None = None,
               timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run a command in the tree without booting it, with the host's network (install steps)."""
    argv = ["systemd-nspawn", "-q", "-D", str(root), "--register=no", "--keep-unit",
            "--resolv-conf=copy-host"]
    for src, dst in (binds or {}).items():
        argv.append(f"--bind={src}:{dst}")
    for src, dst in (ro_binds or {}).items():
        argv.append(f"--bind-ro={src}:{dst}")
    for k, v in (env or {}).items():
        argv.append(f"--setenv={k}={v}")
    return subprocess.run([*argv, *cmd], capture_output=True, text=True, timeout=timeout)


class Booted:
    """One boot of the tree: `systemd-nspawn -b --private-network` in the background."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.extra: list[str] = []  # more nspawn options, e.g. --bind-ro=...

    def __enter__(self) -> Booted:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def start(self) -> None:
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "-D", str(self.root), "-b", "--private-network",
             "--register=no", "--keep-unit", "--console=pipe", *self.extra],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True)
        logf.close()
        self.pid = self._find_init()

    def _find_init(self, timeout: float = 60) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"nspawn exited {self.proc.returncode}:\n{self.tail()}")
            kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            with contextlib.suppress(OSError):
                for pid in kids.read_text().split():
                    comm = Path(f"/proc/{pid}/comm").read_text().strip()
                    if comm == "systemd":
                        return int(pid)
            time.sleep(0.1)
        raise AssertionError(f"no init in the container after {timeout} s:\n{self.tail()}")

    def tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def sh(self, *cmd: str, check: bool = True, timeout: float = 60,
           input: str | None = None) -> subprocess.CompletedProcess[str]:
        """A command inside the booted system (all its namespaces, its root)."""
        argv = ["nsenter", "-t", str(self.pid), "-a", "env", "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "TERM=dumb", *cmd]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
        return r

    def wait_running(self, timeout: float = 120) -> str:
        """`systemctl is-system-running --wait`: running, or degraded (some unit failed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # Until systemd's private socket exists, systemctl cannot even ask.
            r = self.sh("systemctl", "is-system-running", "--wait", check=False,
                        timeout=timeout)
            state = r.stdout.strip()
            if state in ("running", "degraded", "stopping", "offline"):
                return state
            time.sleep(0.2)
        raise AssertionError(f"the container did not finish booting:\n{self.tail()}")

    def poweroff(self, timeout: float = 60) -> None:
        """A clean shutdown from inside; the nspawn process exits when systemd is done."""
        assert self.proc is not None
        self.sh("systemctl", "poweroff", "--no-block", check=False)
        try:
            self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # SIGTERM to nspawn asks the container to shut down; SIGKILL if it lingers.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None


def remove_tree(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
