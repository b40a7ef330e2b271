"""Doctor checks against real faults, each built inside throwaway namespaces.

The probe runs in-process with the test's thread moved into the "host" namespace, so nft,
bridge, /proc/sys and sock_diag all see that namespace; a NetlinkAdapter opened there gives
the observed state.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmnetd.adapters.dnsmasq.supervisor import DnsmasqSupervisor
from kvmnetd.adapters.rtnl.adapter import NetlinkAdapter
from kvmnetd.app.doctor import Finding, doctor
from kvmnetd.model.desired import Dhcp, DhcpRange, Mode, Network, Settings
from kvmnetd.model.records import DhcpStatus, Lease, NetworkStatus
from kvmnetd.plan.nft import render_ruleset
from tests.support.dbus import start_bus, stop_bus
from tests.support.netns import entered, netns, ping, sh, veth_into

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or not all(shutil.which(t) for t in (
        "nft", "iptables", "bridge", "dnsmasq", "busybox")),
        reason="needs root, nft, iptables, bridge, dnsmasq and busybox"),
]

BR, GW = "kvbr0", "10.77.0.1"
DHCP = Dhcp(ranges=(DhcpRange(ipaddress.ip_address("10.77.0.100"),
                              ipaddress.ip_address("10.77.0.150")),))


def net(mode: Mode = Mode.NAT, dhcp: Dhcp | None = DHCP) -> Network:
    return Network("n1", mode, BR, ipaddress.IPv4Interface(f"{GW}/24"), dhcp=dhcp)


def active(n: Network, dhcp: DhcpStatus | None = None, state: str = "active") -> NetworkStatus:
    return NetworkStatus(n.name, str(n.mode), n.bridge, state=state,
                         dhcp=dhcp or DhcpStatus("running"))


@contextlib.contextmanager
def host(n: Network, forwarding: bool = True) -> Iterator[str]:
    """A host namespace with the network's bridge, an uplink with a default route, our table."""
    with netns("dh") as ns:
        sh("ip", "link", "add", BR, "type", "bridge", ns=ns)
        sh("ip", "addr", "add", f"{GW}/24", "dev", BR, ns=ns)
        sh("ip", "link", "set", BR, "up", ns=ns)
        sh("ip", "link", "add", "wan0", "type", "veth", "peer", "name", "wan1", ns=ns)
        sh("ip", "addr", "add", "198.51.100.1/24", "dev", "wan0", ns=ns)
        sh("ip", "link", "set", "wan0", "up", ns=ns)
        sh("ip", "route", "add", "default", "via", "198.51.100.2", ns=ns)
        sh("nft", "-f", "-", input=render_ruleset([n]), ns=ns)
        sh("sysctl", "-qw", f"net.ipv4.ip_forward={int(forwarding)}", ns=ns)
        yield ns


@contextlib.contextmanager
def guest(ns: str, port: str, address: str | None = None) -> Iterator[str]:
    with netns("dg") as g:
        veth_into(ns, g, port, address=address)
        sh("ip", "link", "set", port, "master", BR, "up", ns=ns)
        yield g


def diagnose(ns: str, n: Network, statuses: list[NetworkStatus] | None = None,
             leases: dict[str, list[Lease]] | None = None, **kw: Any) -> list[Finding]:
    async def body() -> list[Finding]:
        nl = NetlinkAdapter()
        await nl.open(lambda: None)
        try:
            kw.setdefault("firewalld", False)
            return await doctor([n], nl.observed, {}, leases or {n.name: []},
                                statuses if statuses is not None else [active(n)], **kw)
        finally:
            await nl.close()

    with entered(ns):
        return asyncio.run(body())


