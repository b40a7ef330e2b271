"""Several simulated hosts sharing one overlay network, each running its own kvmnetd.

fabric ns: bridge "underlay" (192.0.2.0/24, a documentation range, only inside these
namespaces). Host N: a Sandbox (its own namespace, kvmnetd, run/state dirs, control
socket, upstream router with the echo server), plus "ul0" 192.0.2.(10+N) cabled to the
underlay bridge. Guests are namespaces whose eth0 is a veth; the other end is the
guest's port on its host.

A guest moves the way a live migration looks to the hosts: its port leaves host A's
namespace and appears in host B's (the same veth, so the guest keeps its MAC, address
and running DHCP client), then the guest announces itself with a gratuitous ARP.

The EVPN tests use the same fabric with mode="evpn" and a `before_start` hook that
starts zebra and bgpd in each host's namespace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.netns import netns, sh
from tests.support.rig import Sandbox, wait_until
from tests.support.toml import attach_toml, daemon_toml

UNDERLAY_PREFIX = "192.0.2."
UNDERLAY_BRIDGE = "underlay"
ASN = 65000

# The udhcpc script of a long-running client: every event with its address, so a
# test sees a renewal ACKed ("renew") or refused ("nak").
UDHCPC_LOG_SCRIPT = """#!/bin/sh
case "$1" in
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/$mask" dev "$interface"
    [ -n "$router" ] && ip route replace default via "${router%% *}" dev "$interface"
    [ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
    echo "$1 ip=$ip mtu=$mtu router=$router" >> "$KT_LOG";;
*)
    echo "$1 $message" >> "$KT_LOG";;
