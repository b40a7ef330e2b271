"""Port forwards with the real daemon, nftables and kernel: reached from upstream (the guest
sees the real client), from the host itself, from another guest (hairpin) and over IPv6;
a forward by host name follows the host; healed when flushed; gone with its network."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.netns import sh
from tests.support.rig import HOST_UPLINK_IP, PY, UPSTREAM_IP, Sandbox, wait_until
from tests.support.toml import attach_toml, network_toml

pytestmark = pytest.mark.integration

HOST6, UPSTREAM6 = "2001:db8:51::1", "2001:db8:51::2"
WEB, WEB6, OTHER, MOVED = "10.70.0.5", "fd00:70::5", "10.70.0.6", "10.70.0.7"

# In a guest: answer each connection on port 80 with "NAME PEER", and log PEER.
SERVER = """
import socket, sys
name, log = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", 80))
s.listen(16)
while True:
    conn, peer = s.accept()
    addr = peer[0].removeprefix("::ffff:")
    with open(log, "a") as f:
        f.write(addr + "\\n")
    conn.sendall(f"{name} {addr}\\n".encode())
    conn.close()
"""

CLIENT = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.settimeout(2)
s.connect((host, port))
print(s.makefile().readline().strip())
"""


def config(web: str = WEB, with_net: bool = True) -> str:
    if not with_net:
        return network_toml("keep", "nat", "kvkeep0", "10.71.0.1/24", dns=False)
    return (network_toml("fw", "nat", "kvfw0", "10.70.0.1/24", dns=False, ipv6="fd00:70::1/64",
                         hosts=[("52:54:00:70:00:05", web, "web")],
                         dhcp={"dhcpv6": "stateful", "ranges6": ["fd00:70::100-fd00:70::1ff"]})
            + '[[network.fw.dhcp.host6]]\nname = "web"\nip = "fd00:70::5"\n'
            + '[[network.fw.forward]]\nproto = "tcp"\nport = 8080\nto = "web"\nto_port = 80\n'
            + attach_toml("fw", ifname="pf*"))


def serve(box: Sandbox, ns: str, name: str) -> Path:
    log = box.tmp / f"{name}.peers"
    log.touch()
    p = subprocess.Popen(["ip", "netns", "exec", ns, PY, "-c", SERVER, name, str(log)])
    box.stack.callback(_stop, p)
    return log


def _stop(p: subprocess.Popen[bytes]) -> None:
    p.kill()
    p.wait(5)


def connect(ns: str, host: str, port: int = 8080) -> str | None:
    """'NAME PEER' from the guest that answered, or None."""
    r = sh(PY, "-c", CLIENT, host, str(port), ns=ns, check=False)
    return r.stdout.strip() if r.returncode == 0 else None


def reached(ns: str, host: str, expect: str, timeout: float = 10) -> bool:
    return bool(wait_until(lambda: connect(ns, host) == expect, timeout=timeout,
                           interval=0.2))


def v6_guest(box: Sandbox, port: str, v4: str, v6: str) -> str:
    ns = box.guest(port, f"{v4}/24", "10.70.0.1")
    sh("ip", "addr", "add", f"{v6}/64", "dev", "eth0", "nodad", ns=ns)
    sh("ip", "route", "add", "default", "via", "fd00:70::1", ns=ns)
    return ns


def setup(box: Sandbox) -> tuple[str, str, Path]:
    """The daemon with network fw, guest web serving, guest other; IPv6 upstream."""
    sh("ip", "addr", "add", f"{HOST6}/64", "dev", "uplink0", "nodad", ns=box.host)
    sh("ip", "addr", "add", f"{UPSTREAM6}/64", "dev", "eth0", "nodad", ns=box.upstream)
    box.write_config(config())
    web = v6_guest(box, "pf1", WEB, WEB6)
    other = v6_guest(box, "pf2", OTHER, "fd00:70::6")
    log = serve(box, web, "web")
    box.start_daemon("--no-bus")
    assert wait_until(lambda: box.master_of("pf1") == "kvfw0"
                      and box.master_of("pf2") == "kvfw0")
    return web, other, log


def reload(box: Sandbox, text: str) -> None:
    box.write_config(text)
    assert box.daemon is not None
    box.daemon.send_signal(signal.SIGHUP)


def test_reached_from_upstream_host_and_hairpin_with_the_right_client(box: Sandbox) -> None:
    _, other, log = setup(box)
    # From outside: the guest sees the upstream client itself, not the host.
    assert reached(box.upstream, HOST_UPLINK_IP, f"web {UPSTREAM_IP}")
    assert UPSTREAM_IP in log.read_text().split()
    # From the host itself, to its own address.
    assert connect(box.host, HOST_UPLINK_IP) == f"web {HOST_UPLINK_IP}"
    # Hairpin: another guest, to the host's address; answered through the host.
    assert connect(other, HOST_UPLINK_IP) == "web 10.70.0.1"
    # The gateway address is not a forward's: nothing listens on the host there.
    assert connect(other, "10.70.0.1") is None


