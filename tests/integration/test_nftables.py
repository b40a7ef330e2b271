"""The nftables adapter and the rendered ruleset against the real kernel, in throwaway namespaces.

The adapter runs nft as a child process; the test moves its own thread into the
namespace with `entered()` first, and the child inherits it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import pytest

from kvmnetd.adapters.nftables import TAMPERED, NftablesAdapter, NftablesError
from kvmnetd.adapters.sysctl import set_forwarding
from kvmnetd.model.desired import Dhcp, Mode, Network
from kvmnetd.plan.nft import fingerprint, render_ruleset
from tests.support.netns import entered, netns, ping, sh, veth_into
from tests.support.networks import CASES

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None,
                       reason="needs root and nft"),
]

T = TypeVar("T")
v4 = ipaddress.IPv4Interface
BR = "kvbr0"


def run_in(ns: str, step: Callable[[], Awaitable[T]]) -> T:
    with entered(ns):
        return asyncio.run(step())  # type: ignore[arg-type]


def net(mode: Mode, **kw: object) -> Network:
    return Network("t1", mode, BR, v4("10.77.1.1/24"), dhcp=Dhcp(), **kw)  # type: ignore[arg-type]


NETS_A = [net(Mode.NAT), Network("t2", Mode.ISOLATED, "kvbr1", v4("10.77.2.1/24"))]
NETS_B = [net(Mode.ROUTED, uplink="up0")]


# --- the renderer's text, as nft reads it ------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_nft_accepts_rendered_text(case: str) -> None:
    with netns("ck") as ns:
        try:
            sh("nft", "-c", "-f", "-", ns=ns, input=render_ruleset(CASES[case]))
        except subprocess.CalledProcessError as e:
            pytest.fail(f"nft -c rejected {case}: {e.stderr}")


# --- adapter: observe / apply / remove -------------------------------------------------------


def test_apply_then_observe_reports_the_fingerprint() -> None:
    nft = NftablesAdapter()
    with netns("nf") as ns:
        assert run_in(ns, nft.observe) is None
        run_in(ns, lambda: nft.apply(render_ruleset(NETS_A)))
        assert run_in(ns, nft.observe) == fingerprint(NETS_A)
        assert run_in(ns, nft.observe) == fingerprint(NETS_A)
        assert nft.writes == 1  # reads are not writes
        # A daemon started later has no baseline and trusts the table's comment.
        assert run_in(ns, NftablesAdapter().observe) == fingerprint(NETS_A)
        run_in(ns, lambda: nft.apply(render_ruleset(NETS_B)))
        assert run_in(ns, nft.observe) == fingerprint(NETS_B)
        run_in(ns, nft.remove)
        assert run_in(ns, nft.observe) is None
        assert nft.writes == 3
        run_in(ns, nft.remove)  # absent: nothing to write
        assert nft.writes == 3
        # Someone restores an old copy after we removed it: not ours any more.
        sh("nft", "-f", "-", ns=ns, input=render_ruleset(NETS_B))
        assert run_in(ns, nft.observe) == TAMPERED


def test_a_rejected_ruleset_leaves_the_old_table_in_place() -> None:
    nft = NftablesAdapter()
    with netns("nf") as ns:
        run_in(ns, lambda: nft.apply(render_ruleset(NETS_A)))
        broken = render_ruleset(NETS_B).replace("masquerade", "masquerad")
        broken = broken.replace("accept comment", "acept comment", 1)
        with pytest.raises(NftablesError, match="acept"):
            run_in(ns, lambda: nft.apply(broken))
        assert nft.writes == 1
        assert run_in(ns, nft.observe) == fingerprint(NETS_A)


def foreign_state(ns: str) -> tuple[str, str]:
    saved = sh("iptables-save", ns=ns).stdout
    # iptables-save stamps the time in comment lines.
    rules = "\n".join(line for line in saved.splitlines() if not line.startswith("#"))
    return sh("nft", "list", "table", "inet", "foreign", ns=ns).stdout, rules


def test_foreign_tables_and_iptables_rules_are_untouched() -> None:
    nft = NftablesAdapter()
    with netns("nf") as ns:
        sh("nft", "-f", "-", ns=ns, input="""