esac
"""


@dataclass
class FabricHost:
    name: str  # "h1"
    underlay_ip: str
    box: Sandbox

    @property
    def ns(self) -> str:
        return self.box.host


@dataclass
class FabricGuest:
    ns: str
    port: str  # its port's name (the same on every host it runs on)
    mac: str
    host: FabricHost
    client: subprocess.Popen[str] | None = None
    log: Path | None = None
    ip: str | None = None

    def events(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log and self.log.exists() else []


@dataclass
class Fabric:
    count: int = 3
    mode: str = "static"  # the overlay mode written into each host's config
    underlay_mtu: int = 1500
    # Called per host once its underlay is up, before its kvmnetd starts (FRR for evpn).
    before_start: Callable[[FabricHost], None] | None = None
    hosts: list[FabricHost] = field(default_factory=list)
    guests: list[FabricGuest] = field(default_factory=list)
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    tmp: Path = field(default=Path("/nonexistent"))  # made on entry

    def __enter__(self) -> Fabric:
        # Not below pytest's tmp_path (a 0700 directory): dnsmasq reads its hosts file
        # as its own user, which needs every directory on the way.
        self.tmp = Path(tempfile.mkdtemp(prefix="kvmnetd-fabric-"))
        self.tmp.chmod(0o755)
        self.stack.callback(shutil.rmtree, self.tmp, True)
        try:
            self.fabric_ns = self.stack.enter_context(netns("f"))
            sh("ip", "link", "add", UNDERLAY_BRIDGE, "mtu", str(self.underlay_mtu), "type",
               "bridge", "stp_state", "0", "forward_delay", "0", ns=self.fabric_ns)
            sh("ip", "link", "set", UNDERLAY_BRIDGE, "up", ns=self.fabric_ns)
            for i in range(1, self.count + 1):
                self.add_host(i)
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    # ---- hosts ---------------------------------------------------------------------

    def add_host(self, i: int) -> FabricHost:
        directory = self.tmp / f"h{i}"
        directory.mkdir()
        box = self.stack.enter_context(Sandbox(directory))
        host = FabricHost(f"h{i}", f"{UNDERLAY_PREFIX}{10 + i}", box)
        far = f"ul{i}{os.getpid() % 10000}"[:15]
        sh("ip", "link", "add", "ul0", "mtu", str(self.underlay_mtu), "type", "veth", "peer",
           "name", far, "mtu", str(self.underlay_mtu), "netns", self.fabric_ns, ns=host.ns)
        sh("ip", "link", "set", far, "master", UNDERLAY_BRIDGE, "up", ns=self.fabric_ns)
        sh("ip", "addr", "add", f"{host.underlay_ip}/24", "dev", "ul0", ns=host.ns)
        sh("ip", "link", "set", "ul0", "up", ns=host.ns)
        self.hosts.append(host)
        return host

    def pathspace(self, host: FabricHost) -> str:
        """The host's FRR pathspace: unique per test run (-N names dirs under /var/run/frr)."""
        return f"{host.name}k{os.getpid() % 100000}"

    def host(self, name: str) -> FabricHost:
        return next(h for h in self.hosts if h.name == name)

    def overlay_toml(self, host: FabricHost, peers: list[FabricHost] | None = None) -> str:
        """[daemon.overlay] for `host`: every other host of the fabric, or `peers`."""
        others = [h.underlay_ip for h in (self.hosts if peers is None else peers)
                  if h is not host]
        keys: dict[str, str | int | list[str]] = {"local": host.underlay_ip,
                                                  "underlay_mtu": self.underlay_mtu}
        if self.mode == "static":
            keys["peers"] = others
        else:
            keys.update(asn=ASN, neighbors=others, frr_pathspace=self.pathspace(host))
        return "[daemon.overlay]\n" + "".join(
            f"{k} = {_toml(v)}\n" for k, v in keys.items()) + "\n"

    def network_toml(self, name: str = "ov", vni: int = 100, ipv4: str = "10.60.0.1/24",
                     ranges: str = "10.60.0.10-10.60.0.249", mode: str = "nat") -> str:
        return (f'[network.{name}]\nmode = "{mode}"\nbridge = "kv{name}"\nipv4 = "{ipv4}"\n'
                f'[network.{name}.dhcp]\nranges = ["{ranges}"]\n'
                f'[network.{name}.overlay]\nvni = {vni}\nmode = "{self.mode}"\n\n')

    def config(self, host: FabricHost, networks: str | None = None,
               peers: list[FabricHost] | None = None) -> str:
        """A host's whole main file: daemon settings, overlay, networks, attach rule."""
        return (daemon_toml(libvirt_uri="") + self.overlay_toml(host, peers)
                + (self.network_toml() if networks is None else networks)
                + attach_toml("ov", ifname="vm*"))

    def start(self, networks: str | None = None) -> None:
        for host in self.hosts:
            if self.before_start is not None:
                self.before_start(host)
            host.box.write_config(self.config(host, networks))
            host.box.start_daemon("--no-bus")

    # ---- guests --------------------------------------------------------------------

    def guest(self, host: FabricHost, mac: str | None = None) -> FabricGuest:
        n = len(self.guests)
        port = f"vm{n}x{os.getpid() % 1000}"
        mac = mac or f"52:54:00:6b:{n >> 8:02x}:{n & 0xFF:02x}"
        ns = self.stack.enter_context(netns("g"))
        sh("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
           ns=host.ns)
        sh("ip", "link", "set", "eth0", "address", mac, "up", ns=ns)
        g = FabricGuest(ns, port, mac, host)
        self.guests.append(g)
        return g

    def lease(self, g: FabricGuest, timeout: float = 20) -> str | None:
        """Start a long-running udhcpc in the guest and wait for its first lease (the ip)."""
        script = self.tmp / "udhcpc-log.sh"
        if not script.exists():
            script.write_text(UDHCPC_LOG_SCRIPT)
            script.chmod(0o755)
        g.log = self.tmp / f"{g.ns}.dhcp"
        g.client = subprocess.Popen(
            ["ip", "netns", "exec", g.ns, "busybox", "udhcpc", "-i", "eth0", "-f", "-t", "20",
             "-T", "1", "-O", "mtu", "-s", str(script)],
            env={**os.environ, "KT_LOG": str(g.log)}, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, text=True)
        self.stack.callback(_stop, g.client)
        bound = wait_until(lambda: [e for e in g.events() if e.startswith("bound ")], timeout)
        if not bound:
            return None
        g.ip = bound[0].split()[1].removeprefix("ip=")
        return g.ip

    def renew(self, g: FabricGuest, timeout: float = 15) -> str | None:
        """Ask the guest's client for a renewal: its event, "renew ip=..." or "nak ...". """
        assert g.client is not None
        before = len(g.events())
        g.client.send_signal(signal.SIGUSR1)  # busybox udhcpc: renew now
        got = wait_until(lambda: [e for e in g.events()[before:]
                                  if e.split()[0] in ("renew", "nak", "bound")], timeout)
        return got[0] if got else None

    def announce(self, g: FabricGuest) -> None:
        """The guest's gratuitous ARP, as a guest (or qemu for it) sends after a move."""
        assert g.ip is not None
        sh("busybox", "arping", "-U", "-c", "2", "-w", "1", "-I", "eth0", "-s", g.ip, g.ip,
           ns=g.ns, check=False)

    def move(self, g: FabricGuest, to: FabricHost, announce: bool = True) -> None:
        """Live-migrate `g`: its port leaves its host (gone there) and appears on `to`."""
        sh("ip", "link", "set", g.port, "netns", to.ns, ns=g.host.ns)
        g.host = to
        if announce:
            wait_until(lambda: to.box.master_of(g.port) is not None, 10)
            self.announce(g)


def _toml(v: str | int | list[str]) -> str:
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return f'"{v}"'
    return "[" + ", ".join(f'"{x}"' for x in v) + "]"


def _stop(p: subprocess.Popen[str]) -> None:
    if p.poll() is None:
        p.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(5)


@contextlib.contextmanager
def fabric(count: int = 3, mode: str = "static",
           before_start: Callable[[FabricHost], None] | None = None,
           underlay_mtu: int = 1500) -> Iterator[Fabric]:
    """A fabric in its own directory (removed afterwards), torn down also on failure."""
    with Fabric(count, mode, underlay_mtu, before_start) as f:
        yield f
