"""One network across three simulated hosts with BGP EVPN through FRR (issue #17).

Each host is a namespace on the fabric's underlay with its own kvmnetd and its own
zebra and bgpd (pathspace -N), started here and killed afterwards, also on failure.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.fabric import ASN, Fabric, FabricHost, fabric
from tests.support.frr import FrrDaemons, frr_installed
from tests.support.netns import ping, sh
from tests.support.rig import PY, wait_until

pytestmark = pytest.mark.skipif(not frr_installed(),
                                reason="FRR not installed (apt-get install frr frr-pythontools)")


class EvpnFabric:
    def __init__(self, fab: Fabric) -> None:
        self.fab = fab
        self.frr: dict[str, FrrDaemons] = {}
        self.bfd = False

    def start_frr(self, host: FabricHost) -> None:
        d = FrrDaemons(host.ns, self.fab.pathspace(host), bfd=self.bfd)
        self.fab.stack.callback(d.cleanup)  # before the host's namespace goes
        d.start()
        self.frr[host.name] = d

    def status(self, host: FabricHost) -> dict[str, Any]:
        frr: dict[str, Any] = host.box.jctl("status")["frr"]
        return frr

    def wait_peers(self, host: FabricHost, peers: set[str], timeout: float = 60) -> bool:
        def ok() -> bool:
            st = self.status(host)
            est = {p for p, s in st.get("peers", {}).items() if s == "Established"}
            return st["state"] == "applied" and est == peers
        return bool(wait_until(ok, timeout, 0.2))


@pytest.fixture
def evpn() -> Iterator[EvpnFabric]:
    holder: list[EvpnFabric] = []
    with fabric(3, "evpn", before_start=lambda h: holder[0].start_frr(h)) as f:
        holder.append(EvpnFabric(f))
        yield holder[0]


def others(fab: Fabric, host: FabricHost) -> set[str]:
    return {h.underlay_ip for h in fab.hosts if h is not host}


def test_part_applied_and_bgp_sessions_established(evpn: EvpnFabric) -> None:
    fab = evpn.fab
    fab.start()
    for h in fab.hosts:
        assert evpn.wait_peers(h, others(fab, h)), evpn.status(h)
        conf = evpn.frr[h.name].running_config()
        assert f"router bgp {ASN}" in conf
        assert f" bgp router-id {h.underlay_ip}" in conf
        assert "  advertise-all-vni" in conf
    # The EVPN address family carries the sessions.
    summary = evpn.frr["h1"].vtysh("show bgp l2vpn evpn summary")
    assert "192.0.2.12" in summary and "192.0.2.13" in summary


def test_frr_killed_is_reported_and_healed(evpn: EvpnFabric) -> None:
    fab = evpn.fab
    fab.start()
    h2 = fab.host("h2")
    assert evpn.wait_peers(h2, others(fab, h2))
    applies = evpn.status(h2)["applies"]
    d = evpn.frr["h2"]
    d.stop(sig=signal.SIGKILL)
    # A killed daemon leaves its vty socket: its exit is seen through its pidfd.
    assert wait_until(lambda: evpn.status(h2)["state"] == "down"
                      and "exited (pid" in evpn.status(h2)["reason"], 20), evpn.status(h2)
    doctor = h2.box.ctl("doctor", "--json", check=False)
    assert '"frr-down"' in doctor.stdout
    # The other hosts see their neighbour go.
    h1 = fab.host("h1")
    assert wait_until(lambda: evpn.status(h1)["peers"].get(h2.underlay_ip) != "Established",
                      30, 0.2)
    assert '"bgp-peer-down"' in h1.box.ctl("doctor", "--json", check=False).stdout
    d.start()  # bgpd comes back with an empty configuration
    assert evpn.wait_peers(h2, others(fab, h2)), evpn.status(h2)
    assert evpn.status(h2)["applies"] > applies
    assert f"router bgp {ASN}" in d.running_config()
    assert evpn.wait_peers(h1, others(fab, h1))


def test_restart_of_kvmnetd_writes_nothing_to_frr(evpn: EvpnFabric) -> None:
    fab = evpn.fab
    fab.start()
    h1 = fab.host("h1")
    assert evpn.wait_peers(h1, others(fab, h1))
    before = evpn.frr["h1"].running_config()
    h1.box.stop_daemon()
    h1.box.start_daemon("--no-bus")
    assert wait_until(lambda: evpn.status(h1)["state"] == "applied", 20), evpn.status(h1)
    st = evpn.status(h1)
    assert st["applies"] == 0  # it read FRR's configuration, found its part, wrote nothing
    assert evpn.frr["h1"].running_config() == before


def test_removed_host_stops_being_a_neighbour_and_hand_lines_stay(evpn: EvpnFabric) -> None:
    fab = evpn.fab
    fab.start()
    h1, h3 = fab.host("h1"), fab.host("h3")
    assert evpn.wait_peers(h1, others(fab, h1))
    d = evpn.frr["h1"]
    # Written by hand beside kvmnetd's part and inside its instance.
    d.configure("ip prefix-list HAND seq 5 permit 10.0.0.0/8",
                f"router bgp {ASN}", "bgp log-neighbor-changes")
    h1.box.write_config(fab.config(h1, peers=[fab.host("h2")]))
    h1.box.daemon.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    assert evpn.wait_peers(h1, {fab.host("h2").underlay_ip}), evpn.status(h1)
    conf = d.running_config()
    assert h3.underlay_ip not in conf
    assert "ip prefix-list HAND seq 5 permit 10.0.0.0/8" in conf
    assert " bgp log-neighbor-changes" in conf
    assert "192.0.2.12 activate" in conf


def test_status_lists_frr_and_neighbours(evpn: EvpnFabric) -> None:
    fab = evpn.fab
    fab.start()
    h1 = fab.host("h1")
    assert evpn.wait_peers(h1, others(fab, h1))
    out = h1.box.ctl_out("status")
    assert f"frr (pathspace {fab.pathspace(h1)}): applied" in out
    assert "bgp neighbour 192.0.2.12: Established" in out
    # network show lists the overlay's peers: for evpn, the BGP neighbours.
    assert "peer 192.0.2.13: bgp Established" in h1.box.ctl_out("network", "show", "ov")


TCP_SINK = """
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 7001)); s.listen(1); s.settimeout(20)
c, _ = s.accept(); c.settimeout(20)
n = 0
while (b := c.recv(65536)):
    n += len(b)