def test_ipv6_forward(box: Sandbox) -> None:
    _, other, log = setup(box)
    assert reached(box.upstream, HOST6, f"web {UPSTREAM6}")
    assert UPSTREAM6 in log.read_text().split()
    assert connect(box.host, HOST6) == f"web {HOST6}"
    assert connect(other, HOST6) == "web fd00:70::1"


def test_forward_by_host_name_follows_the_host_after_reload(box: Sandbox) -> None:
    setup(box)
    assert reached(box.upstream, HOST_UPLINK_IP, f"web {UPSTREAM_IP}")
    moved = box.guest("pf3", f"{MOVED}/24", "10.70.0.1")
    serve(box, moved, "moved")
    reload(box, config(web=MOVED))
    assert reached(box.upstream, HOST_UPLINK_IP, f"moved {UPSTREAM_IP}")
    assert wait_until(lambda: ": 10.70.0.7 . 80" in box.nft())
    assert ": 10.70.0.5 . 80" not in box.nft()


@pytest.mark.parametrize("damage", [
    ["flush", "table", "inet", "kvmnetd"],
    ["flush", "chain", "inet", "kvmnetd", "prerouting"],
    ["delete", "chain", "inet", "kvmnetd", "output"],
    ["delete", "element", "inet", "kvmnetd", "forward0_ip_port", "{ tcp . 8080 }"],
])
def test_healed_when_rules_are_flushed_or_deleted(box: Sandbox, damage: list[str]) -> None:
    setup(box)
    assert reached(box.upstream, HOST_UPLINK_IP, f"web {UPSTREAM_IP}")
    before = box.nft()
    sh("nft", *damage, ns=box.host)
    assert wait_until(lambda: box.nft() == before, timeout=10)
    assert connect(box.upstream, HOST_UPLINK_IP) == f"web {UPSTREAM_IP}"
    assert connect(box.host, HOST_UPLINK_IP) == f"web {HOST_UPLINK_IP}"


def test_removed_with_its_network(box: Sandbox) -> None:
    setup(box)
    assert reached(box.upstream, HOST_UPLINK_IP, f"web {UPSTREAM_IP}")
    reload(box, config(with_net=False))
    assert wait_until(lambda: "dnat" not in box.nft() and "kvfw0" not in box.nft(),
                      timeout=10)
    time.sleep(0.2)
    assert connect(box.upstream, HOST_UPLINK_IP) is None


def test_runtime_forward_added_listed_kept_across_restart_and_removed(box: Sandbox) -> None:
    _, other, _ = setup(box)
    box.ctl("forward", "add", "fw", "tcp", "9090", f"{OTHER}:80")
    serve(box, other, "other")
    assert wait_until(lambda: connect(box.upstream, HOST_UPLINK_IP, 9090)
                      == f"other {UPSTREAM_IP}", timeout=10)
    rows = box.jctl("forward", "list", "fw")
    assert rows == [
        {"network": "fw", "proto": "tcp", "port": "8080", "to": "web", "to_port": 80,
         "runtime": False},
        {"network": "fw", "proto": "tcp", "port": "9090", "to": OTHER, "to_port": 80,
         "runtime": True}]
    # A restart brings it back, from state_dir.
    box.stop_daemon()
    box.start_daemon("--no-bus")
    # Read back before the first pass: the table is already right, nothing is written.
    ready = [ln for ln in box.log.read_text().splitlines() if "daemon.ready" in ln][-1]
    assert "writes=0" in ready, ready
    assert wait_until(lambda: connect(box.upstream, HOST_UPLINK_IP, 9090)
                      == f"other {UPSTREAM_IP}", timeout=10)
    assert len(box.jctl("forward", "list")) == 2
    box.ctl("forward", "remove", "fw", "tcp", "9090")
    assert wait_until(lambda: "tcp dport 9090" not in box.nft(), timeout=10)
    assert connect(box.upstream, HOST_UPLINK_IP, 9090) is None
    assert [r["port"] for r in box.jctl("forward", "list")] == ["8080"]


@pytest.mark.parametrize(("args", "message"), [
    (["tcp", "8080", OTHER], "overlaps tcp 8080 -> web:80 of network fw"),
    (["udp", "60-70", OTHER], "udp port 67 is kvmnetd's DHCP (dnsmasq)"),
    (["tcp", "9090", "10.99.0.5"], "is not a guest address of network fw"),
    (["tcp", "9090", "nobody"], "neither an address nor the name"),
    (["tcp", "0", OTHER], "outside 1..65535"),
])
def test_bad_runtime_forwards_are_refused(box: Sandbox, args: list[str], message: str) -> None:
    setup(box)
    r = box.ctl("forward", "add", "fw", *args, check=False)
    assert r.returncode == 1 and message in r.stderr, r.stderr
    assert [r["port"] for r in box.jctl("forward", "list")] == ["8080"]


