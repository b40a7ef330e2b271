"""libvirt lists kvmnetd's networks: the real daemon against a private libvirtd, with a real guest.

libvirtd runs in the sandbox's host namespace (as on a host), kvmnetd beside it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.guest import console_lease, guest_images, libvirt_guest_xml
from tests.support.libvirtd import Libvirtd, private_libvirtd
from tests.support.rig import Sandbox, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

GUEST_MAC = "52:54:00:14:00:01"
FOREIGN_DEFAULT = """<network>
  <name>default</name>
  <bridge name='virbr9'/>
</network>
"""


def config(uri: str) -> str:
    return f"""
[daemon]
libvirt_uri = "{uri}"

[network.nat]
mode = "nat"
bridge = "kvnat0"
ipv4 = "10.0.0.254/24"
[network.nat.dhcp]
ranges = ["10.0.0.1-10.0.0.100"]

[network.default]
mode = "isolated"
bridge = "kvdef0"
ipv4 = "10.0.2.1/24"

[network.lab]
mode = "isolated"
bridge = "kvlab0"
ipv4 = "10.0.3.1/24"
"""


def net_info(lv: Libvirtd, name: str) -> dict[str, str] | None:
    """`virsh net-info NAME` as a dict, or None if libvirt has no such network."""
    r = lv.virsh("net-info", name, check=False)
    if r.returncode != 0:
        return None
    return {k.strip(): v.strip() for k, _, v in
            (line.partition(":") for line in r.stdout.splitlines()) if k.strip()}


def in_step(lv: Libvirtd, name: str, bridge: str) -> bool:
    info = net_info(lv, name)
    return info is not None and (info.get("Active"), info.get("Persistent"),
                                 info.get("Autostart"), info.get("Bridge")) == (
        "yes", "yes", "yes", bridge)


def network_guest(name: str, network: str, console: Path, images: tuple[str, str],
                  mac: str = GUEST_MAC, ping: str = "10.0.0.254") -> str:
    return libvirt_guest_xml(name, f"""<interface type='network'><source network='{network}'/>
      <mac address='{mac}'/><model type='virtio'/><rom enabled='no'/></interface>""",
                             console, images, ping)
    for line in console.read_text(errors="replace").splitlines():
        if line.startswith("KVMNET lease ok=1"):
            return dict(f.split("=", 1) for f in line.split()[2:] if "=" in f)
    return None


def ports(box: Sandbox) -> dict[str, dict[str, str]]:
    return {p["ifname"]: p for p in json.loads(box.ctl_out("port", "list", "--json"))}


def test_libvirt_lists_and_keeps_kvmnetds_networks(box: Sandbox) -> None:
    images = guest_images()
    with private_libvirtd(ns=box.host) as lv:
        foreign = box.tmp / "foreign-default.xml"
        foreign.write_text(FOREIGN_DEFAULT)
        lv.virsh("net-define", str(foreign))
        foreign_before = lv.virsh("net-dumpxml", "default").stdout

        box.write_config(config(lv.uri))
        box.start_daemon("--no-bus")

        # Every active network of ours is listed, running and autostarted, on its bridge.
        assert wait_until(lambda: in_step(lv, "nat", "kvnat0") and in_step(lv, "lab", "kvlab0"),
                          timeout=20), lv.virsh("net-list", "--all").stdout
        listing = lv.virsh("net-list", "--all").stdout
        assert any(line.split()[:4] == ["nat", "active", "yes", "yes"]
                   for line in listing.splitlines()), listing
        assert "kvmnet:network" in lv.virsh("net-dumpxml", "nat").stdout

        # A foreign `default`: left as it is, and reported with the way out.
        assert lv.virsh("net-dumpxml", "default").stdout == foreign_before
        assert (net_info(lv, "default") or {}).get("Active") == "no"
        status = box.ctl_out("status")
        assert "'default'" in status and "adopt-libvirt default" in status, status
        assert box.jctl("status")["libvirt"]["clashes"] == ["default"]
        found = [f for f in json.loads(box.ctl("doctor", "--json", check=False).stdout)
                 if f["check"] == "libvirt-network-clash"]
        assert [f["network"] for f in found] == ["default"]

        # A guest picks the network the libvirt way; libvirt plugs the tap, kvmnetd lists it.
        console = box.tmp / "lvnet.log"
        xml = box.tmp / "lvnet.xml"
        xml.write_text(network_guest("lvnet", "nat", console, images))
        lv.virsh("define", str(xml))
        lv.virsh("start", "lvnet")
        tap = wait_until(lambda: next((p for p in ports(box).values()
                                       if p["domain"] == "lvnet"), None), timeout=20)
        assert tap and tap["network"] == "nat", ports(box)
        assert wait_until(lambda: ports(box)[tap["ifname"]]["state"] == "attached", timeout=10)
        assert box.master_of(tap["ifname"]) == "kvnat0"
        lease = wait_until(lambda: console_lease(console), timeout=60)
        assert lease and lease["ip"].startswith("10.0.0."), "the lease comes from kvmnetd"
        assert "lvnet" in box.ctl_out("port", "list")
        # libvirt's tap: kvmnetd does not take it off the bridge or move it.
        r = box.ctl("port", "detach", tap["ifname"], check=False)
        assert r.returncode != 0 and "libvirt" in r.stderr
        r = box.ctl("port", "move", tap["ifname"], "lab", check=False)
        assert r.returncode != 0 and "libvirt" in r.stderr
        assert box.master_of(tap["ifname"]) == "kvnat0"

        # Someone removes ours by hand: it comes back.
        lv.virsh("net-destroy", "nat")
        lv.virsh("net-undefine", "nat")
        assert wait_until(lambda: in_step(lv, "nat", "kvnat0"), timeout=20)

        # libvirtd restarts: still listed; kvmnetd follows its events again afterwards.
        lv.stop()
        lv.start()
        assert wait_until(lambda: in_step(lv, "nat", "kvnat0"), timeout=20)
        lv.virsh("net-destroy", "lab")
        assert wait_until(lambda: in_step(lv, "lab", "kvlab0"), timeout=30)

        # Stopped in kvmnetd: gone from libvirt; started again: back.
        box.ctl("network", "stop", "lab")
        assert wait_until(lambda: net_info(lv, "lab") is None, timeout=20)
        box.ctl("network", "start", "lab")
        assert wait_until(lambda: in_step(lv, "lab", "kvlab0"), timeout=20)

        # The guest stops: libvirt removes its tap, kvmnetd forgets the port.
        lv.virsh("destroy", "lvnet")
        assert wait_until(lambda: tap["ifname"] not in ports(box), timeout=20)
        assert lv.virsh("net-dumpxml", "default").stdout == foreign_before


LIBVIRT_NAT = """<network>
  <name>default</name>
  <forward mode='nat'/>
  <bridge name='virbr0' stp='off' delay='0'/>
  <domain name='lab.kvm' localOnly='yes'/>
  <ip address='192.168.122.1' netmask='255.255.255.0'>
    <dhcp>
      <range start='192.168.122.2' end='192.168.122.254'><lease expiry='2' unit='hours'/></range>
      <host mac='52:54:00:14:00:09' name='web' ip='192.168.122.9'/>
    </dhcp>
  </ip>