table inet foreign {
    chain filter_forward {
        type filter hook forward priority filter - 5; policy accept;
        iifname "kvbr0" counter accept comment "someone else"
        ip saddr 192.0.2.0/24 drop
    }
    chain nat_prerouting {
        type nat hook prerouting priority dstnat; policy accept;
        tcp dport 8080 redirect to :80
    }
}
""")
        sh("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "203.0.113.0/24",
           "-j", "MASQUERADE", ns=ns)
        sh("iptables", "-A", "FORWARD", "-j", "ACCEPT", ns=ns)
        before = foreign_state(ns)
        assert "203.0.113.0/24" in before[1] and "someone else" in before[0]

        run_in(ns, lambda: nft.apply(render_ruleset(NETS_A)))
        assert foreign_state(ns) == before
        run_in(ns, lambda: nft.apply(render_ruleset(NETS_B)))
        assert foreign_state(ns) == before
        run_in(ns, nft.remove)
        assert foreign_state(ns) == before
        assert "kvmnetd" not in sh("nft", "list", "tables", ns=ns).stdout


def rule_handle(ns: str, needle: str) -> str:
    listing = sh("nft", "-a", "list", "table", "inet", "kvmnetd", ns=ns).stdout
    for line in listing.splitlines():
        if needle in line:
            m = re.search(r"# handle (\d+)$", line)
            assert m, line
            return m.group(1)
    raise AssertionError(f"no rule with {needle!r}")


def test_tampering_is_noticed() -> None:
    nft = NftablesAdapter()
    ruleset = render_ruleset(NETS_A)
    with netns("nf") as ns:
        run_in(ns, lambda: nft.apply(ruleset))
        handle = rule_handle(ns, "masquerade")
        sh("nft", "delete", "rule", "inet", "kvmnetd", "postrouting", "handle", handle, ns=ns)
        assert run_in(ns, nft.observe) == TAMPERED

        run_in(ns, lambda: nft.apply(ruleset))
        assert run_in(ns, nft.observe) == fingerprint(NETS_A)
        sh("nft", "add", "rule", "inet", "kvmnetd", "forward", "accept", ns=ns)
        assert run_in(ns, nft.observe) == TAMPERED

        run_in(ns, lambda: nft.apply(ruleset))
        sh("nft", "delete", "table", "inet", "kvmnetd", ns=ns)
        assert run_in(ns, nft.observe) is None

        run_in(ns, lambda: nft.apply(ruleset))
        sh("nft", "flush", "ruleset", ns=ns)  # inside the test namespace only
        assert run_in(ns, nft.observe) is None

        # A table with our name that we never wrote.
        sh("nft", "add", "table", "inet", "kvmnetd", ns=ns)
        assert run_in(ns, NftablesAdapter().observe) == TAMPERED


# --- real traffic through the rendered ruleset ------------------------------------------------

ECHO_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
while True:
    data, peer = s.recvfrom(100)
    try:
        s.sendto(peer[0].encode(), peer)
    except OSError:  # no route back: the client sees no reply
        pass
"""
ECHO_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(0.3)
for _ in range(6):
    s.sendto(b"hi", (sys.argv[1], int(sys.argv[2])))
    try:
        print(s.recv(100).decode())
        break
    except OSError:
        pass
else:
    sys.exit(1)
