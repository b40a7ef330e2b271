"""FRR's zebra and bgpd (and bfdd) for one simulated host: started inside its namespace
with a pathspace of their own (-N), as the frr service would on a real host, and
stopped (bgpd first: zebra removes EVPN entries as it stops) and cleaned away after."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.netns import sh
from tests.support.rig import wait_until

FRR_BIN = Path("/usr/lib/frr")
FRR_RUN = Path("/var/run/frr")
FRR_ETC = Path("/etc/frr")
ORDER = ("bfdd", "bgpd", "zebra")  # the order they stop in


def frr_installed() -> bool:
    return (FRR_BIN / "bgpd").exists() and (FRR_BIN / "frr-reload.py").exists()


@dataclass
class FrrDaemons:
    ns: str
    pathspace: str
    bfd: bool = False

    @property
    def run_dir(self) -> Path:
        return FRR_RUN / self.pathspace

    def daemons(self) -> tuple[str, ...]:
        return ("zebra", "bgpd", "bfdd") if self.bfd else ("zebra", "bgpd")

    def start(self, only: tuple[str, ...] | None = None) -> None:
        for d in (self.run_dir, FRR_ETC / self.pathspace):
            d.mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "frr", "frr")
        conf = FRR_ETC / self.pathspace / "vtysh.conf"
        if not conf.exists():
            conf.write_text("service integrated-vtysh-config\n")
        for name in only or self.daemons():
            # A killed daemon left its socket and pid file: the new one replaces them.
            sh(str(FRR_BIN / name), "-N", self.pathspace, "-d", ns=self.ns)
            assert wait_until(lambda n=name: self.pid(n) is not None
                              and (self.run_dir / f"{n}.vty").exists(), 10), name

    def pid(self, name: str) -> int | None:
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            pid = int((self.run_dir / f"{name}.pid").read_text())
            os.kill(pid, 0)
            return pid
        return None

    def stop(self, only: tuple[str, ...] | None = None, sig: int = signal.SIGTERM) -> None:
        for name in ORDER:
            if only is not None and name not in only:
                continue
            pid = self.pid(name)
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.pid(name) is not None:
                time.sleep(0.05)
            if self.pid(name) is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        shutil.rmtree(FRR_ETC / self.pathspace, ignore_errors=True)

    def vtysh(self, *commands: str, check: bool = True) -> str:
        argv = ["vtysh", "-N", self.pathspace]
        for c in commands:
            argv += ["-c", c]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=check)
        return r.stdout

    def running_config(self) -> str:
        return self.vtysh("show running-config")

    def configure(self, *lines: str) -> None:
        """Lines written by hand, as an operator would with vtysh."""
        self.vtysh("configure terminal", *lines)
