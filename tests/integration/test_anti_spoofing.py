"""anti_spoofing with the real daemon, dnsmasq and kernel: guests in namespaces on a real
bridge. A guest that changes its address or MAC is cut off and counted; a rogue DHCP
server or router advertisement in one guest never reaches another; the table is healed
and removed with its network; with the option off nothing is filtered."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kvmnetd.adapters.port_guard import PortGuardAdapter
from kvmnetd.model.desired import Mode, Network
from kvmnetd.model.guard import GuardElement, PortIdentity
from kvmnetd.plan.nft_bridge import eui64, fingerprint, port_elements, render_table
from tests.support.netns import entered, netns, ping, sh
from tests.support.rig import FAR_HOST, PY, Sandbox, wait_until
from tests.support.toml import attach_toml, network_toml

pytestmark = pytest.mark.integration

GATEWAY = "10.70.0.1"
RANGE = ("10.70.0.100", "10.70.0.150")
MAC_A, MAC_B = "52:54:00:70:00:0a", "52:54:00:70:00:0b"
ROGUE_PREFIX = "2001:db8:bad:"

# A router advertisement for 2001:db8:bad::/64 (autonomous) with a default route, sent to
# all nodes from the guest's link-local address. The kernel fills in the ICMPv6 checksum.
ROGUE_RA = """
import socket, struct, sys, time
ifindex = socket.if_nametoindex("eth0")
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)
prefix = struct.pack("!BBBBIII16s", 3, 4, 64, 0xC0, 86400, 14400, 0,
                     socket.inet_pton(socket.AF_INET6, "2001:db8:bad::"))
for _ in range(int(sys.argv[1])):
    s.sendto(ra + prefix, ("ff02::1", 0, 0, ifindex))
    time.sleep(0.1)
