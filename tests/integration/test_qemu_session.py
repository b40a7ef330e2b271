"""qemu:///session-style guests: a non-root qemu joins an open network through
qemu-bridge-helper, allowed by kvmnetd's include file; a network not open to all is refused.

The host's /etc is never written: the helper's /etc/qemu/bridge.conf exists only in a private
mount namespace (an overlay on /etc), and the setuid helper is a copy in a tmp dir.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.guest import QEMU, Guest, guest_images
from tests.support.rig import Sandbox, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HELPER = "/usr/lib/qemu/qemu-bridge-helper"
USER = "nobody"

CONFIG = """
[network.open]
mode = "isolated"
bridge = "kvopen0"
ipv4 = "10.0.7.1/24"
allow_users = ["*"]
[network.open.dhcp]
ranges = ["10.0.7.10-10.0.7.50"]

[network.closed]
mode = "isolated"
bridge = "kvclosed0"
ipv4 = "10.0.8.1/24"
allow_users = ["alice"]
"""

# Runs as `sh -c` in a new mount namespace: $1 overlay upper dir, $2 work dir, $3 a path for a
# tun device node; then the command. Hosts usually have /dev/net/tun 0666; this one may not.
_OVERLAY = """\
set -e
mount -t overlay kvmnet-etc -o "lowerdir=/etc,upperdir=$1,workdir=$2" /etc
mknod -m 666 "$3" c 10 200
mount --bind "$3" /dev/net/tun
shift 3
exec "$@"
"""


@pytest.fixture
def session_dir() -> Iterator[Path]:
    if not os.path.exists(HELPER):
        pytest.skip(f"{HELPER} missing (qemu-system-common)")
    d = Path(tempfile.mkdtemp(prefix="kvmnetd-session-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def session_guest(box: Sandbox, d: Path, bridge: str, name: str) -> Guest:
    kernel, initrd = guest_images()
    for src in (kernel, initrd):  # the user cannot read root's cache
        shutil.copy(src, d / os.path.basename(src))
        os.chmod(d / os.path.basename(src), 0o644)
    helper = d / "qemu-bridge-helper"
    shutil.copy(HELPER, helper)
    os.chmod(helper, 0o4755)  # setuid root, as installed by qemu-system-common
    upper, work = d / "upper", d / "work"
    (upper / "qemu").mkdir(parents=True, exist_ok=True)
    work.mkdir(exist_ok=True)
    (upper / "qemu" / "bridge.conf").write_text(f"include {box.tmp / 'qemu-bridge.conf'}\n")
    argv = [
        QEMU, "-name", name, "-accel", "tcg", "-cpu", "max", "-machine", "q35", "-m", "256",
        "-smp", "1", "-no-reboot", "-nodefaults", "-display", "none", "-monitor", "none",
        "-serial", "stdio", "-kernel", str(d / os.path.basename(kernel)),
        "-initrd", str(d / os.path.basename(initrd)),
        "-append", "console=ttyS0 quiet panic=-1 mitigations=off kvmnet.hold=1",
        "-netdev", f"bridge,id=n0,br={bridge},helper={helper}",
        "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:14:07:01,romfile=",
    ]
    cmd = ["ip", "netns", "exec", box.host, "unshare", "-m", "--propagation", "private",
           "sh", "-c", _OVERLAY, "overlay", str(upper), str(work), str(d / f"tun-{name}"),
           "setpriv", f"--reuid={USER}", "--regid=nogroup", "--clear-groups", *argv]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=str(d))
    return Guest(name, proc)


def test_session_qemu_joins_an_open_network(box: Sandbox, session_dir: Path) -> None:
    conf = box.tmp / "qemu-bridge.conf"
    os.chmod(box.tmp, 0o755)  # the setuid helper reads the include as root, qemu needs nothing
    box.write_config(CONFIG + f'\n[daemon]\nqemu_bridge_conf = "{conf}"\nlibvirt_uri = ""\n')
    box.start_daemon("--no-bus")
    assert wait_until(lambda: conf.exists() and "allow kvopen0" in conf.read_text(), timeout=10)
    allowed = [ln for ln in conf.read_text().splitlines() if not ln.startswith("#")]
    assert allowed == ["allow kvopen0"]  # only the network open to every user

    with session_guest(box, session_dir, "kvopen0", "sess") as g:
        lease = g.lease(timeout=90)
        assert lease["ip"].startswith("10.0.7.")  # from kvmnetd's dnsmasq on kvopen0
    # Not listed, so the helper refuses the closed network.
    with session_guest(box, session_dir, "kvclosed0", "sess2") as g:
        g.proc.wait(60)
        assert g.proc.returncode != 0
        assert "access denied by acl file" in g.transcript, g.transcript

    # A network stopped is no longer listed.
    box.ctl("network", "stop", "open")
    assert wait_until(lambda: "allow kvopen0" not in conf.read_text(), timeout=10)
