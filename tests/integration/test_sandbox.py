"""The daemon under the unit's own sandbox: its capability set, read-only paths, STATUS=.

The other integration tests run the daemon as full root. Here it runs with the unit's
CapabilityBoundingSet (no CAP_DAC_OVERRIDE, no CAP_FOWNER), as systemd starts it, so
every file it or dnsmasq writes must work through owners and modes alone.
"""

from __future__ import annotations

import os
import pwd
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kvmnetd.adapters.dirs import UNIT_WRITABLE
from kvmnetd.model.desired import Settings
from tests.support.netns import sh
from tests.support.rig import Sandbox, wait_until
from tests.support.toml import attach_toml, network_toml

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "kvmnetd.service"

NET = (network_toml("nat", "nat", "kvsb0", "10.53.0.1/24", dhcp_range="10.53.0.100-10.53.0.150")
       + attach_toml("nat", ifname="sb*"))


def unit_capabilities() -> list[str]:
    caps: list[str] = []
    for line in UNIT.read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            caps += line.split("=", 1)[1].split()
    return caps


def as_the_unit() -> list[str]:
    """setpriv with the unit's bounding set: root keeps only those capabilities."""
    caps = ",".join("+" + c.removeprefix("CAP_").lower() for c in unit_capabilities())
    return ["setpriv", f"--bounding-set=-all,{caps}", "--inh-caps=-all"]


def test_the_unit_grants_no_dac_override() -> None:
    # What the tests below rely on: the unit's root cannot bypass file modes.
    caps = unit_capabilities()
    assert "CAP_NET_ADMIN" in caps and "CAP_CHOWN" in caps
    assert "CAP_DAC_OVERRIDE" not in caps and "CAP_FOWNER" not in caps


def test_what_the_code_assumes_of_the_unit_is_what_it_ships() -> None:
    unit = UNIT.read_text()
    m = re.search(r"^ReadWritePaths=(.*)$", unit, re.M)
    assert m and tuple(m.group(1).split()) == UNIT_WRITABLE
    sysusers = (REPO / "systemd/sysusers.d/kvmnetd.conf").read_text()
    assert re.search(rf"^u {Settings().dnsmasq_user} ", sysusers, re.M), sysusers


@pytest.mark.integration
def test_guest_gets_a_lease_under_the_units_capabilities(box: Sandbox) -> None:
    box.write_config(NET)
    # A lease file as an older version left it: nobody's, mode 0644.
    box.state_dir.mkdir()
    old = box.state_dir / "nat.leases"
    old.write_text("")
    nobody = pwd.getpwnam("nobody")
    os.chown(old, nobody.pw_uid, nobody.pw_gid)
    old.chmod(0o644)
    g = box.guest("sb1")
    box.start_daemon("--no-bus", wrap=as_the_unit(), env={"INVOCATION_ID": "0" * 32})
    # Really without DAC_OVERRIDE: the daemon's bounding set, as the kernel sees it.
    assert box.daemon is not None
    # (ip netns exec and setpriv exec, so the pid we started is the daemon's.)
    status = Path(f"/proc/{box.daemon.pid}/status").read_text()
    assert "kvmnetd" in Path(f"/proc/{box.daemon.pid}/cmdline").read_text()
    bounding = int(re.search(r"CapBnd:\s+(\w+)", status).group(1), 16)  # type: ignore[union-attr]
    assert bounding & (1 << 1) == 0  # CAP_DAC_OVERRIDE is bit 1
    lease = box.dhcp(g)
    assert lease.get("ip", "").startswith("10.53.0."), box.log.read_text()[-3000:]
    user = pwd.getpwnam("kvmnetd-dnsmasq")
    st = old.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (user.pw_uid, 0, 0o664)
    assert lease["ip"] in old.read_text()
    # The daemon reads it back (group root) and reports the network healthy.
    assert wait_until(lambda: any(x["ip"] == lease["ip"] for x in box.jctl("leases", "nat")))
    nets = box.jctl("network", "list")
    assert nets[0]["state"] == "active", nets
    assert "Permission denied" not in box.log.read_text()


@pytest.mark.integration
def test_a_missing_dnsmasq_user_is_named(box: Sandbox) -> None:
    box.write_config('[daemon]\ndnsmasq_user = "kvmnetd-nosuchuser"\n' + NET)
    box.start_daemon("--no-bus")
    net = box.jctl("network", "show", "nat")
    assert net["state"] == "degraded", net
    assert "'kvmnetd-nosuchuser' does not exist" in net["reason"], net
    assert "dnsmasq_user" in net["reason"]


def _status(box: Sandbox, pattern: str) -> str:
    return box.wait_notify(pattern, timeout=20)


@pytest.mark.integration
def test_status_follows_ports_and_degradation(box: Sandbox) -> None:
    box.write_config(NET)
    box.start_daemon("--no-bus")
    assert "STATUS=1 networks up, 0 ports, 0 degraded" in box.notes[-1]
    box.guest("sb1")
    _status(box, "STATUS=1 networks up, 1 ports, 0 degraded")
    sh("ip", "link", "del", "sb1", ns=box.host)
    _status(box, "STATUS=1 networks up, 0 ports, 0 degraded")
    # dnsmasq keeps dying: after six deaths within 30 s the network is degraded.
    pid_file = box.run_dir / "nat.pid"
    seen: set[int] = set()
    for _ in range(6):
        pid = wait_until(lambda: _new_pid(pid_file, seen), timeout=10)
        assert pid, box.log.read_text()[-3000:]
        seen.add(pid)
        os.kill(pid, signal.SIGKILL)
    _status(box, "STATUS=0 networks up, 0 ports, 1 degraded")
    # Sent only on change: no repeats of the same line while nothing changes.
    box.notes.clear()
    box.ctl("network", "list")
    with pytest.raises(AssertionError):
        box.wait_notify("STATUS=", timeout=1.5)


def _new_pid(path: Path, seen: set[int]) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    if pid in seen:
        return None
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None
    return pid if comm == "dnsmasq" else None


@pytest.mark.integration
def test_a_state_dir_the_unit_cannot_write_is_refused_at_start(box: Sandbox) -> None:
    """ProtectSystem=strict makes every path outside ReadWritePaths read-only."""
    ro = box.tmp / "elsewhere"
    ro.mkdir()
    box.write_config(f'[daemon]\nstate_dir = "{ro}"\n' + NET)
    argv = [sys.executable, "-m", "kvmnetd", "--config", str(box.config),
            "--networks-dir", str(box.networks_dir), "--run-dir", str(box.run_dir), "--no-bus"]
    mount_ro = 'mount --bind -o ro "$0" "$0" && exec "$@"'
    r = subprocess.run(["ip", "netns", "exec", box.host, "unshare", "-m", "--propagation",
                        "private", "sh", "-c", mount_ro, str(ro), *as_the_unit(), *argv],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "INVOCATION_ID": "0" * 32})
    assert r.returncode == 1, r.stderr
    assert re.search(rf"{re.escape(str(box.config))}:2: state_dir: {re.escape(str(ro))} "
                     r"is not writable \(Read-only file system\)", r.stderr), r.stderr
    assert "ReadWritePaths (/run/kvmnetd /var/lib/kvmnetd /etc/kvmnetd/networks.d)" in r.stderr
    # Nothing was set up before the refusal.
    assert "kvsb0" not in sh("ip", "-o", "link", ns=box.host).stdout