"""


def config(on: bool = True, **extra: str) -> str:
    return (network_toml("grd", "nat", "kvgrd0", f"{GATEWAY}/24", dns=False,
                         dhcp_range=f"{RANGE[0]}-{RANGE[1]}", anti_spoofing=on, **extra)
            + attach_toml("grd", ifname="sg*"))


def guarded_box(box: Sandbox, on: bool = True, **extra: str) -> tuple[str, str]:
    box.write_config(config(on, **extra))
    a = box.guest("sga", mac=MAC_A)
    b = box.guest("sgb", mac=MAC_B)
    box.start_daemon("--no-bus")
    assert wait_until(lambda: box.master_of("sga") == "kvgrd0"
                      and box.master_of("sgb") == "kvgrd0")
    return a, b


def set_elements(box: Sandbox, name: str) -> list[Any]:
    r = sh("nft", "-j", "list", "set", "bridge", "kvmnetd", name, ns=box.host, check=False)
    if r.returncode != 0:
        return []
    for item in json.loads(r.stdout)["nftables"]:
        if "set" in item:
            return list(item["set"].get("elem", []))
    return []


def bound_mac(box: Sandbox, port: str) -> str | None:
    for elem in set_elements(box, "macs"):
        key = elem["concat"] if isinstance(elem, dict) else None
        if key and key[0] == port:
            return str(key[1])
    return None


def lease(box: Sandbox, ns: str, port: str, mac: str) -> str:
    """A DHCP lease for the guest, then its MAC bound to its port; its address."""
    got = box.dhcp(ns)
    assert got.get("ip", "").startswith("10.70.0."), got
    assert wait_until(lambda: bound_mac(box, port) == mac), set_elements(box, "macs")
    assert wait_until(lambda: any(
        isinstance(e, dict) and e.get("concat") == [port, got["ip"]]
        for e in set_elements(box, "addr4")))
    return got["ip"]


def spoof_drops(box: Sandbox, port: str) -> int:
    rows = {r["ifname"]: r for r in box.jctl("port", "stats", port)}
    return int(rows[port]["spoof_drops"])


def readdress(ns: str, address: str) -> None:
    sh("ip", "addr", "flush", "dev", "eth0", "scope", "global", ns=ns)
    sh("ip", "addr", "add", f"{address}/24", "dev", "eth0", ns=ns)
    sh("ip", "route", "replace", "default", "via", GATEWAY, ns=ns)


def has_table(box: Sandbox) -> bool:
    return sh("nft", "list", "table", "bridge", "kvmnetd", ns=box.host,
              check=False).returncode == 0


def test_a_guest_that_changes_its_ip_or_mac_is_cut_off_and_counted(box: Sandbox) -> None:
    a, b = guarded_box(box)
    ip_a = lease(box, a, "sga", MAC_A)
    lease(box, b, "sgb", MAC_B)
    assert ping(a, GATEWAY) and ping(b, GATEWAY)
    assert box.source_seen_by_upstream(a) is not None
    before = spoof_drops(box, "sga")
    # Another address in the subnet: nothing gets through, and the drops are counted.
    readdress(a, "10.70.0.77")
    assert not ping(a, GATEWAY, count=2)
    assert box.source_seen_by_upstream(a) is None
    after_ip = spoof_drops(box, "sga")
    assert after_ip > before
    # Its own address again: through again.
    readdress(a, ip_a)
    assert wait_until(lambda: ping(a, GATEWAY), timeout=10)
    # Another MAC, even with its own address and a fresh DHCP exchange: cut off.
    sh("ip", "link", "set", "eth0", "address", "52:54:00:70:00:99", ns=a)
    assert not ping(a, GATEWAY, count=2)
    box.dhcp(a, "-t", "2")
    assert bound_mac(box, "sga") == MAC_A
    assert not ping(a, GATEWAY, count=2)
    assert spoof_drops(box, "sga") > after_ip
    # The other guest never noticed.
    assert ping(b, GATEWAY)
    assert spoof_drops(box, "sgb") == 0
    rows = box.jctl("port", "stats")
    assert {r["ifname"] for r in rows} == {"sga", "sgb"}
    shown = box.jctl("network", "show", "grd")
    assert shown["anti_spoofing"] is True and shown["isolate_ports"] is False


def test_a_rogue_dhcp_server_in_a_guest_never_leases_to_another(box: Sandbox) -> None:
    a, b = guarded_box(box)
    ip_a = lease(box, a, "sga", MAC_A)
    rogue = subprocess.Popen(
        ["ip", "netns", "exec", a, "dnsmasq", "--conf-file=/dev/null", "--keep-in-foreground",
         "--bind-interfaces", "--interface=eth0", "--except-interface=lo", "--port=0",
         "--user=root", "--dhcp-authoritative", "--no-ping",
         "--dhcp-range=10.70.0.200,10.70.0.210,1h",
         f"--dhcp-option=3,{ip_a}", f"--dhcp-leasefile={box.tmp / 'rogue.leases'}",
         f"--pid-file={box.tmp / 'rogue.pid'}", "--log-dhcp",
         f"--log-facility={box.tmp / 'rogue.log'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: "dnsmasq" in sh("ss", "-ulpn", ns=a).stdout, timeout=5)
        for _ in range(3):
            got = box.dhcp(b)
            assert RANGE[0] <= got.get("ip", "") <= RANGE[1] and len(got["ip"]) == len(RANGE[0])
            assert got.get("router") == GATEWAY, got
        assert "DHCPOFFER" in (box.tmp / "rogue.log").read_text()  # it did answer
        assert spoof_drops(box, "sga") > 0  # its offers, dropped
        assert (box.tmp / "rogue.leases").read_text().strip() == ""
    finally:
        rogue.send_signal(signal.SIGTERM)
        rogue.wait(5)


def link_local(ns: str) -> str:
    return sh("ip", "-6", "addr", "show", "dev", "eth0", "scope", "link", ns=ns).stdout


def give_link_local(ns: str, mac: str) -> None:
    """The EUI-64 link-local address back: the DHCP client's script flushed it."""
    ll = eui64(mac, ipaddress.IPv6Network("fe80::/64"))
    sh("ip", "-6", "addr", "replace", f"{ll}/64", "dev", "eth0", "nodad", ns=ns)


def wait_link_local(ns: str) -> None:
    assert wait_until(lambda: "tentative" not in (out := link_local(ns)) and "fe80::" in out,
                      timeout=10), link_local(ns)


def rogue_ra_reaches(box: Sandbox, sender: str, receiver: str) -> bool:
    wait_link_local(sender)
    wait_link_local(receiver)
    sh(PY, "-c", ROGUE_RA, "10", ns=sender)
    return bool(wait_until(lambda: ROGUE_PREFIX in sh(
        "ip", "-6", "addr", "show", "dev", "eth0", ns=receiver).stdout, timeout=2))


def test_a_rogue_router_advertisement_is_dropped(box: Sandbox) -> None:
    a, b = guarded_box(box)
    lease(box, a, "sga", MAC_A)
    lease(box, b, "sgb", MAC_B)
    give_link_local(a, MAC_A)
    give_link_local(b, MAC_B)
    before = spoof_drops(box, "sga")
    assert not rogue_ra_reaches(box, a, b)
    assert "default" not in sh("ip", "-6", "route", "show", "dev", "eth0", ns=b).stdout
    assert spoof_drops(box, "sga") >= before + 10
    # IPv6 from its own link-local address still passes (neighbour discovery to b).
    ll_b = sh("ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link",
              ns=b).stdout.split()[3].split("/")[0]
    assert ping6(a, f"{ll_b}%eth0")
    # From any other link-local address it does not.
    sh("ip", "-6", "addr", "flush", "dev", "eth0", "scope", "link", ns=a)
    sh("ip", "-6", "addr", "add", "fe80::bad/64", "dev", "eth0", "nodad", ns=a)
    assert not ping6(a, f"{ll_b}%eth0")


