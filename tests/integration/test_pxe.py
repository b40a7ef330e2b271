"""PXE on an isolated network without host access: the real daemon, dnsmasq and busybox.

A guest asks for a lease the way each kind of firmware does (client-arch, option 93;
iPXE's user class and option 175) and must get its own boot file, then fetch it by
TFTP, while the rest of the host stays closed to it. Extra dnsmasq options from the
config reach the guest; a dangerous one is refused with FILE:LINE.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.support.netns import netns, sh
from tests.support.rig import PY, Sandbox, wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("dnsmasq") is None
                       or shutil.which("busybox") is None,
                       reason="needs root, dnsmasq and busybox"),
]

GW = "10.53.0.1"
CONFIG = """
[network.lab]
mode = "isolated"
bridge = "kvpxe0"
ipv4 = "{gw}/24"
host_access = false

[network.lab.dhcp]
ranges = ["10.53.0.100-10.53.0.150"]
tftp_root = "{root}"
boot_file = "default.0"

[network.lab.dhcp.boot]
bios = "undionly.kpxe"
efi_x86_64 = "ipxe.efi"
efi_arm64 = "arm64.efi"
ipxe = "http://{gw}/boot.ipxe"

[network.lab.dnsmasq]
options = [
    "dhcp-option=option:ntp-server,{gw}",
    "host-record=boot.lab.test,{gw}",
    "log-dhcp",
]

[[attach]]
network = "lab"
ifname = "px*"
"""

SCRIPT = """#!/bin/sh
case "$1" in
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    echo "IP=$ip"; echo "BOOT=$boot_file"; echo "SIADDR=$siaddr"; echo "NTP=$ntpsrv";;
esac
"""

# What each kind of client sends: option 60 (vendor class), 93 (client-arch), and for
# iPXE its user class "iPXE" (77) and its feature list (175).
PXE = ("-V", "PXEClient:Arch:00000:UNDI:002001")
CLIENTS = {
    "bios": ([*PXE, "-x", "0x5d:0000"], "undionly.kpxe"),
    "efi-x86_64": ([*PXE, "-x", "0x5d:0007"], "ipxe.efi"),
    "efi-x86_64 (arch 9)": ([*PXE, "-x", "0x5d:0009"], "ipxe.efi"),
    "efi-arm64": ([*PXE, "-x", "0x5d:000b"], "arm64.efi"),
    "ipxe on bios": ([*PXE, "-x", "0x5d:0000", "-x", "0x4d:69505845", "-x", "0xaf:130101"],
                     f"http://{GW}/boot.ipxe"),
    "ipxe on efi": ([*PXE, "-x", "0x5d:0007", "-x", "0xaf:130101"], f"http://{GW}/boot.ipxe"),
    "plain": ([], "default.0"),
}

LISTENER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen(8)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"host service\\n")
    c.close()
"""


def lease(box: Sandbox, ns: str, *extra: str) -> dict[str, str]:
    script = box.tmp / "pxe-udhcpc.sh"
    if not script.exists():
        script.write_text(SCRIPT)
        script.chmod(0o755)
    r = sh("busybox", "udhcpc", "-i", "eth0", "-q", "-n", "-f", "-t", "5", "-T", "1",
           "-O", "ntpsrv", "-s", str(script), *extra, ns=ns, check=False)
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


def test_pxe_boot_file_per_architecture_and_tftp_on_isolated_network(box: Sandbox) -> None:
    root = box.tmp / "tftp"
    root.mkdir(mode=0o755)
    # Several TFTP blocks (512 bytes each): the data flows from dnsmasq's new port and the
    # guest's acknowledgements must get back in through the isolated input chain.
    payload = bytes(range(256)) * 23
    for name in ("undionly.kpxe", "ipxe.efi", "arm64.efi", "default.0"):
        (root / name).write_bytes(name.encode() + b"\n" + payload)
        (root / name).chmod(0o644)
    box.write_config(CONFIG.format(gw=GW, root=root))
    g = box.guest("px1")
    box.start_daemon("--no-bus")
    assert wait_until(lambda: box.master_of("px1") == "kvpxe0")

    for client, (args, want) in CLIENTS.items():
        got = lease(box, g, *args)
        assert got.get("BOOT") == want, (client, got)
        assert got["SIADDR"] == GW and got["IP"].startswith("10.53.0."), (client, got)
    # An extra option from [network.lab.dnsmasq] reached the guest.
    assert got["NTP"] == GW

    fetched = box.tmp / "fetched"
    for name in ("undionly.kpxe", "ipxe.efi"):
        sh("busybox", "tftp", "-g", "-r", name, "-l", str(fetched), GW, ns=g)
        assert fetched.read_bytes() == (root / name).read_bytes(), name
        fetched.unlink()
    # DNS is one of the network's services too; the record is an extra option.
    out = sh("busybox", "nslookup", "boot.lab.test", GW, ns=g).stdout
    assert GW in out.split("boot.lab.test", 1)[1], out

    # Anything else on the host stays closed: a TCP service on every address.
    listener = subprocess.Popen(["ip", "netns", "exec", box.host, PY, "-c", LISTENER],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline() == "listening\n"
        assert "host service" in sh("busybox", "nc", "-w", "2", GW, "8080", ns=box.host,
                                    input="").stdout
        r = sh("busybox", "nc", "-w", "2", GW, "8080", ns=g, input="", check=False)
        assert "host service" not in r.stdout
        # The forward side is closed too: no way past the bridge.
        r = sh("busybox", "nc", "-w", "1", "198.51.100.2", "9999", ns=g, input="", check=False)
        assert r.returncode != 0
    finally:
        listener.kill()
        listener.wait(5)


def test_dangerous_dnsmasq_option_is_refused_with_file_and_line(box: Sandbox) -> None:
    text = CONFIG.format(gw=GW, root="/srv/tftp").replace(
        '"log-dhcp",', '"log-dhcp",\n    "dhcp-script=/bin/sh",\n    "conf-dir=/etc/dnsmasq.d",')
    box.write_config(text)
    lines = text.splitlines()
    script_line = next(i for i, s in enumerate(lines, 1) if "dhcp-script" in s)
    # The loader reports the line of the key (`options = [`) for each element of it.
    key_line = next(i for i, s in enumerate(lines, 1) if s.startswith("options = ["))
    assert key_line < script_line
    with netns("c") as ns:
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "kvmnetd",
                            "--check-config", str(box.config),
                            "--networks-dir", str(box.networks_dir)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 1, r
    assert f"{box.config}:{key_line}: network.lab.dnsmasq.options[3]: 'dhcp-script' is " \
           "refused: it runs a program" in r.stderr, r.stderr
    assert f"{box.config}:{key_line}: network.lab.dnsmasq.options[4]: 'conf-dir' is " \
           "refused: it reads or writes files" in r.stderr, r.stderr
    # And the daemon refuses to start on it rather than run dnsmasq with it.
    with pytest.raises(AssertionError, match="exited with 1"):
        box.start_daemon("--no-bus", timeout=20)
