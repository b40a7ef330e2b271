"""The dnsmasq supervisor against real dnsmasq and busybox clients, inside throwaway namespaces."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import pytest

from kvmnetd.adapters.dnsmasq.supervisor import DnsmasqSupervisor
from kvmnetd.model.desired import (
    Dhcp,
    DhcpHost,
    DhcpHost6,
    DhcpRange,
    Dns,
    DnsHost,
    Mode,
    Network,
    Settings,
)
from kvmnetd.model.errors import InvalidArgument
from kvmnetd.model.records import CoreEvent
from kvmnetd.plan.dnsmasq import dnsmasq_paths, render_config, render_hosts
from tests.support.netns import entered, netns, sh, veth_into

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("dnsmasq") is None
                       or shutil.which("busybox") is None,
                       reason="needs root, dnsmasq and busybox"),
]

T = TypeVar("T")
a4 = ipaddress.IPv4Address
GW = "10.70.0.1"
STATIC_MAC = "52:54:00:65:43:21"
SCRIPT = """#!/bin/sh
case "$1" in
bound|renew)
    ip addr add "$ip/$mask" dev "$interface"
    echo "IP=$ip"; echo "ROUTER=$router"; echo "DNS=$dns"; echo "DOMAIN=$domain"
    echo "BOOT=$boot_file"; echo "SIADDR=$siaddr";;
esac
"""


# busybox has no DHCPv6 client: a SOLICIT by hand, printing the address ADVERTISEd.
SOLICIT = """
import os, socket, struct, sys

def opt(code, data):
    return struct.pack("!HH", code, len(data)) + data

def options(data):
    while len(data) >= 4:
        code, size = struct.unpack("!HH", data[:4])
        yield code, data[4:4 + size]
        data = data[4 + size:]

duid = bytes.fromhex(sys.argv[1].replace(":", ""))
body = opt(1, duid) + opt(3, struct.pack("!III", 1, 0, 0)) + opt(8, bytes(2))
if len(sys.argv) > 2:  # the client FQDN option: flags, then the name as DNS labels
    body += opt(39, bytes(1) + bytes([len(sys.argv[2])]) + sys.argv[2].encode() + bytes(1))
xid = os.urandom(3)
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"eth0")
s.bind(("::", 546))
s.settimeout(1)
for _ in range(5):
    s.sendto(b"\\x01" + xid + body, ("ff02::1:2", 547, 0, socket.if_nametoindex("eth0")))
    try:
        data = s.recv(4096)
    except TimeoutError:
        continue
    if data[:1] != b"\\x02" or data[1:4] != xid:
        continue
    for code, value in options(data[4:]):
        if code == 3:
            for sub, addr in options(value[12:]):
                if sub == 5:
                    print(socket.inet_ntop(socket.AF_INET6, addr[:16]))
                    sys.exit(0)