c.sendall(str(n).encode()); c.close()
"""
TCP_SEND = """
import socket, sys
c = socket.create_connection((sys.argv[1], 7001), timeout=20)
for _ in range(200):
    c.sendall(b"x" * 1400)
c.shutdown(socket.SHUT_WR)
print(c.recv(64).decode())
"""


def tcp_transfer(src_ns: str, dst_ns: str, dst_ip: str) -> str:
    """200 writes of 1,400 bytes (full-size segments at the guests' MTU) across hosts."""
    sink = subprocess.Popen(["ip", "netns", "exec", dst_ns, PY, "-c", TCP_SINK],
                            stdout=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: "7001" in sh("ss", "-ltn", ns=dst_ns).stdout, 5)
        return sh(PY, "-c", TCP_SEND, dst_ip, ns=src_ns, check=False, timeout=40).stdout.strip()
    finally:
        sink.kill()
        sink.wait(5)


def started(evpn: EvpnFabric) -> Fabric:
    fab = evpn.fab
    fab.start()
    for h in fab.hosts:
        assert evpn.wait_peers(h, others(fab, h)), evpn.status(h)
    return fab


def test_guests_on_different_hosts(evpn: EvpnFabric) -> None:
    fab = started(evpn)
    guests = [fab.guest(h) for h in fab.hosts]
    ips = [fab.lease(g) for g in guests]
    assert all(ips) and len(set(ips)) == 3, ips
    g1, g2, g3 = guests
    # Each lease came with the overlay's MTU: the underlay's less VXLAN's 50 bytes.
    assert any("mtu=1450" in e for e in g1.events()), g1.events()
    assert wait_until(lambda: ping(g1.ns, str(ips[1])), 15)
    assert ping(g1.ns, str(ips[2]), count=2) and ping(g3.ns, str(ips[1]), count=2)
    assert ping(g2.ns, "10.60.0.1", count=2)  # the anycast gateway, on its own host
    for g in guests:
        # Out through its own host's NAT: each host has its own upstream.
        assert g.host.box.source_seen_by_upstream(g.ns) is not None
    assert tcp_transfer(g1.ns, g3.ns, str(ips[2])) == str(200 * 1400)
    # The remote guests are known to each host's zebra from type-2 routes.
    macs = evpn.frr["h1"].vtysh("show evpn mac vni all")
    assert g2.mac in macs and g3.mac in macs
    # ... and become known hosts of its dnsmasq: their addresses are never handed out here.
    hosts = fab.hosts[0].box.run_dir / "ov.hosts"
    assert wait_until(lambda: hosts.exists() and all(
        f"{g.mac},{ip}" in hosts.read_text() for g, ip in ((g2, ips[1]), (g3, ips[2]))), 15), (
        hosts.read_text() if hosts.exists() else "no hosts file",
        sh("ip", "neigh", "show", "nud", "all", ns=fab.hosts[0].ns).stdout)


def test_guest_moves_keeps_address_and_is_reached_again(evpn: EvpnFabric) -> None:
    fab = started(evpn)
    h1, h2, h3 = fab.hosts
    g = fab.guest(h1)
    other = fab.guest(h3)
    ip, oip = fab.lease(g), fab.lease(other)
    assert ip and oip
    assert wait_until(lambda: ping(other.ns, ip), 15)
    fab.move(g, h2)
    assert wait_until(lambda: ping(other.ns, ip), 15)
    event = fab.renew(g)
    assert event is not None and event.startswith("renew ") and f"ip={ip}" in event, g.events()


def test_thirty_guests_hold_thirty_addresses(evpn: EvpnFabric) -> None:
    fab = started(evpn)
    guests = [fab.guest(fab.hosts[i % 3]) for i in range(30)]
    ips = [fab.lease(g) for g in guests]
    assert all(ips), ips
    assert len(set(ips)) == 30


def test_bfd_on_the_neighbours(evpn: EvpnFabric) -> None:
    fab = evpn.fab
    evpn.bfd = True  # the test starts bfdd too: bgpd asks it for the sessions
    fab.start()
    h1 = fab.host("h1")
    assert evpn.wait_peers(h1, others(fab, h1))
    for h in fab.hosts:
        conf = fab.config(h).replace("[daemon.overlay]\n", "[daemon.overlay]\nbfd = true\n")
        h.box.write_config(conf)
        h.box.daemon.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    d = evpn.frr["h1"]
    assert wait_until(lambda: " neighbor 192.0.2.12 bfd" in d.running_config(), 20)
    assert wait_until(lambda: d.vtysh("show bfd peers brief").count(" up ") == 2, 30, 0.2), (
        d.vtysh("show bfd peers brief"))
    assert evpn.wait_peers(h1, others(fab, h1))


def test_teardown_on_stop_takes_the_part_out_and_keeps_hand_lines(evpn: EvpnFabric) -> None:
    fab = evpn.fab
    fab.start()
    h1 = fab.host("h1")
    assert evpn.wait_peers(h1, others(fab, h1))
    d = evpn.frr["h1"]
    d.configure("ip prefix-list HAND seq 5 permit 10.0.0.0/8")
    h1.box.stop_daemon()
    h1.box.write_config(fab.config(h1).replace("[daemon]\n", "[daemon]\nteardown_on_stop = true\n"))
    h1.box.start_daemon("--no-bus")
    assert wait_until(lambda: evpn.status(h1)["state"] == "applied", 20)
    h1.box.stop_daemon()
    conf = d.running_config()
    assert f"router bgp {ASN}" not in conf
    assert "ip prefix-list HAND seq 5 permit 10.0.0.0/8" in conf