"""


class Lab:
    def __init__(self, host: str, up: str, g1: str, g2: str) -> None:
        self.host, self.up, self.g1, self.g2 = host, up, g1, g2

    def seen_as(self, guest: str, target: str = "198.51.100.2", port: int = 9999) -> str | None:
        """Source address the target sees for a UDP packet from `guest` (None: no reply)."""
        r = sh(sys.executable, "-c", ECHO_CLIENT, target, str(port), ns=guest, check=False)
        return r.stdout.strip() if r.returncode == 0 else None


@contextlib.contextmanager
def lab(route_back: bool) -> Iterator[Lab]:
    """host ns: bridge kvbr0 (10.77.1.1/24) with guests g1/g2, uplink up0 to upstream ns."""
    with netns("h") as host, netns("u") as up, netns("a") as g1, netns("b") as g2:
        sh("ip", "link", "add", BR, "type", "bridge", ns=host)
        sh("ip", "addr", "add", "10.77.1.1/24", "dev", BR, ns=host)
        sh("ip", "link", "set", BR, "up", ns=host)
        for i, guest in ((1, g1), (2, g2)):
            veth_into(host, guest, f"vg{i}", address=f"10.77.1.1{i}/24", gateway="10.77.1.1")
            sh("ip", "link", "set", f"vg{i}", "master", BR, "up", ns=host)
        veth_into(host, up, "up0", address="198.51.100.2/24")
        sh("ip", "addr", "add", "198.51.100.1/24", "dev", "up0", ns=host)
        sh("ip", "link", "set", "up0", "up", ns=host)
        if route_back:
            sh("ip", "route", "add", "10.77.1.0/24", "via", "198.51.100.1", ns=up)
        with entered(host):
            set_forwarding(4, True)
        # Echo servers: upstream on 9999; the host on 53 (a stand-in for DNS) and 9999.
        servers = [echo_server(up, 9999), echo_server(host, 53), echo_server(host, 9999)]
        try:
            yield Lab(host, up, g1, g2)
        finally:
            for server in servers:
                server.kill()
                server.wait()


def echo_server(ns: str, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", ECHO_SERVER,
                             str(port)])


def load(ns: str, networks: list[Network]) -> None:
    run_in(ns, lambda: NftablesAdapter().apply(render_ruleset(networks)))


def test_nat_masquerades_to_the_uplink_address() -> None:
    with lab(route_back=False) as lb:
        assert lb.seen_as(lb.g1) is None  # upstream has no way back without NAT
        load(lb.host, [net(Mode.NAT, uplink="up0")])
        assert lb.seen_as(lb.g1) == "198.51.100.1"
        assert ping(lb.g1, "198.51.100.2")
        assert ping(lb.g1, "10.77.1.12")  # bridge-local traffic passes the forward hook
        assert ping(lb.g1, "10.77.1.1")
        # Nothing unsolicited gets in, even with a route.
        sh("ip", "route", "add", "10.77.1.0/24", "via", "198.51.100.1", ns=lb.up)
        assert not ping(lb.up, "10.77.1.11")


def test_nat_spoofed_source_is_dropped() -> None:
    with lab(route_back=True) as lb:
        # g1 sends from an address outside the network's prefix.
        sh("ip", "addr", "add", "10.77.9.11/32", "dev", "eth0", ns=lb.g1)
        sh("ip", "route", "add", "198.51.100.2", "via", "10.77.1.1", "src", "10.77.9.11",
           ns=lb.g1)
        sh("ip", "route", "add", "10.77.9.11", "dev", BR, ns=lb.host)
        sh("ip", "route", "add", "10.77.9.0/24", "via", "198.51.100.1", ns=lb.up)
        assert lb.seen_as(lb.g1) == "10.77.9.11"  # the lab alone would let it out
        load(lb.host, [net(Mode.NAT)])
        assert lb.seen_as(lb.g1) is None


def test_routed_keeps_guest_addresses() -> None:
    with lab(route_back=True) as lb:
        load(lb.host, [net(Mode.ROUTED, uplink="up0")])
        assert lb.seen_as(lb.g1) == "10.77.1.11"
        assert lb.seen_as(lb.g2) == "10.77.1.12"
        assert ping(lb.up, "10.77.1.11")  # routed: reachable from outside
        assert ping(lb.g1, "10.77.1.12")


@pytest.mark.parametrize("host_access", [False, True])
def test_isolated_guests_reach_only_each_other(host_access: bool) -> None:
    with lab(route_back=True) as lb:
        assert lb.seen_as(lb.g1) == "10.77.1.11"  # without rules the lab routes
        load(lb.host, [net(Mode.ISOLATED, host_access=host_access)])
        assert ping(lb.g1, "10.77.1.12")
        assert ping(lb.g2, "10.77.1.11")
        assert lb.seen_as(lb.g1) is None
        assert not ping(lb.g1, "198.51.100.2")
        assert not ping(lb.up, "10.77.1.11")
        assert ping(lb.g1, "10.77.1.1") is host_access
        assert lb.seen_as(lb.g1, "10.77.1.1", 53) == "10.77.1.11"  # DNS stays open
        assert (lb.seen_as(lb.g1, "10.77.1.1", 9999) is not None) is host_access
        assert ping(lb.host, "10.77.1.11")  # the host may still open connections itself
