"""Who may administer the real daemon: root, members of group kvmnet, whom polkit allows;
others get a typed PermissionDenied. On the bus and on the control socket, with users
made for the test, and a real polkitd on the test's private bus.
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmnetd.app.access import ADMIN_GROUP
from kvmnetd.control.names import BUS_NAME, MANAGER_IFACE, MANAGER_PATH
from tests.support.dbus import PrivateBus, start_bus, stop_bus
from tests.support.netns import sh
from tests.support.rig import PY, Sandbox, wait_until
from tests.support.toml import network_toml

pytestmark = pytest.mark.integration

CONFIG = network_toml("extra", "isolated", "kvadm0", "10.55.0.1/24", dns=False,
                      autostart=False)

DENIED = f"{BUS_NAME}.Error.PermissionDenied"

# One request over the control socket, the reply's JSON on stdout.
SOCKET_CALL = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(json.dumps({"id": 1, "method": sys.argv[2], "args": sys.argv[3:]}).encode() + b"\\n")
print(s.makefile().readline())
"""


@contextlib.contextmanager
def throwaway_users(others: int = 1) -> Iterator[list[str]]:
    """[a member of group kvmnet, then `others` users outside it]; removed afterwards."""
    made_group = False
    try:
        grp.getgrnam(ADMIN_GROUP)
    except KeyError:
        subprocess.run(["groupadd", "--system", ADMIN_GROUP], check=True)
        made_group = True
    tag = secrets.token_hex(3)
    users = [(f"kvadm{tag}", ["-G", ADMIN_GROUP])] + [(f"kvu{i}{tag}", []) for i in range(others)]
    made: list[str] = []
    try:
        for user, extra in users:
            subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin",
                            *extra, user], check=True)
            made.append(user)
        yield made
    finally:
        for user in made:
            subprocess.run(["userdel", user], check=False)
        if made_group:
            subprocess.run(["groupdel", ADMIN_GROUP], check=False)


def as_user(box: Sandbox, user: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", box.host, "setpriv", f"--reuid={user}",
                           "--regid=nogroup", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=30)


def socket_call(box: Sandbox, user: str, method: str, *args: str) -> dict[str, object]:
    r = as_user(box, user, PY, "-c", SOCKET_CALL, str(box.run_dir / "control.sock"), method,
                *args)
    assert r.returncode == 0, r.stderr
    reply: dict[str, object] = json.loads(r.stdout)
    return reply


def bus_call(box: Sandbox, bus: PrivateBus, user: str, method: str, *args: str
             ) -> subprocess.CompletedProcess[str]:
    return as_user(box, user, "gdbus", "call", "--address", bus.address, "--dest", BUS_NAME,
                   "--object-path", MANAGER_PATH, "--method", f"{MANAGER_IFACE}.{method}",
                   *args)


def state(box: Sandbox) -> str:
    return str(box.jctl("network", "show", "extra")["state"])


def test_group_members_administer_others_are_refused(box: Sandbox, bus: PrivateBus) -> None:
    box.write_config(CONFIG)
    with throwaway_users() as [member, other]:
        box.start_daemon("--bus-address", bus.address)
        # The control socket.
        reply = socket_call(box, other, "StartNetwork", "extra")
        assert reply["ok"] is False and reply["error"] == DENIED, reply
        assert ADMIN_GROUP in str(reply["message"])
        assert state(box) == "inactive"
        reply = socket_call(box, member, "StartNetwork", "extra")
        assert reply["ok"] is True, reply
        assert state(box) == "active"
        assert sh("ip", "link", "show", "kvadm0", ns=box.host).returncode == 0
        # The bus: the policy lets both through; the daemon decides (no polkit on this bus).
        r = bus_call(box, bus, other, "StopNetwork", "extra")
        assert r.returncode != 0 and DENIED in r.stderr, r.stderr
        assert state(box) == "active"
        r = bus_call(box, bus, member, "StopNetwork", "extra")
        assert r.returncode == 0, r.stderr
        assert state(box) == "inactive"
        r = bus_call(box, bus, member, "StartNetwork", "extra")
        assert r.returncode == 0, r.stderr
        assert state(box) == "active"


REPO = Path(__file__).resolve().parents[2]
POLKITD = "/usr/lib/polkit-1/polkitd"
POLKIT_BUS_POLICY = "/usr/share/dbus-1/system.d/org.freedesktop.PolicyKit1.conf"
RULE = """polkit.addRule(function(action, subject) {
    if (action.id == "org.kvmnetd.manage" && subject.user == "%s") {
        return polkit.Result.YES;
    }
});
"""


@contextlib.contextmanager
def polkitd(directory: Path, bus: PrivateBus, granted: str) -> Iterator[None]:
    """A real polkitd on the private bus, with our action file and one rule granting a user.

    Its action and rule folders are bind mounts in a mount namespace of its own, so the
    host's polkit configuration is neither read nor changed.
    """
    actions, rules = directory / "actions", directory / "rules"
    actions.mkdir()
    rules.mkdir()
    shutil.copy(REPO / "polkit" / "org.kvmnetd.policy", actions)
    (rules / "10-test.rules").write_text(RULE % granted)
    shutil.chown(rules, "polkitd")
    shutil.chown(rules / "10-test.rules", "polkitd")
    log = open(directory / "polkitd.log", "w")
    proc = subprocess.Popen(
        ["unshare", "-m", "sh", "-c",
         f"mount --bind {actions} /usr/share/polkit-1/actions && "
         f"mount --bind {rules} /etc/polkit-1/rules.d && exec {POLKITD} --no-debug"],
        env={**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus.address}, stdout=log, stderr=log)
    log.close()
    try:
        owned = wait_until(lambda: "org.freedesktop.PolicyKit1" in sh(
            "busctl", f"--address={bus.address}", "list", "--acquired", check=False).stdout,
            timeout=15)
        assert owned, (directory / "polkitd.log").read_text()
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.skipif(not os.path.exists(POLKITD), reason="needs polkitd (Debian package polkitd)")
def test_polkit_decides_for_users_outside_the_group(box: Sandbox) -> None:
    box.write_config(CONFIG)
    pkdir = box.tmp / "polkit"
    pkdir.mkdir()
    bus = start_bus(str(pkdir), f"<include>{POLKIT_BUS_POLICY}</include>")
    try:
        with throwaway_users(others=2) as [member, granted, refused], \
                polkitd(pkdir, bus, granted):
            box.start_daemon("--bus-address", bus.address)
            # polkit says no (no rule, no active session): typed, and names polkit.
            r = bus_call(box, bus, refused, "StartNetwork", "extra")
            assert r.returncode != 0 and DENIED in r.stderr and "polkit" in r.stderr, r.stderr
            assert state(box) == "inactive"
            # polkit's rule grants this user, who is not in group kvmnet.
            r = bus_call(box, bus, granted, "StartNetwork", "extra")
            assert r.returncode == 0, r.stderr
            assert state(box) == "active"
            # The control socket asks polkit about the process (pid and start time).
            reply = socket_call(box, granted, "StopNetwork", "extra")
            assert reply["ok"] is True, reply
            assert state(box) == "inactive"
            reply = socket_call(box, refused, "StartNetwork", "extra")
            assert reply["error"] == DENIED and "polkit" in str(reply["message"]), reply
            assert state(box) == "inactive"
            # Members need no polkit at all.
            r = bus_call(box, bus, member, "StartNetwork", "extra")
            assert r.returncode == 0, r.stderr
            assert state(box) == "active"
            assert "polkit.checked" in box.log.read_text()
    finally:
        stop_bus(bus)