def ping6(ns: str, target: str, source: str | None = None) -> bool:
    """One echo; from `source` when given (the guest may hold other global addresses)."""
    via = ["-I", source] if source else []
    return sh("busybox", "ping", "-6", "-c", "1", "-W", "2", *via, target, ns=ns,
              check=False).returncode == 0


def test_healed_after_delete_or_flush_and_removed_with_its_network(box: Sandbox) -> None:
    a, _ = guarded_box(box)
    ip_a = lease(box, a, "sga", MAC_A)
    sh("nft", "delete", "table", "bridge", "kvmnetd", ns=box.host)
    assert wait_until(lambda: bound_mac(box, "sga") == MAC_A, timeout=10)
    readdress(a, "10.70.0.78")
    assert not ping(a, GATEWAY, count=2)
    readdress(a, ip_a)
    assert wait_until(lambda: ping(a, GATEWAY), timeout=10)
    sh("nft", "flush", "chain", "bridge", "kvmnetd", "guard", ns=box.host)
    assert wait_until(lambda: "goto spoofed" in sh(
        "nft", "list", "chain", "bridge", "kvmnetd", "guard", ns=box.host).stdout, timeout=10)
    readdress(a, "10.70.0.79")
    assert not ping(a, GATEWAY, count=2)
    # The network goes: so does the table.
    box.write_config(network_toml("other", "nat", "kvoth0", "10.71.0.1/24", dns=False))
    assert box.daemon is not None
    box.daemon.send_signal(signal.SIGHUP)
    assert wait_until(lambda: not has_table(box), timeout=10)
    assert "table inet kvmnetd" in box.nft()


def test_with_the_option_off_nothing_is_filtered_and_turning_it_on_keeps_guests(
        box: Sandbox) -> None:
    a, b = guarded_box(box, on=False)
    ip_a, ip_b = box.dhcp(a).get("ip", ""), box.dhcp(b).get("ip", "")
    assert ip_a and ip_b
    give_link_local(a, MAC_A)
    give_link_local(b, MAC_B)
    assert not has_table(box)
    readdress(a, "10.70.0.77")
    assert ping(a, GATEWAY) and ping(a, FAR_HOST)
    # The same rogue advertisement that the option drops does reach the other guest.
    assert rogue_ra_reaches(box, a, b)
    assert spoof_drops(box, "sga") == 0
    assert box.jctl("network", "show", "grd")["anti_spoofing"] is False
    # Turned on with guests running: their MACs come from their leases, and the bridge
    # saw them on their ports, so they stay on the network; a spoofed address does not.
    readdress(a, ip_a)
    assert ping(a, GATEWAY)
    box.write_config(config(on=True))
    assert box.daemon is not None
    box.daemon.send_signal(signal.SIGHUP)
    assert wait_until(lambda: bound_mac(box, "sga") == MAC_A and bound_mac(box, "sgb") == MAC_B,
                      timeout=10)
    assert ping(a, GATEWAY) and ping(b, GATEWAY)
    readdress(b, "10.70.0.78")
    assert not ping(b, GATEWAY, count=2)


def test_a_restart_keeps_learned_macs_and_counters_and_writes_nothing(box: Sandbox) -> None:
    a, _ = guarded_box(box)
    ip_a = lease(box, a, "sga", MAC_A)
    readdress(a, "10.70.0.80")
    assert not ping(a, GATEWAY, count=2)
    drops = spoof_drops(box, "sga")
    readdress(a, ip_a)
    assert wait_until(lambda: ping(a, GATEWAY), timeout=10)
    assert box.stop_daemon() == 0
    mark = len(box.log.read_text())
    box.start_daemon("--no-bus")
    assert ping(a, GATEWAY)  # its MAC was learned by DHCP, before the restart
    assert spoof_drops(box, "sga") >= drops
    assert "PortGuard" not in box.log.read_text()[mark:]