</network>
"""


def test_import_a_live_libvirt_network_and_move_off_it(box: Sandbox) -> None:
    """The manual way off libvirt's `default`: import it by name, stop libvirt's, define ours."""
    with private_libvirtd(ns=box.host) as lv:
        src = box.tmp / "default.xml"
        src.write_text(LIBVIRT_NAT)
        lv.virsh("net-define", str(src))
        lv.virsh("net-start", "default")
        lv.virsh("net-autostart", "default")
        box.write_config(f'[daemon]\nlibvirt_uri = "{lv.uri}"\n\n'
                         '[network.other]\nmode = "isolated"\nbridge = "kvoth0"\n'
                         'ipv4 = "10.0.5.1/24"\n')
        box.start_daemon("--no-bus")

        r = box.ctl("network", "import-libvirt", "default", "--connect", lv.uri)
        toml = box.tmp / "default.toml"
        toml.write_text(r.stdout)
        assert 'ipv4 = "192.168.122.1/24"' in r.stdout and 'lease_time = "2h"' in r.stdout
        assert "not kept: <mac address=" in r.stderr  # libvirt gave the bridge one
        # What it prints is kvmnetd config, as the daemon itself checks it.
        empty = box.tmp / "empty.d"
        empty.mkdir()
        check = sh_check(box, toml, empty)
        assert check.returncode == 0, check.stderr

        # Refused by name, exit 2, nothing printed on stdout.
        bad = box.tmp / "bad.xml"
        bad.write_text(LIBVIRT_NAT.replace("</ip>", "</ip><ip address='10.24.10.1' "
                                           "prefix='24'/>"))
        r = box.ctl("network", "import-libvirt", str(bad), check=False)
        assert (r.returncode, r.stdout) == (2, "")
        assert r.stderr.strip() == ("import-libvirt: <ip address='10.24.10.1' prefix='24'>: "
                                    "a second IPv4 subnet is not supported")

        saved = box.tmp / "saved.xml"
        saved.write_text(lv.virsh("net-dumpxml", "default").stdout)
        for cmd in ("net-destroy", "net-undefine"):
            lv.virsh(cmd, "default")
        box.ctl("network", "import-libvirt", str(saved), "--define")
        assert wait_until(lambda: in_step(lv, "default", "virbr0"), timeout=20)
        assert "kvmnet:network" in lv.virsh("net-dumpxml", "default").stdout
        nets = {n["name"]: n for n in box.jctl("network", "list")}
        assert nets["default"]["state"] == "active" and nets["default"]["mode"] == "nat"


def sh_check(box: Sandbox, toml: Path, networks_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", box.host, sys.executable, "-m", "kvmnetd",
                           "--check-config", str(toml), "--networks-dir", str(networks_dir)],
                          capture_output=True, text=True, timeout=60)


ADOPT_NAT = """<network>
  <name>default</name>
  <forward mode='nat'/>
  <bridge name='virbr0' stp='off' delay='0'/>
  <ip address='192.168.122.1' netmask='255.255.255.0'>
    <dhcp><range start='192.168.122.2' end='192.168.122.254'/></dhcp>
  </ip>