sys.exit(1)
"""


@pytest.fixture
def base() -> Iterator[Path]:
    # Not tmp_path: that sits below a 0700 directory, and dnsmasq reads its hosts
    # file (and serves TFTP) as `nobody`, which needs every directory on the way.
    d = Path(tempfile.mkdtemp(prefix="kvmnetd-dnsmasq-"))
    d.chmod(0o755)
    script = d / "udhcpc.sh"
    script.write_text(SCRIPT)
    script.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def settings(base: Path, dnsmasq_path: str = "dnsmasq") -> Settings:
    return Settings(run_dir=str(base / "run"), state_dir=str(base / "state"),
                    dnsmasq_path=dnsmasq_path)


def network(ipv6: str | None = None, dns: Dns | None = None, **dhcp: object) -> Network:
    d = Dhcp(ranges=(DhcpRange(a4("10.70.0.100"), a4("10.70.0.150")),))
    return Network("t", Mode.NAT, "br0", ipaddress.IPv4Interface(f"{GW}/24"),
                   ipaddress.IPv6Interface(ipv6) if ipv6 else None,
                   dhcp=replace(d, **dhcp),  # type: ignore[arg-type]
                   dns=dns or Dns())


@contextlib.contextmanager
def lan() -> Iterator[str]:
    with netns("h") as host:
        sh("ip", "link", "add", "br0", "type", "bridge", ns=host)
        sh("ip", "addr", "add", f"{GW}/24", "dev", "br0", ns=host)
        sh("ip", "link", "set", "br0", "up", ns=host)
        yield host


@contextlib.contextmanager
def guest(host: str, port: str = "vg1", mac: str | None = None) -> Iterator[str]:
    with netns("g") as g:
        veth_into(host, g, port)
        if mac:
            sh("ip", "link", "set", "eth0", "address", mac, ns=g)
        sh("ip", "link", "set", port, "master", "br0", "up", ns=host)
        yield g


def dhcp(base: Path, g: str, *extra: str) -> dict[str, str]:
    sh("ip", "addr", "flush", "dev", "eth0", ns=g)
    r = sh("busybox", "udhcpc", "-i", "eth0", "-q", "-n", "-f", "-t", "5", "-T", "1",
           "-s", str(base / "udhcpc.sh"), *extra, ns=g, check=False)
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


def run(host: str, body: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """The supervisor and its children live in `host`: the loop thread is moved there."""
    with entered(host):
        return asyncio.run(body())


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> float:
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout, "timed out"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/status").read_text().find("State:\tZ") < 0


def test_leases_static_host_and_events(base: Path) -> None:
    events: list[CoreEvent] = []
    net = network(hosts=(DhcpHost(STATIC_MAC, a4("10.70.0.42"), "fixed"),))
    st = settings(base)
    with lan() as host, guest(host, "vg1") as g1, guest(host, "vg2", STATIC_MAC) as g2:
        async def body() -> None:
            sup = DnsmasqSupervisor(st, events.append)
            await sup.sync([net])
            assert sup.status("t").state == "running", sup.status("t")
            started = time.monotonic()
            got1 = dhcp(base, g1, "-x", "hostname:one")
            assert time.monotonic() - started < 1.5  # no ping check delay
            got2 = dhcp(base, g2)
            assert a4("10.70.0.100") <= a4(got1["IP"]) <= a4("10.70.0.150")
            assert got1["ROUTER"] == GW and got1["DNS"] == GW
            assert got2["IP"] == "10.70.0.42"
            leases = {x.ip: x for x in sup.leases("t")}
            assert leases[got1["IP"]].hostname == "one"
            assert leases["10.70.0.42"].mac == STATIC_MAC
            # The supervisor also reports its state (running): leases are the rest.
            assert [e.kind for e in events if e.lease is None] == ["network-changed"]
            await until(lambda: sum(e.lease is not None for e in events) >= 2, timeout=3)
            assert {(e.kind, e.lease.ip) for e in events if e.lease is not None} == {
                ("lease-added", got1["IP"]), ("lease-added", "10.70.0.42")}
            # Same config again: nothing written, nothing signalled, nothing spawned.
            conf = Path(st.run_dir) / "t.conf"
            stamp = conf.stat().st_mtime_ns, (Path(st.run_dir) / "t.hosts").stat().st_mtime_ns
            await sup.sync([net])
            assert (sup.spawns, sup.signals) == (1, 0)
            assert stamp == (conf.stat().st_mtime_ns,
                             (Path(st.run_dir) / "t.hosts").stat().st_mtime_ns)
            await sup.close(stop_children=True)

        run(host, body)
    lease_file = Path(st.state_dir) / "t.leases"
    # dnsmasq's user owns it; root reaches it through group root (the unit has no
    # CAP_DAC_OVERRIDE).
    user = pwd.getpwnam("kvmnetd-dnsmasq")
    st_ = lease_file.stat()
    assert (st_.st_uid, st_.st_gid, st_.st_mode & 0o777) == (user.pw_uid, 0, 0o664)
    assert "10.70.0.42" in lease_file.read_text()  # the lease file outlives the process
    assert not (Path(st.run_dir) / "t.conf").exists()
    assert (Path(st.run_dir)).stat().st_mode & 0o777 == 0o755


def test_dns_names_from_guests_and_host(base: Path) -> None:
    net = network(dns=Dns(domain="kvm.test"))
    with lan() as host, guest(host, "vg1") as g1, guest(host, "vg2") as g2:
        async def body() -> None:
            sup = DnsmasqSupervisor(settings(base), lambda e: None)
            await sup.sync([net])
            got = dhcp(base, g1, "-x", "hostname:alpha")
            assert got["DOMAIN"] == "kvm.test"
            dhcp(base, g2)
            for ns in (g2, host):
                out = sh("busybox", "nslookup", "alpha.kvm.test", GW, ns=ns).stdout
                assert got["IP"] in out, out
            await sup.close(stop_children=True)

        run(host, body)


def test_host_by_name_and_dns_hosts(base: Path) -> None:
    # libvirt's <host name= ip=> and <dns><host>: a guest gets its address by the name
    # its client sends, and fixed names answer with and without the domain.
    net = network(hosts=(DhcpHost(ip=a4("10.70.0.43"), name="vm1"),),
                  dns=Dns(domain="kvm.test", hosts=(
                      DnsHost(a4("10.70.0.5"), ("web", "www")),
                      DnsHost(ipaddress.ip_address("fd70::5"), ("web6",)))))
    with lan() as host, guest(host, "vg1") as g1, guest(host, "vg2") as g2:
        async def body() -> None:
            sup = DnsmasqSupervisor(settings(base), lambda e: None)
            await sup.sync([net])
            assert sup.status("t").state == "running", sup.status("t")
            assert dhcp(base, g1, "-x", "hostname:vm1")["IP"] == "10.70.0.43"
            other = dhcp(base, g2, "-x", "hostname:vm2")["IP"]
            assert a4("10.70.0.100") <= a4(other) <= a4("10.70.0.150")
            for name in ("web", "www", "web.kvm.test", "www.kvm.test"):
                # busybox asks for AAAA too, which a plain name without one cannot get
                # here (no upstream): only the A answer counts.
                out = sh("busybox", "nslookup", name, GW, ns=g2, check=False).stdout
                assert "Address: 10.70.0.5" in out, out
            out = sh("busybox", "nslookup", "-type=AAAA", "web6.kvm.test", GW, ns=g2).stdout
            assert "Address: fd70::5" in out, out
            out = sh("busybox", "nslookup", "10.70.0.5", GW, ns=g2).stdout
            assert "name = web" in out, out  # the first name is the reverse name
            await sup.close(stop_children=True)

        run(host, body)


def test_dhcpv6_hosts_by_duid_and_by_name(base: Path) -> None:
    duid = "0:3:0:1:52:54:0:11:22:33"  # libvirt's form: dnsmasq gets two digits per octet
    net = network(ipv6="fd70::1/64", dhcpv6="stateful", ra=False,
                  ranges6=(DhcpRange(ipaddress.ip_address("fd70::100"),
                                     ipaddress.ip_address("fd70::1ff")),),
                  hosts6=(DhcpHost6(id=duid, ip=ipaddress.IPv6Address("fd70::11")),
                          DhcpHost6(name="vm6", ip=ipaddress.IPv6Address("fd70::12"))))
    (base / "solicit.py").write_text(SOLICIT)

    def solicit(g: str, *args: str) -> str:
        r = sh(sys.executable, str(base / "solicit.py"), *args, ns=g, check=False)
        return r.stdout.strip()

    with lan() as host, guest(host, "vg1") as g:
        sh("ip", "-6", "addr", "add", "fd70::1/64", "dev", "br0", "nodad", ns=host)
        sh("ip", "-6", "addr", "add", "fe80::99/64", "dev", "eth0", "nodad", ns=g)

        async def body() -> None:
            sup = DnsmasqSupervisor(settings(base), lambda e: None)
            await sup.sync([net])
            assert sup.status("t").state == "running", sup.status("t")
            assert solicit(g, "00:03:00:01:52:54:00:11:22:33") == "fd70::11"
            assert solicit(g, "00:03:00:01:52:54:00:44:55:66", "vm6") == "fd70::12"
            got = ipaddress.IPv6Address(solicit(g, "00:03:00:01:52:54:00:77:88:99"))
            assert ipaddress.IPv6Address("fd70::100") <= got <= ipaddress.IPv6Address("fd70::1ff")
            await sup.close(stop_children=True)

        run(host, body)


def test_tftp_and_boot_options(base: Path) -> None:
    root = base / "tftp"
    root.mkdir(mode=0o755)
    (root / "boot.txt").write_text("kernel goes here\n")
    (root / "boot.txt").chmod(0o644)
    net = network(tftp_root=str(root), boot_file="boot.txt")
    with lan() as host, guest(host) as g:
        async def body() -> None:
            sup = DnsmasqSupervisor(settings(base), lambda e: None)
            await sup.sync([net])
            got = dhcp(base, g)
            assert got["BOOT"] == "boot.txt" and got["SIADDR"] == GW
            out = base / "fetched"
            sh("busybox", "tftp", "-g", "-r", "boot.txt", "-l", str(out), GW, ns=g)
            assert out.read_text() == "kernel goes here\n"
            await sup.close(stop_children=True)

        run(host, body)


def test_ipv6_router_advertisements(base: Path) -> None:
    net = network(ipv6="fd77::1/64", ra=True)
    with lan() as host, guest(host) as g:
        sh("ip", "-6", "addr", "add", "fd77::1/64", "dev", "br0", "nodad", ns=host)
        sh("sysctl", "-qw", "net.ipv6.conf.eth0.accept_ra=1", ns=g)

        async def body() -> None:
            sup = DnsmasqSupervisor(settings(base), lambda e: None)
            await sup.sync([net])
            assert sup.status("t").state == "running", sup.status("t")
            await until(lambda: "inet6 fd77:" in sh("ip", "-6", "addr", "show", "dev", "eth0",
                                                    ns=g).stdout, timeout=15)
            await sup.close(stop_children=True)

        run(host, body)


def test_kill_9_is_repaired_quickly_and_leases_survive(base: Path) -> None:
    st = settings(base)
    with lan() as host, guest(host, "vg1") as g1, guest(host, "vg2") as g2:
        async def body() -> None:
            sup = DnsmasqSupervisor(st, lambda e: None)
            await sup.sync([network()])
            first = dhcp(base, g1)["IP"]
            pid = sup.status("t").pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            took = await until(lambda: sup.status("t").state == "running"
                               and sup.status("t").pid not in (None, pid), timeout=3)
            assert took < 1.0
            assert dhcp(base, g2)["IP"]
            assert first in (Path(st.state_dir) / "t.leases").read_text()
            assert sup.spawns == 2
            await sup.close(stop_children=True)

        run(host, body)


def test_adoption_after_daemon_restart(base: Path) -> None:
    st = settings(base)
    with lan() as host, guest(host) as g:
        async def body() -> None:
            first = DnsmasqSupervisor(st, lambda e: None)
            await first.sync([network()])
            pid = first.status("t").pid
            await first.close()  # default: dnsmasq keeps serving
            assert pid is not None and alive(pid)
            second = DnsmasqSupervisor(st, lambda e: None)
            await second.sync([network()])
            assert (second.status("t").pid, second.status("t").state) == (pid, "running")
            assert (second.spawns, second.signals) == (0, 0)
            assert dhcp(base, g)["IP"]
            # Adopted, not our child: its death is still noticed and repaired.
            os.kill(pid, signal.SIGKILL)
            await until(lambda: second.status("t").state == "running"
                        and second.status("t").pid not in (None, pid))
            new = second.status("t").pid
            assert new is not None
            await second.close(stop_children=True)
            assert not alive(new)

        run(host, body)


def test_hosts_change_reloads_range_change_restarts(base: Path) -> None:
    net = network()
    with lan() as host, guest(host, mac=STATIC_MAC) as g:
        async def body() -> None:
            sup = DnsmasqSupervisor(settings(base), lambda e: None)
            await sup.sync([net])
            pid = sup.status("t").pid
            assert pid is not None
            hosts = (DhcpHost(STATIC_MAC, a4("10.70.0.77"), "late"),)
            await sup.sync([replace(net, dhcp=replace(net.dhcp or Dhcp(), hosts=hosts))])
            assert (sup.status("t").pid, sup.signals, sup.spawns) == (pid, 1, 1)
            await asyncio.sleep(0.2)  # SIGHUP is handled asynchronously by dnsmasq
            assert dhcp(base, g)["IP"] == "10.70.0.77"
            moved = DhcpRange(a4("10.70.0.160"), a4("10.70.0.170"))
            await sup.sync([replace(net, dhcp=replace(net.dhcp or Dhcp(), hosts=hosts,
                                                      ranges=(moved,)))])
            assert sup.spawns == 2 and sup.status("t").pid not in (None, pid)
            assert sup.status("t").state == "running"
            await sup.sync([])  # no longer wanted: stopped, run files gone
            assert sup.status("t").state == "off" and not alive(pid)
            assert not (base / "run" / "t.pid").exists()
            assert (base / "state" / "t.leases").exists()
            await sup.close()

        run(host, body)


def test_foreign_dnsmasq_is_reported_and_left_alone(base: Path) -> None:
    with lan() as host:
        foreign = subprocess.Popen(
            ["ip", "netns", "exec", host, "dnsmasq", "--conf-file=", "--keep-in-foreground",
             "--bind-interfaces", "--interface=br0", "--except-interface=lo", "--port=0",
             "--user=nobody", "--dhcp-range=10.70.0.200,10.70.0.210,1h",
             f"--pid-file={base}/foreign.pid", f"--dhcp-leasefile={base}/foreign.leases"],
            stderr=subprocess.DEVNULL)
        try:
            async def body() -> None:
                await until(lambda: (base / "foreign.pid").exists())
                sup = DnsmasqSupervisor(settings(base), lambda e: None)
                await sup.sync([network()])
                status = sup.status("t")
                assert status.state == "failed"
                assert f"pid {foreign.pid}" in status.reason
                assert "bind-interfaces" in status.reason
                assert sup.spawns == 0 and sup.signals == 0
                await sup.close()

            run(host, body)
            assert foreign.poll() is None
        finally:
            foreign.terminate()
            foreign.wait(5)


def test_repeated_crashes_degrade(base: Path) -> None:
    fake = base / "dnsmasq"
    fake.write_text("#!/bin/sh\necho 'fake dnsmasq: cannot work' >&2\nexit 1\n")
    fake.chmod(0o755)
    net = network()
    with lan() as host:
        async def body() -> None:
            sup = DnsmasqSupervisor(settings(base, dnsmasq_path=str(fake)), lambda e: None)
            await sup.sync([net])
            await until(lambda: sup.status("t").state == "degraded", timeout=8)
            reason = sup.status("t").reason
            assert "exit code 1" in reason and "fake dnsmasq: cannot work" in reason
            spawned = sup.spawns
            assert spawned == 6
            await asyncio.sleep(0.5)
            await sup.sync([net])  # unchanged config: stays degraded
            assert sup.spawns == spawned and sup.status("t").state == "degraded"
            await sup.reset("t")
            assert sup.spawns == spawned + 1
            await sup.close(stop_children=True)

        run(host, body)


def test_missing_binary_is_a_clear_failure(base: Path) -> None:
    with lan() as host:
        async def body() -> None:
            st = settings(base, dnsmasq_path=str(base / "nowhere" / "dnsmasq"))
            sup = DnsmasqSupervisor(st, lambda e: None)
            await sup.sync([network()])
            status = sup.status("t")
            assert status.state == "failed"
            assert "apt-get install dnsmasq-base" in status.reason
            await sup.close()

        run(host, body)


def test_hostile_hostname_never_reaches_dnsmasq(base: Path) -> None:
    bad = network(hosts=(DhcpHost(STATIC_MAC, a4("10.70.0.42"), "a\ndhcp-script=/bin/sh"),))
    with pytest.raises(InvalidArgument):
        render_hosts(bad)
    with pytest.raises(InvalidArgument):
        render_config(replace(bad, dns=Dns(domain="a\ndhcp-script=/bin/sh")),
                      dnsmasq_paths(settings(base), "t"))

    async def body() -> None:
        sup = DnsmasqSupervisor(settings(base), lambda e: None)
        await sup.sync([bad])
        assert sup.status("t").state == "failed" and sup.spawns == 0
        await sup.close()

    asyncio.run(body())
    assert not (base / "run" / "t.hosts").exists()