def checks(found: list[Finding]) -> list[str]:
    return [f.check for f in found]


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def base() -> Iterator[Path]:
    # Reachable by dnsmasq's user: not below pytest's 0700 tmp_path.
    d = Path(tempfile.mkdtemp(prefix="kvmnetd-doctor-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_a_right_host_is_clean_apart_from_no_guests() -> None:
    n = net()
    with host(n) as ns:
        assert checks(diagnose(ns, n)) == ["bridge-no-ports"]


def test_ip_forwarding_off() -> None:
    n = net()
    with host(n, forwarding=False) as ns:
        f = next(f for f in diagnose(ns, n) if f.check == "ip-forwarding-off")
        assert f.subject == "net.ipv4.ip_forward" and f.severity == "error"
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=ns)
        assert "ip-forwarding-off" not in checks(diagnose(ns, n))
        sh("sysctl", "-qw", f"net.ipv4.conf.{BR}.forwarding=0", ns=ns)
        f = next(f for f in diagnose(ns, n) if f.check == "ip-forwarding-off")
        assert f.subject == f"net.ipv4.conf.{BR}.forwarding"


def test_foreign_forward_drop_and_coexistence_rule() -> None:
    n = net()
    with host(n) as ns:
        sh("iptables", "-P", "FORWARD", "DROP", ns=ns)
        f = next(f for f in diagnose(ns, n) if f.check == "foreign-forward-drop")
        assert f.subject == "table ip filter chain FORWARD" and "policy drop" in f.message
        # Docker's layout: FORWARD jumps to DOCKER-USER, where kvmnetd adds its accepts.
        sh("iptables", "-N", "DOCKER-USER", ns=ns)
        sh("iptables", "-I", "FORWARD", "-j", "DOCKER-USER", ns=ns)
        assert "iptables -I DOCKER-USER" in next(
            f for f in diagnose(ns, n) if f.check == "foreign-forward-drop").fix
        sh("nft", "add", "rule", "ip", "filter", "DOCKER-USER", "iifname", BR, "accept",
           "comment", '"kvmnetd: n1"', ns=ns)
        assert "foreign-forward-drop" not in checks(diagnose(ns, n))


def test_foreign_dhcp_server(base: Path) -> None:
    n = net()
    with host(n) as ns:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "dnsmasq", "--conf-file=/dev/null",
             "--keep-in-foreground", "--bind-interfaces", f"--interface={BR}",
             "--except-interface=lo", "--port=0", "--dhcp-range=10.77.0.50,10.77.0.60",
             f"--dhcp-leasefile={base}/foreign.leases", "--pid-file="],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: ":0043 " in sh("cat", "/proc/net/udp", ns=ns).stdout)
            found = [f for f in diagnose(ns, n) if f.check == "foreign-dhcp-server"]
            assert [f.subject for f in found] == [f"pid {proc.pid}"]
            assert "dnsmasq" in found[0].message and f"kill {proc.pid}" in found[0].fix
            # The same process counted as ours is no finding.
            assert "foreign-dhcp-server" not in checks(diagnose(ns, n, our_pids=[proc.pid]))
        finally:
            proc.kill()
            proc.wait(5)


def test_br_netfilter_drops_traffic_between_isolated_guests() -> None:
    n = net(Mode.ISOLATED, dhcp=None)
    with host(n) as ns, guest(ns, "vp1", "10.77.0.11/24") as g1, \
            guest(ns, "vp2", "10.77.0.12/24"):
        sh("iptables", "-P", "FORWARD", "DROP", ns=ns)
        assert sh("sysctl", "-n", "net.bridge.bridge-nf-call-iptables", ns=ns).stdout.strip() == "1"
        f = next(f for f in diagnose(ns, n) if f.check == "br-netfilter")
        assert f.severity == "warning" and "-i kvbr0 -o kvbr0 -j ACCEPT" in f.fix
        assert not ping(g1, "10.77.0.12")  # what the finding says is real
        sh("sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0", ns=ns)
        assert "br-netfilter" not in checks(diagnose(ns, n))
        assert ping(g1, "10.77.0.12")


def test_subnet_overlaps_host_route() -> None:
    n = net()
    with host(n) as ns:
        sh("ip", "route", "add", "10.77.0.0/16", "via", "198.51.100.9", ns=ns)
        f = next(f for f in diagnose(ns, n) if f.check == "subnet-overlaps-host-route")
        assert f.subject == "10.77.0.0/16 via 198.51.100.9 dev wan0"


def test_bridge_without_ports_carrier_and_down() -> None:
    n = net(dhcp=None)
    with host(n) as ns:
        assert checks(diagnose(ns, n)) == ["bridge-no-ports"]
        sh("ip", "link", "add", "vp1", "type", "veth", "peer", "name", "vq1", ns=ns)
        sh("ip", "link", "set", "vp1", "master", BR, ns=ns)
        assert checks(diagnose(ns, n)) == ["bridge-no-carrier"]
        sh("ip", "link", "set", "vp1", "up", ns=ns)
        sh("ip", "link", "set", BR, "down", ns=ns)
        assert checks(diagnose(ns, n)) == ["bridge-down"]


