"""A private system-like dbus-daemon with our policy, and a client runner for the bus tests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "dbus" / "kvmnetd.conf"
KVMNETCTL = str(REPO / ".venv" / "bin" / "kvmnetctl")
NOBODY = 65534

BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus.Peer"/>
  </policy>
  <include>{policy}</include>
  {extra}
</busconfig>
"""


@dataclass
class PrivateBus:
    dir: str
    address: str
    pid: int


def open_dir(prefix: str = "kvmnetd-test-") -> str:
    """A new directory in /tmp that other users reach too (dnsmasq, unprivileged clients);
    pytest's tmp_path sits below a 0700 directory."""
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(d, 0o755)
    return d


def start_bus(directory: str, extra_policy: str = "") -> PrivateBus:
    conf = Path(directory) / "bus.conf"
    conf.write_text(BUS_CONF.format(socket=f"{directory}/bus", policy=POLICY, extra=extra_policy))
    out = subprocess.run(
        ["dbus-daemon", f"--config-file={conf}", "--print-address=1", "--print-pid=2", "--fork"],
        capture_output=True, text=True, check=True, timeout=10)
    return PrivateBus(directory, out.stdout.strip().splitlines()[0],
                      int(out.stderr.strip().splitlines()[-1]))


def stop_bus(bus: PrivateBus) -> None:
    try:
        os.kill(bus.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


async def run(*argv: str, user: int | None = None, env: dict[str, str] | None = None,
              stdin: bytes | None = None, timeout: float = 30) -> tuple[int, str, str]:
    """Run a client without blocking the loop that serves it."""
    cmd = list(argv)
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    full_env = {**os.environ, **(env or {})}
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=full_env)
    out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