</network>
"""
ADOPT_MACS = ("52:54:00:14:00:21", "52:54:00:14:00:22")


def adopt_guest(name: str, mac: str, sock: Path, images: tuple[str, str]) -> str:
    """A guest whose serial console is a unix socket: the test reads it and sends commands."""
    return (network_guest(name, "default", sock, images, mac, "192.168.122.1")
            .replace(f"<serial type='file'><source path='{sock}'/>",
                     f"<serial type='unix'><source mode='bind' path='{sock}'/>"))


class Console:
    """A guest's serial console on a unix socket: its lines, and commands sent to it."""

    def __init__(self, path: Path) -> None:
        assert wait_until(path.exists, timeout=30)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        with contextlib.suppress(OSError):  # closed by close(), or the guest went away
            self._lines()

    def _lines(self) -> None:
        buf = b""
        while chunk := self.sock.recv(4096):
            buf += chunk
            *done, buf = buf.split(b"\n")
            for raw in done:
                line = raw.decode(errors="replace").rstrip("\r")
                at = line.find("KVMNET ")
                self.lines.append(line[at:] if at > 0 else line)

    def lease(self, after: int = 0) -> dict[str, str] | None:
        for line in self.lines[after:]:
            if line.startswith("KVMNET lease "):
                return dict(f.split("=", 1) for f in line.split()[2:] if "=" in f)
        return None

    def send(self, command: str) -> None:
        self.sock.sendall(command.encode() + b"\n")

    def close(self) -> None:
        self.sock.close()


def reachable(box: Sandbox, ip: str) -> bool:
    return subprocess.run(["ip", "netns", "exec", box.host, "busybox", "ping", "-c", "1", "-W",
                           "2", ip], capture_output=True, timeout=10).returncode == 0


class Pinger:
    """ping from the host to a guest every 50 ms; the longest run of lost replies, in seconds."""

    INTERVAL = 0.05

    def __init__(self, ns: str, ip: str) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, "busybox", "ping", "-i",
                                      str(self.INTERVAL), ip],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def stop(self) -> float:
        self.proc.send_signal(signal.SIGINT)  # ping flushes its output and exits
        out, _ = self.proc.communicate(timeout=10)
        seqs = sorted(int(m) for m in re.findall(r"seq=(\d+)", out))
        assert len(seqs) > 10, out
        gap = max((b - a - 1 for a, b in itertools.pairwise(seqs)), default=0)
        return gap * self.INTERVAL