def test_ipv6_only_from_link_local_and_the_slaac_address_of_its_mac(box: Sandbox) -> None:
    a, b = guarded_box(box, ipv6="fd00:70::1/64")
    lease(box, a, "sga", MAC_A)
    lease(box, b, "sgb", MAC_B)
    give_link_local(a, MAC_A)
    give_link_local(b, MAC_B)
    # What SLAAC makes of the network's prefix and its MAC (set by hand: the DHCP client's
    # script may have flushed what the router advertisement had made).
    slaac = eui64(MAC_A, ipaddress.IPv6Network("fd00:70::/64"))
    sh("ip", "-6", "addr", "replace", f"{slaac}/64", "dev", "eth0", "nodad", ns=a)
    assert wait_until(lambda: ping6(a, "fd00:70::1", str(slaac)), timeout=10)
    sh("ip", "-6", "addr", "del", f"{slaac}/64", "dev", "eth0", ns=a)
    sh("ip", "-6", "addr", "add", "fd00:70::bad/64", "dev", "eth0", "nodad", ns=a)
    assert not ping6(a, "fd00:70::1", "fd00:70::bad")
    # A neighbour advertisement for an address that is not its own is dropped too: b's
    # SLAAC address, claimed by a with an overriding advertisement, stays b's in the
    # gateway's neighbour table.
    victim = eui64(MAC_B, ipaddress.IPv6Network("fd00:70::/64"))
    sh("ip", "-6", "addr", "replace", f"{victim}/64", "dev", "eth0", "nodad", ns=b)
    # From the victim address itself: the gateway's answer makes its neighbour entry.
    assert wait_until(lambda: ping6(b, "fd00:70::1", str(victim)), timeout=10)
    assert wait_until(lambda: MAC_B in sh("ip", "-6", "neigh", "show", str(victim),
                                          ns=box.host).stdout.lower(), timeout=5)
    sh(PY, "-c", UNSOLICITED_NA, str(victim), ns=a)
    neigh = sh("ip", "-6", "neigh", "show", str(victim), ns=box.host).stdout.lower()
    assert MAC_B in neigh and MAC_A not in neigh


# An unsolicited, overriding neighbour advertisement for argv[1], with our MAC as its
# target link-layer address, to all nodes.
UNSOLICITED_NA = """
import socket, struct, sys
ifindex = socket.if_nametoindex("eth0")
mac = open("/sys/class/net/eth0/address").read().strip()
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
na = struct.pack("!BBHI16s", 136, 0, 0, 0x20000000, socket.inet_pton(socket.AF_INET6, sys.argv[1]))
na += struct.pack("!BB6s", 2, 1, bytes.fromhex(mac.replace(":", "")))
for _ in range(3):
    s.sendto(na, ("ff02::1", 0, 0, ifindex))
"""


def test_the_adapter_tells_our_table_from_a_changed_one_and_survives_a_restart(
        tmp_path: Path) -> None:
    net = Network("lab", Mode.NAT, "kvbr0", ipv4=ipaddress.IPv4Interface("10.0.0.1/24"),
                  anti_spoofing=True)
    elements = frozenset(port_elements("vnet0", net, PortIdentity(MAC_A, frozenset({
        "10.0.0.5"}))) | port_elements("vnet1", net, None))
    state = str(tmp_path / "port-guard.json")
    Seen = tuple[str | None, frozenset[GuardElement]]

    def step(ns: str, action: str) -> Seen:
        """A new adapter each time, over the same record: as after a restart."""
        async def run() -> Seen:
            g = PortGuardAdapter(state_path=state)
            if action == "write":
                await g.apply(render_table(elements), fingerprint(), elements)
            elif action == "lease":
                await g.update(frozenset({("addr4", '"vnet0" . 10.0.0.6')}),
                               frozenset({("addr4", '"vnet0" . 10.0.0.5')}))
            return await g.observe()
        with entered(ns):
            return asyncio.run(run())

    with netns("ga") as ns:
        assert step(ns, "observe") == (None, frozenset())
        assert step(ns, "write") == (fingerprint(), elements)
        assert step(ns, "observe") == (fingerprint(), elements)
        fp, now = step(ns, "lease")
        assert fp == fingerprint() and ("addr4", '"vnet0" . 10.0.0.6') in now
        assert ("addr4", '"vnet0" . 10.0.0.5') not in now
        # An element removed by hand (nft monitor does not report those; the safety
        # sweep observes): tampered, so it is written whole again.
        sh("nft", "delete", "element", "bridge", "kvmnetd", "bound", '{ "vnet0" }', ns=ns)
        assert step(ns, "observe")[0] == "tampered"
        assert step(ns, "write")[0] == fingerprint()
        sh("nft", "add", "rule", "bridge", "kvmnetd", "guard", "accept", ns=ns)
        assert step(ns, "observe")[0] == "tampered"
