"""One network across three simulated hosts, static VXLAN (issue #17).

Each host runs its own kvmnetd in its own namespace; the hosts share an underlay bridge
(tests/support/fabric.py). Guests are namespaces with a long-running udhcpc.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator

import pytest

from tests.support.fabric import Fabric, FabricHost, fabric
from tests.support.netns import ping, sh
from tests.support.rig import FAR_HOST, PY, wait_until

VXLAN = "kvx100"
BRIDGE = "kvov"
GATEWAY = "10.60.0.1"
ANYCAST_MAC = "02:6b:76:00:00:64"

TCP_SINK = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5001))
s.listen(1)
print("listening", flush=True)
conn, _ = s.accept()
total = 0
while chunk := conn.recv(65536):
    total += len(chunk)
print(total, flush=True)
"""

TCP_SOURCE = """
import socket, sys
s = socket.create_connection((sys.argv[1], 5001), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for _ in range(int(sys.argv[2])):
    s.sendall(b"x" * 1400)
s.close()
"""


# A don't-fragment datagram of a given size and its echo (no ping binary here, and
# busybox ping cannot set DF).
DF_ECHO = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 5002))
print("listening", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(str(len(data)).encode(), peer)
"""

DF_SEND = """
import errno, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER, IP_PMTUDISC_DO
s.settimeout(2)
for _ in range(3):
    try:
        s.sendto(b"x" * int(sys.argv[2]), (sys.argv[1], 5002))
    except OSError as e:
        print("refused", errno.errorcode[e.errno]); break
    try:
        print("echoed", s.recv(64).decode()); break
    except socket.timeout:
        continue
else:
    print("lost")
"""


@pytest.fixture
def fab() -> Iterator[Fabric]:
    with fabric(3, "static") as f:
        yield f


def flood_list(host: FabricHost) -> set[str]:
    out = sh("bridge", "-j", "fdb", "show", "dev", VXLAN, ns=host.ns, check=False).stdout
    return {e["dst"] for e in json.loads(out or "[]")
            if e.get("mac") == "00:00:00:00:00:00" and "dst" in e}


def vxlan_details(host: FabricHost) -> dict[str, object]:
    out = sh("ip", "-d", "-j", "link", "show", VXLAN, ns=host.ns, check=False).stdout
    links = json.loads(out or "[]")
    return links[0] if links else {}


def writes_at_ready(host: FabricHost) -> list[int]:
    return [int(w) for w in re.findall(r"event='daemon.ready'.*?writes=(\d+)",
                                       host.box.log.read_text())]


def reload(host: FabricHost, config: str) -> None:
    host.box.write_config(config)
    assert host.box.daemon is not None
    host.box.daemon.send_signal(signal.SIGHUP)
    host.box.wait_notify("READY=1")
    assert "config.reload_refused" not in host.box.log.read_text()


def test_vxlan_device_flood_list_and_anycast_gateway(fab: Fabric) -> None:
    fab.start()
    for host in fab.hosts:
        vx = vxlan_details(host)
        info = vx["linkinfo"]["info_data"]  # type: ignore[index]
        assert (info["id"], info["local"], info["port"]) == (100, host.underlay_ip, 4789)
        assert info["learning"] is False
        assert vx["master"] == BRIDGE and vx["mtu"] == 1450
        assert vx["inet6_addr_gen_mode"] == "none"
        assert vx["linkinfo"]["info_slave_data"]["neigh_suppress"] is True  # type: ignore[index]
        assert flood_list(host) == {h.underlay_ip for h in fab.hosts if h is not host}
        br = json.loads(sh("ip", "-d", "-j", "link", "show", BRIDGE, ns=host.ns).stdout)[0]
        assert br["address"] == ANYCAST_MAC and br["mtu"] == 1450
        assert br["inet6_addr_gen_mode"] == "none"
        assert sh("sysctl", "-n", f"net.ipv4.conf.{BRIDGE}.arp_accept",
                  ns=host.ns).stdout.strip() == "1"
        assert "fe80:" not in sh("ip", "-6", "addr", "show", "dev", BRIDGE, ns=host.ns).stdout


def test_guests_on_different_hosts_reach_each_other_gateway_and_upstream(fab: Fabric) -> None:
    fab.start()
    guests = [fab.guest(h) for h in fab.hosts]
    ips = [fab.lease(g) for g in guests]
    assert all(ips) and len(set(ips)) == 3, ips
    for g in guests:
        assert "mtu=1450" in g.events()[-1]
        assert sh("ip", "-j", "link", "show", "eth0", ns=g.ns).stdout.count('"mtu":1450') == 1
        for ip in ips:
            assert ping(g.ns, ip or "", count=2)
        assert ping(g.ns, GATEWAY)
        # The gateway answers with the same MAC on every host, and from the guest's own.
        neigh = sh("ip", "neigh", "show", GATEWAY, ns=g.ns).stdout
        assert ANYCAST_MAC in neigh
    for g in guests:
        # Each host's own upstream router: only that host's masquerade can reach it, and
        # it sees the host's uplink address (the same in every Sandbox).
        assert g.host.box.source_seen_by_upstream(g.ns, FAR_HOST) == "198.51.100.1"
        counters = sh("nft", "list", "table", "inet", "kvmnetd", ns=g.host.ns).stdout
        assert "masquerade" in counters


def test_dhcp_is_answered_by_the_guests_own_host_only(fab: Fabric) -> None:
    fab.start()
    for host in fab.hosts:
        g = fab.guest(host)
        assert fab.lease(g)
    for host in fab.hosts:
        leases = (host.box.state_dir / "ov.leases").read_text()
        mine = [g.mac for g in fab.guests if g.host is host]
        others = [g.mac for g in fab.guests if g.host is not host]
        assert all(m in leases for m in mine)
        assert not any(m in leases for m in others), leases


def test_full_size_packets_cross_and_larger_ones_fail_loudly(fab: Fabric) -> None:
    import subprocess

    fab.start()
    a, b = fab.guest(fab.hosts[0]), fab.guest(fab.hosts[2])
    assert fab.lease(a) and fab.lease(b)
    assert b.ip is not None
    echo = subprocess.Popen(["ip", "netns", "exec", b.ns, PY, "-c", DF_ECHO],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert echo.stdout is not None and echo.stdout.readline().strip() == "listening"
        # 1450 - 20 (IPv4) - 8 (UDP): the largest datagram the guests' MTU carries, DF set.
        got = sh(PY, "-c", DF_SEND, b.ip, "1422", ns=a.ns, check=False)
        assert got.stdout.strip() == "echoed 1422", got.stdout + got.stderr
        # One byte more is refused at the sender with an error, never silently lost.
        got = sh(PY, "-c", DF_SEND, b.ip, "1423", ns=a.ns, check=False)
        assert got.stdout.strip() == "refused EMSGSIZE", got.stdout + got.stderr
    finally:
        echo.kill()
        echo.wait(5)


def test_tcp_transfer_across_hosts_completes(fab: Fabric) -> None:
    import subprocess

    fab.start()
    a, b = fab.guest(fab.hosts[0]), fab.guest(fab.hosts[1])
    assert fab.lease(a) and fab.lease(b)
    assert b.ip is not None
    sink = subprocess.Popen(["ip", "netns", "exec", b.ns, PY, "-c", TCP_SINK],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "listening"
        count = 1000
        sh(PY, "-c", TCP_SOURCE, b.ip, str(count), ns=a.ns, timeout=60)
        assert sink.stdout.readline().strip() == str(1400 * count)
    finally:
        sink.kill()
        sink.wait(5)


def test_moved_guest_keeps_address_renewal_acked_and_is_reachable(fab: Fabric) -> None:
    fab.start()
    h1, h2, h3 = fab.hosts
    g = fab.guest(h1)
    watchers = [fab.guest(h1), fab.guest(h3)]
    ip = fab.lease(g)
    assert ip and all(fab.lease(w) for w in watchers)
    assert all(ping(w.ns, ip, count=2) for w in watchers)
    fab.move(g, h2)
    assert wait_until(lambda: h2.box.master_of(g.port) == BRIDGE, 10)
    for w in watchers:
        assert wait_until(lambda w=w: ping(w.ns, ip), 10), "no reachability after the move"
    # The new host learned the guest from its announcement and knows it for DHCP.
    hosts = h2.box.run_dir / "ov.hosts"
    assert wait_until(lambda: f"{g.mac},{ip}" in hosts.read_text(), 10)
    event = fab.renew(g)
    assert event is not None and event.startswith("renew "), g.events()
    assert f"ip={ip}" in event
    assert g.mac in (h2.box.state_dir / "ov.leases").read_text()
    # And it reaches out through its new host.
    assert ping(g.ns, GATEWAY)
    assert h2.box.source_seen_by_upstream(g.ns, FAR_HOST) == "198.51.100.1"


def test_thirty_guests_across_three_hosts_hold_thirty_addresses(fab: Fabric) -> None:
    fab.start()
    guests = [fab.guest(fab.hosts[i % 3]) for i in range(30)]
    ips = [fab.lease(g, timeout=60) for g in guests]
    assert None not in ips
    assert len(set(ips)) == 30, ips


def test_restart_writes_nothing(fab: Fabric) -> None:
    fab.start()
    h1 = fab.hosts[0]
    g = fab.guest(h1)
    assert fab.lease(g)
    links = h1.box.link_table()
    fdb = sh("bridge", "fdb", "show", "dev", VXLAN, ns=h1.ns).stdout
    details = vxlan_details(h1)
    ruleset = h1.box.nft()
    h1.box.stop_daemon()
    h1.box.start_daemon("--no-bus")
    assert writes_at_ready(h1)[-1] == 0
    assert h1.box.link_table() == links
    assert sh("bridge", "fdb", "show", "dev", VXLAN, ns=h1.ns).stdout == fdb
    assert vxlan_details(h1) == details
    assert h1.box.nft() == ruleset


def test_deleted_vxlan_device_and_flood_entry_are_healed(fab: Fabric) -> None:
    fab.start()
    h1, h2, _ = fab.hosts
    want = flood_list(h1)
    sh("bridge", "fdb", "del", "00:00:00:00:00:00", "dev", VXLAN, "dst", h2.underlay_ip,
       ns=h1.ns)
    assert wait_until(lambda: flood_list(h1) == want, 10)
    sh("ip", "link", "del", VXLAN, ns=h1.ns)
    assert wait_until(lambda: flood_list(h1) == want and vxlan_details(h1).get("master")
                      == BRIDGE, 10)
    sh("bridge", "link", "set", "dev", VXLAN, "neigh_suppress", "off", ns=h1.ns)
    assert wait_until(lambda: vxlan_details(h1)["linkinfo"]["info_slave_data"]  # type: ignore[index]
                      ["neigh_suppress"] is True, 10)


def test_a_host_removed_from_the_config_stops_being_a_peer(fab: Fabric) -> None:
    fab.start()
    h1, h2, h3 = fab.hosts
    assert flood_list(h1) == {h2.underlay_ip, h3.underlay_ip}
    reload(h1, fab.config(h1, peers=[h1, h2]))
    assert wait_until(lambda: flood_list(h1) == {h2.underlay_ip}, 10)
    # Added back, it is a peer again.
    reload(h1, fab.config(h1))
    assert wait_until(lambda: flood_list(h1) == {h2.underlay_ip, h3.underlay_ip}, 10)


def test_removing_the_overlay_network_removes_its_vxlan_device(fab: Fabric) -> None:
    fab.start()
    h1 = fab.hosts[0]
    reload(h1, fab.config(h1, networks='[network.ov]\nbridge = "kvov"\nipv4 = "10.60.0.1/24"\n\n'))
    assert wait_until(lambda: not vxlan_details(h1), 10)
    assert "table bridge" not in h1.box.nft()


def test_status_and_show_list_overlay_peers_and_remote_macs(fab: Fabric) -> None:
    fab.start()
    h1, h2, _ = fab.hosts
    a, b = fab.guest(h1), fab.guest(h2)
    assert fab.lease(a) and fab.lease(b)
    assert b.ip is not None and ping(a.ns, b.ip, count=2)

    def overlay() -> dict[str, object]:
        nets = h1.box.jctl("status")["networks"]
        return next(n["overlay"] for n in nets if n["name"] == "ov")

    assert wait_until(lambda: b.mac in overlay()["remote_macs"], 10)  # type: ignore[operator]
    ov = overlay()
    assert (ov["vni"], ov["mode"], ov["device"], ov["device_state"]) == (100, "static",
                                                                         VXLAN, "up")
    assert (ov["local"], ov["underlay"], ov["underlay_mtu"], ov["mtu"]) == (
        h1.underlay_ip, "ul0", 1500, 1450)
    assert ov["peers"] == [{"address": h.underlay_ip, "state": "answering"}
                           for h in fab.hosts[1:]]
    assert a.mac not in ov["remote_macs"]  # type: ignore[operator]
    assert ov["problems"] == []
    shown = h1.box.jctl("network", "show", "ov")
    assert shown["overlay"]["peers"] == ov["peers"]
    text = h1.box.ctl_out("status")
    assert f"peer {h1.underlay_ip}" not in text and f"peer {h2.underlay_ip}: answering" in text
    assert "remote MACs:" in text


def test_doctor_explains_a_silent_peer_and_an_mtu_mismatch(fab: Fabric) -> None:
    fab.start()
    h1, _, h3 = fab.hosts
    assert wait_until(lambda: not [f for f in h1.box.jctl("doctor")
                                   if f["check"].startswith("overlay")], 10)
    # The underlay shrinks below what the guests were told: a silent loss to come.
    sh("ip", "link", "set", "ul0", "mtu", "1400", ns=h1.ns)
    # A peer goes away: its address no longer answers on the underlay.
    sh("ip", "link", "set", "ul0", "down", ns=h3.ns)
    a = fab.guest(h1)
    assert fab.lease(a)
    sh("ip", "neigh", "flush", "dev", "ul0", ns=h1.ns)
    # Broadcasts go to every peer: ARP for the silent one fails.
    ping(a.ns, "10.60.0.250", count=3)

    def checks() -> dict[str, dict[str, str]]:
        found = h1.box.ctl("doctor", "--json", check=False)
        return {f["check"]: f for f in json.loads(found.stdout)}

    assert wait_until(lambda: "overlay-peer-silent" in checks(), 15), checks()
    found = checks()
    assert found["overlay-peer-silent"]["subject"] == h3.underlay_ip
    assert "1400" in found["overlay-mtu"]["message"] and "1500" in found["overlay-mtu"]["fix"]
    text = h1.box.ctl("doctor", check=False).stdout
    assert "overlay-mtu" in text and "does not answer ARP" in text