def test_guest_without_lease_next_to_one_with_a_lease(base: Path) -> None:
    n = net()
    st = Settings(run_dir=str(base / "run"), state_dir=str(base / "state"))
    with host(n) as ns, guest(ns, "vp1") as g1, guest(ns, "vp2", "10.77.0.12/24") as g2:
        leased, static = g1, g2
        async def body() -> tuple[list[Finding], list[Finding]]:
            sup = DnsmasqSupervisor(st, lambda e: None)
            nl = NetlinkAdapter()
            await nl.open(lambda: None)
            try:
                await sup.sync([n])
                r = await asyncio.to_thread(sh, "busybox", "udhcpc", "-i", "eth0", "-q", "-n",
                                            "-f", "-t", "5", "-T", "1", "-s", "/bin/true",
                                            ns=leased, check=False)
                assert r.returncode == 0, r.stderr
                assert ping(static, GW)  # a guest with a static address: traffic, no DHCP
                status = [active(n, sup.status(n.name))]
                leases = {n.name: sup.leases(n.name)}
                assert leases[n.name], "udhcpc got no lease"
                with_dnsmasq = await doctor([n], nl.observed, {}, leases, status,
                                            firewalld=False, settings=st)
                without = await doctor([n], nl.observed, {}, {n.name: []}, status,
                                       firewalld=False, settings=st)
                return with_dnsmasq, without
            finally:
                await sup.close(stop_children=True)
                await nl.close()

        with entered(ns):
            found, without = asyncio.run(body())
        assert [(f.check, f.subject) for f in found] == [("guest-without-lease", "vp2")]
        mac = sh("cat", "/sys/class/net/eth0/address", ns=static).stdout.strip()
        assert mac in found[0].message
        assert sorted(f.subject for f in without if f.check == "guest-without-lease") == [
            "vp1", "vp2"]


def test_dhcp_degraded_from_the_supervisor(base: Path) -> None:
    n = net()
    st = Settings(run_dir=str(base / "run"), state_dir=str(base / "state"),
                  dnsmasq_path=str(base / "no-dnsmasq"))
    with host(n) as ns:
        async def status() -> DhcpStatus:
            sup = DnsmasqSupervisor(st, lambda e: None)
            await sup.sync([n])
            try:
                return sup.status(n.name)
            finally:
                await sup.close()

        with entered(ns):
            dhcp = asyncio.run(status())
        assert dhcp.state == "failed"
        found = diagnose(ns, n, [active(n, dhcp, state="degraded")])
        f = next(f for f in found if f.check == "dhcp-degraded")
        assert f.fix.startswith("apt-get install dnsmasq-base")


# A stand-in for firewalld may take its name, and be called.
FIREWALLD_POLICY = ('<policy user="root"><allow own="org.fedoraproject.FirewallD1"/></policy>'
                    '<policy context="default">'
                    '<allow send_destination="org.fedoraproject.FirewallD1"/></policy>')


@pytest.fixture
def private_bus(base: Path) -> Iterator[str]:
    if shutil.which("dbus-daemon") is None:
        pytest.skip("needs dbus-daemon")
    bus = start_bus(str(base), FIREWALLD_POLICY)
    try:
        yield bus.address
    finally:
        stop_bus(bus)


def test_firewalld_zone_asked_over_the_bus(private_bus: str) -> None:
    """firewalld itself would take over the namespace's whole ruleset; a stand-in answers the
    one call the probe makes, so the D-Bus client side is real."""
    from dbus_fast import BusType
    from dbus_fast.aio import MessageBus
    from dbus_fast.service import ServiceInterface, method

    zones: dict[str, str] = {}

    class Zone(ServiceInterface):
        @method()
        def getZoneOfInterface(self, interface: "s") -> "s":  # type: ignore[name-defined] # noqa: F821, UP037
            return zones.get(interface, "")

    n = net()
    with host(n) as ns:
        async def body() -> list[list[str]]:
            nl = NetlinkAdapter()
            await nl.open(lambda: None)
            fake = await MessageBus(bus_address=private_bus, bus_type=BusType.SYSTEM).connect()
            out = []
            try:
                async def run() -> list[str]:
                    found = await doctor([n], nl.observed, {}, {n.name: []}, [active(n)],
                                         bus_address=private_bus)
                    return [f.check for f in found if f.check.startswith("firewalld")]

                out.append(await run())  # no firewalld on the bus: nothing to say
                fake.export("/org/fedoraproject/FirewallD1",
                            Zone("org.fedoraproject.FirewallD1.zone"))
                await fake.request_name("org.fedoraproject.FirewallD1")
                out.append(await run())
                zones[BR] = "block"
                out.append(await run())
                zones[BR] = "kvmnetd"
                out.append(await run())
            finally:
                fake.disconnect()
                await nl.close()
            return out

        with entered(ns):
            results = asyncio.run(body())
    assert results == [[], ["firewalld-zone-missing"], ["firewalld-zone-blocks"], []]
