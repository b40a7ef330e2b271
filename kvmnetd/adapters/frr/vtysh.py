"""FRR's own tools, run as child processes: vtysh and frr-reload.py (frr-pythontools)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
from dataclasses import dataclass
from typing import Any

FRR_RUN_DIR = "/var/run/frr"
FRR_RELOAD = "/usr/lib/frr/frr-reload.py"
TIMEOUT = 30.0
NOT_INSTALLED = "FRR is not installed: apt-get install frr frr-pythontools"


@dataclass(frozen=True)
class Result:
    rc: int
    out: str
    err: str

    @property
    def said(self) -> str:
        """What the tool said, for an error message: its last lines."""
        text = (self.err.strip() or self.out.strip()).splitlines()
        return " / ".join(text[-3:]) if text else f"exit status {self.rc}"


class Vtysh:
    """One FRR instance: the host's (pathspace "") or a named pathspace (-N NAME)."""

    def __init__(self, pathspace: str = "", run_dir: str = FRR_RUN_DIR,
                 vtysh: str = "vtysh", reload: str = FRR_RELOAD) -> None:
        self.pathspace = pathspace
        self.run_dir = os.path.join(run_dir, pathspace) if pathspace else run_dir
        self.vtysh = vtysh
        self.reload_tool = reload
        self.calls = 0  # commands that change FRR's configuration

    def _ns(self) -> list[str]:
        return ["-N", self.pathspace] if self.pathspace else []

    def installed(self) -> bool:
        return shutil.which(self.vtysh) is not None and os.path.exists(self.reload_tool)

    def daemons_up(self) -> tuple[bool, bool]:
        """(zebra, bgpd) answer on their vty socket. A daemon that stops removes it; one
        killed leaves it behind, and then nobody accepts a connection on it."""
        return (self._answers("zebra.vty"), self._answers("bgpd.vty"))

    def _answers(self, name: str) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            try:
                s.connect(os.path.join(self.run_dir, name))
            except OSError:
                return False
        return True

    async def _run(self, *argv: str) -> Result:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(TIMEOUT):
                out, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return Result(-1, "", f"{argv[0]} did not answer within {TIMEOUT:.0f} s")
        return Result(proc.returncode or 0, out.decode(errors="replace"),
                      err.decode(errors="replace"))

    async def show(self, command: str) -> Result:
        return await self._run(self.vtysh, *self._ns(), "-c", command)

    async def show_json(self, command: str) -> Any:
        r = await self.show(command)
        if r.rc != 0:
            raise OSError(f"vtysh {command!r}: {r.said}")
        try:
            return json.loads(r.out or "{}")
        except ValueError as e:
            raise OSError(f"vtysh {command!r}: not JSON: {e}") from e

    async def running_config(self) -> Result:
        return await self.show("show running-config")

    async def check_syntax(self, path: str) -> Result:
        """vtysh's dry run: every line parsed against the commands FRR knows."""
        return await self._run(self.vtysh, *self._ns(), "--dryrun", "-f", path)

    async def reload_test(self, path: str, running: str) -> Result:
        """frr-reload.py's dry run against the running config we read: the delta it would
        apply, on stdout."""
        return await self._run(self.reload_tool, *self._ns(), "--test",
                               "--input", running, path)

    async def reload(self, path: str) -> Result:
        self.calls += 1
        return await self._run(self.reload_tool, *self._ns(), "--reload", path)
