"""contrib/qemu-ifup and qemu-ifdown through kvmnet-hook, the C client of the control
socket that scripts/setup builds next to them (and the package installs)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.netns import sh
from tests.support.rig import Sandbox
from tests.support.toml import network_toml

pytestmark = pytest.mark.integration

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"
HOOK = CONTRIB / "kvmnet-hook"


def run(box: Sandbox, argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "KVMNET_HOOK": str(HOOK),
            "KVMNETD_SOCKET": str(box.run_dir / "control.sock")}
    envs = [f"{k}={v}" for k, v in {**base, **env}.items()]
    return subprocess.run(["ip", "netns", "exec", box.host, "env", "-i", *envs, *argv],
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def started(box: Sandbox) -> Sandbox:
    assert HOOK.exists(), "scripts/setup builds contrib/kvmnet-hook"
    box.write_config(network_toml("hk", "nat", "kvhk0", "10.64.0.1/24", dns=False, dhcp=False))
    box.start_daemon("--no-bus")
    return box


def test_ifup_attaches_and_ifdown_detaches_through_the_socket(started: Sandbox) -> None:
    box = started
    sh("ip", "tuntap", "add", "dev", "hk0", "mode", "tap", ns=box.host)
    up = run(box, [str(CONTRIB / "qemu-ifup"), "hk0"], KVMNET_NETWORK="hk")
    assert up.returncode == 0, up.stderr
    # Attached when the hook returns: qemu starts the guest right after.
    assert box.master_of("hk0") == "kvhk0"
    down = run(box, [str(CONTRIB / "qemu-ifdown"), "hk0"])
    assert down.returncode == 0, down.stderr
    assert box.master_of("hk0") is None
    # Already detached: the goal holds, no error.
    again = run(box, [str(CONTRIB / "qemu-ifdown"), "hk0"])
    assert again.returncode == 0, again.stderr


def test_a_refusal_is_the_typed_error_on_stderr(started: Sandbox) -> None:
    box = started
    sh("ip", "tuntap", "add", "dev", "hk1", "mode", "tap", ns=box.host)
    r = run(box, [str(CONTRIB / "qemu-ifup"), "hk1"], KVMNET_NETWORK="nope")
    assert r.returncode == 1
    assert r.stderr.startswith("Error org.kvmnetd.Kvmnetd1.Error.NoSuchNetwork: "), r.stderr
    assert box.master_of("hk1") is None
    # Names that would break a JSON line are sent escaped and refused by the daemon.
    r = run(box, [str(HOOK), "attach", 'hk"1\\', "hk"])
    assert r.returncode == 1 and r.stderr.startswith("Error org."), r.stderr
    # The daemon is still serving.
    assert run(box, [str(HOOK), "attach", "hk1", "hk"]).returncode == 0
    assert box.master_of("hk1") == "kvhk0"


def test_no_daemon_is_exit_3_and_usage_is_exit_2(box: Sandbox) -> None:
    r = run(box, [str(HOOK), "attach", "hk2", "hk"], KVMNETD_SOCKET=str(box.tmp / "none.sock"))
    assert r.returncode == 3 and "cannot reach kvmnetd" in r.stderr
    assert run(box, [str(HOOK), "attach"]).returncode == 2
    assert run(box, [str(HOOK), "frobnicate", "x"]).returncode == 2