def test_persisted_forward_is_written_to_the_networks_file(box: Sandbox) -> None:
    setup(box)
    # Declared in the main file: persisting there is refused, with where it is.
    r = box.ctl("forward", "add", "fw", "tcp", "9090", OTHER, "--persist", check=False)
    assert r.returncode == 1 and "kvmnetd.toml:1" in r.stderr, r.stderr
    net = box.networks_dir / "side.toml"
    net.write_text(network_toml("side", "nat", "kvside0", "10.72.0.1/24", dns=False))
    reload(box, config())
    assert wait_until(lambda: any(n["name"] == "side" for n in box.jctl("network", "list")))
    box.ctl("forward", "add", "side", "udp", "7000-7010", "10.72.0.5", "--persist")
    assert '{ proto = "udp", port = "7000-7010", to = "10.72.0.5" }' in net.read_text()
    reload(box, config())
    time.sleep(0.5)
    rows = box.jctl("forward", "list", "side")
    assert rows == [{"network": "side", "proto": "udp", "port": "7000-7010", "to": "10.72.0.5",
                     "to_port": None, "runtime": False}]
    box.ctl("forward", "remove", "side", "udp", "7000")
    assert "7000" not in net.read_text()


# In a guest: answer each datagram to ports 5000-5002 with "PORT PEER".
UDP_SERVER = """
import select, socket
socks = []
for port in (5000, 5001, 5002):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    socks.append(s)
while True:
    for s in select.select(socks, [], [])[0]:
        data, peer = s.recvfrom(512)
        s.sendto(f"{s.getsockname()[1]} {peer[0]}".encode(), peer)
"""

UDP_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
s.sendto(b"hi", (sys.argv[1], int(sys.argv[2])))
print(s.recvfrom(512)[0].decode())
"""


def test_udp_port_range_keeps_its_ports(box: Sandbox) -> None:
    _, other, _ = setup(box)
    p = subprocess.Popen(["ip", "netns", "exec", other, PY, "-c", UDP_SERVER])
    box.stack.callback(_stop, p)
    box.ctl("forward", "add", "fw", "udp", "5000-5002", OTHER)

    def ask(port: int) -> str | None:
        r = sh(PY, "-c", UDP_CLIENT, HOST_UPLINK_IP, str(port), ns=box.upstream, check=False)
        return r.stdout.strip() if r.returncode == 0 else None

    assert wait_until(lambda: ask(5001) == f"5001 {UPSTREAM_IP}", timeout=10)
    assert ask(5000) == f"5000 {UPSTREAM_IP}" and ask(5002) == f"5002 {UPSTREAM_IP}"
    assert ask(5003) is None


OVERLAP = '[[network.fw.forward]]\nproto = "tcp"\nport = "8000-8090"\nto = "10.70.0.6"\n'
DNS_PORT = '[[network.fw.forward]]\nproto = "udp"\nport = 67\nto = "10.70.0.6"\n'


@pytest.mark.parametrize(("extra", "message"), [
    (OVERLAP, "tcp 8000-8090 -> 10.70.0.6 overlaps tcp 8080 -> web:80 of network fw"),
    (DNS_PORT, "udp port 67 is kvmnetd's DHCP (dnsmasq)"),
])
def test_bad_forwards_in_a_reload_are_refused_with_file_line(box: Sandbox, extra: str,
                                                             message: str) -> None:
    setup(box)
    assert reached(box.upstream, HOST_UPLINK_IP, f"web {UPSTREAM_IP}")
    before = box.nft()
    text = config() + extra
    box.write_config(text)
    port_line = len(text.splitlines()) - 1  # the added table ends in port, to
    r = box.ctl("reload", check=False)
    assert r.returncode == 1
    assert f"{box.config}:{port_line}: network.fw.forward[1].port: {message}" in r.stderr, \
        r.stderr
    # Nothing changed: the running forwards stay.
    assert box.nft() == before
    assert connect(box.upstream, HOST_UPLINK_IP) == f"web {UPSTREAM_IP}"


def test_a_forward_with_address_listens_there_only(box: Sandbox) -> None:
    setup(box)
    sh("ip", "addr", "add", "198.51.100.9/24", "dev", "uplink0", ns=box.host)
    reload(box, config() + '[[network.fw.forward]]\nproto = "tcp"\nport = 8081\n'
                           f'address = "{HOST_UPLINK_IP}"\nto = "web"\nto_port = 80\n')
    assert wait_until(lambda: connect(box.upstream, HOST_UPLINK_IP, 8081)
                      == f"web {UPSTREAM_IP}", timeout=10)
    assert connect(box.upstream, "198.51.100.9", 8081) is None
    # Without address: every host address.
    assert connect(box.upstream, "198.51.100.9") == f"web {UPSTREAM_IP}"