def test_adopt_libvirt_with_running_guests_and_its_rollback(box: Sandbox) -> None:
    images = guest_images()
    with private_libvirtd(ns=box.host) as lv:
        src = box.tmp / "default.xml"
        src.write_text(ADOPT_NAT)
        lv.virsh("net-define", str(src))
        lv.virsh("net-start", "default")
        lv.virsh("net-autostart", "default")
        consoles: list[Console] = []
        leases = []
        for i, mac in enumerate(ADOPT_MACS):  # one at a time: two TCG boots at once starve DHCP
            path = box.tmp / f"adopt{i}.sock"
            lv.create(adopt_guest(f"adopt{i}", mac, path, images))
            console = Console(path)
            consoles.append(console)
            leases.append(wait_until(console.lease, timeout=90))
        ips = [lease["ip"] for lease in leases if lease and lease.get("ok") == "1"]
        assert len(ips) == 2 and all(ip.startswith("192.168.122.") for ip in ips), [
            c.lines[-10:] for c in consoles]
        box.write_config(f'[daemon]\nlibvirt_uri = "{lv.uri}"\n\n'
                         '[network.other]\nmode = "isolated"\nbridge = "kvoth0"\n'
                         'ipv4 = "10.0.5.1/24"\n')
        adopt = ["network", "adopt-libvirt", "default", "--connect", lv.uri,
                 "--state-dir", str(box.state_dir)]

        # kvmnetd unreachable halfway: libvirt's network comes back as it was, guests on it.
        r = box.ctl(*adopt, check=False)
        assert r.returncode == 1 and "putting libvirt's network back" in r.stderr, r.stderr
        assert (net_info(lv, "default") or {}).get("Active") == "yes"
        assert (net_info(lv, "default") or {}).get("Autostart") == "yes"
        assert "kvmnet:network" not in lv.virsh("net-dumpxml", "default").stdout
        for ip in ips:
            assert reachable(box, ip)

        box.start_daemon("--no-bus")
        pingers = [Pinger(box.host, ip) for ip in ips]
        r = box.ctl(*adopt, check=False)
        assert r.returncode == 0, r.stderr
        assert "adopted default: 2 guest ports, 2 leases" in r.stdout
        # kvmnetd's network now, with the guests' taps and libvirt's leases.
        nets = {n["name"]: n for n in box.jctl("network", "list")}
        assert nets["default"]["state"] == "active" and nets["default"]["bridge"] == "virbr0"
        assert {le["mac"]: le["ip"] for le in box.jctl("leases", "default")} == dict(
            zip(ADOPT_MACS, ips, strict=True))
        assert wait_until(lambda: in_step(lv, "default", "virbr0"), timeout=20)
        assert "kvmnet:network" in lv.virsh("net-dumpxml", "default").stdout
        for ip in ips:
            assert reachable(box, ip)
        # A second of replies after the move too: a quick adoption must not leave the
        # pingers too few replies to measure a gap between.
        time.sleep(1.0)
        lost = [p.stop() for p in pingers]
        print(f"\nadopt-libvirt: longest loss per guest {lost} s (host pings every 50 ms)")
        assert all(x < 1.0 for x in lost), lost
        # libvirt's dnsmasq is gone: each guest asks again and kvmnetd's gives the same address.
        for console, ip in zip(consoles, ips, strict=True):
            mark = len(console.lines)
            console.send("lease")
            again = wait_until(lambda c=console, m=mark: c.lease(m), timeout=60)
            assert again and again.get("ok") == "1" and again["ip"] == ip, console.lines[-5:]
            console.close()
        # A moved guest stops: libvirt removes its tap and kvmnetd drops the port.
        assert len(ports(box)) == 2
        lv.virsh("destroy", "adopt0")
        assert wait_until(lambda: len(ports(box)) == 1, timeout=20), ports(box)


def test_libvirtd_started_after_kvmnetd_is_found_without_polling(box: Sandbox) -> None:
    """No socket at start: kvmnetd waits on inotify and lists its networks once it appears."""
    with private_libvirtd(started=False, ns=box.host) as lv:
        box.write_config(config(lv.uri))
        box.start_daemon("--no-bus")
        assert wait_until(lambda: "libvirt.waiting" in box.log.read_text(), timeout=10)
        lv.start()
        assert wait_until(lambda: in_step(lv, "nat", "kvnat0"), timeout=20), \
            lv.virsh("net-list", "--all").stdout
