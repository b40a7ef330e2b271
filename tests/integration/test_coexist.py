"""Coexistence with a foreign forward drop (Docker, ufw, a pure-nft firewall), with real traffic.

The host namespace of a sandbox gets two bridges by hand (nat and isolated, two
guests each) and our own table from the real renderer; the foreign firewall is
set up with iptables (iptables-nft) or nft; the adapter runs in-process, moved
into the host namespace.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from kvmnetd.adapters.coexist import ForeignForwardAdapter
from kvmnetd.adapters.nftables import NftablesAdapter
from kvmnetd.model.desired import Mode, Network
from kvmnetd.plan.coexist import coexist_rules
from kvmnetd.plan.nft import render_ruleset
from tests.support.netns import entered, ping, sh
from tests.support.rig import HOST_UPLINK_IP, Sandbox

pytestmark = pytest.mark.integration

T = TypeVar("T")
v4 = ipaddress.IPv4Interface
NAT = Network("nat", Mode.NAT, "kvnat0", v4("10.50.0.1/24"))
ISO = Network("iso", Mode.ISOLATED, "kviso0", v4("10.51.0.1/24"))
NETS = [NAT, ISO]
FOREIGN_NFT = """
table inet fw {
    chain forward {
        type filter hook forward priority 0; policy drop;
        ip saddr 192.0.2.0/24 counter accept comment "someone else's"
    }
}
"""


def run_in(ns: str, step: Callable[[], Awaitable[T]]) -> T:
    with entered(ns):
        return asyncio.run(step())  # type: ignore[arg-type]


class Host:
    def __init__(self, box: Sandbox) -> None:
        self.box = box
        self.ns = box.host
        self.guests: dict[str, str] = {}
        for net, prefix, ports in ((NAT, "10.50.0", ("pn1", "pn2")),
                                   (ISO, "10.51.0", ("pi1", "pi2"))):
            sh("ip", "link", "add", net.bridge, "type", "bridge", ns=self.ns)
            sh("ip", "addr", "add", str(net.ipv4), "dev", net.bridge, ns=self.ns)
            sh("ip", "link", "set", net.bridge, "up", ns=self.ns)
            for i, port in enumerate(ports, 11):
                self.guests[port] = box.guest(port, f"{prefix}.{i}/24", f"{prefix}.1")
                sh("ip", "link", "set", port, "master", net.bridge, "up", ns=self.ns)
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=self.ns)
        self.adapter = ForeignForwardAdapter()
        self.table = NftablesAdapter()
        run_in(self.ns, lambda: self.table.apply(render_ruleset(NETS)))

    def docker(self) -> None:
        for cmd in (("-P", "FORWARD", "DROP"), ("-N", "DOCKER-USER"),
                    ("-I", "FORWARD", "-j", "DOCKER-USER"), ("-A", "DOCKER-USER", "-j", "RETURN")):
            sh("iptables", *cmd, ns=self.ns)

    async def _sync(self, mode: str = "auto") -> int:
        ff = await self.adapter.observe()
        change = await self.adapter.apply(coexist_rules(NETS, ff, mode).rules)
        return len(change.insert) + len(change.delete)

    def sync(self, mode: str = "auto") -> int:
        return run_in(self.ns, lambda: self._sync(mode))

    async def _remove_all(self) -> None:
        await self.adapter.observe()
        await self.adapter.apply(())

    def remove_all(self) -> None:
        """Teardown: no rule tagged by kvmnetd stays, as the ruleset is now."""
        run_in(self.ns, self._remove_all)

    def nat_out(self) -> bool:
        return self.box.source_seen_by_upstream(self.guests["pn1"], timeout=0.5) == HOST_UPLINK_IP

    def iso_peers(self) -> bool:
        return ping(self.guests["pi1"], "10.51.0.12") and ping(self.guests["pn1"], "10.50.0.12")


_COUNTERS = re.compile(r"\[\d+:\d+\]|packets \d+ bytes \d+")


def iptables_save(ns: str) -> str:
    r = sh("iptables-save", ns=ns)
    assert "incompatible" not in r.stdout + r.stderr, r.stdout + r.stderr
    lines = [ln for ln in r.stdout.splitlines() if not ln.startswith("#")]
    return _COUNTERS.sub("", "\n".join(lines))


def foreign(ns: str) -> str:
    """Everything but our table and our tagged rules, counters blanked."""
    text = sh("nft", "list", "ruleset", ns=ns).stdout
    text = re.sub(r"table inet kvmnetd \{.*?\n\}\n?", "", text, flags=re.S)
    lines = [ln for ln in text.splitlines() if 'comment "kvmnetd:' not in ln]
    return _COUNTERS.sub("", "\n".join(lines))


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    with Sandbox(tmp_path) as box:
        yield Host(box)


def test_docker_forward_drop_is_real_and_docker_user_accepts_fix_it(host: Host) -> None:
    assert host.nat_out() and host.iso_peers()
    host.docker()
    before_ipt, before_nft = iptables_save(host.ns), foreign(host.ns)
    # br_netfilter: even guest-to-guest traffic on one bridge meets Docker's DROP.
    assert not host.nat_out(), "the foreign drop should block NAT guests"
    assert not ping(host.guests["pi1"], "10.51.0.12"), "and bridge-local traffic too"
    assert host.sync() > 0
    assert host.nat_out() and host.iso_peers()
    save = sh("iptables", "-S", "DOCKER-USER", ns=host.ns).stdout
    assert '-m comment --comment "kvmnetd:nat"' in save and "-j RETURN" in save.splitlines()[-1]
    assert iptables_save(host.ns).replace("\n", "") != before_ipt.replace("\n", "")
    assert foreign(host.ns) == before_nft
    # Converged: nothing more to write.
    writes = host.adapter.writes
    assert host.sync() == 0 and host.adapter.writes == writes
    host.remove_all()
    assert iptables_save(host.ns) == before_ipt
    assert foreign(host.ns) == before_nft
    assert "kvmnetd:" not in sh("nft", "list", "ruleset", ns=host.ns).stdout
    assert not host.nat_out()


def test_ufw_style_forward_drop_then_docker_arrives(host: Host) -> None:
    sh("iptables", "-P", "FORWARD", "DROP", ns=host.ns)
    sh("iptables", "-A", "FORWARD", "-s", "192.0.2.0/24", "-j", "ACCEPT", ns=host.ns)
    host.sync()
    assert "kvmnetd:nat" in sh("iptables", "-S", "FORWARD", ns=host.ns).stdout
    assert host.nat_out() and host.iso_peers()
    # Docker starts later: the accepts move to DOCKER-USER, FORWARD keeps only its own rules.
    sh("iptables", "-N", "DOCKER-USER", ns=host.ns)
    sh("iptables", "-I", "FORWARD", "-j", "DOCKER-USER", ns=host.ns)
    host.sync()
    assert "kvmnetd:" not in sh("iptables", "-S", "FORWARD", ns=host.ns).stdout
    assert "kvmnetd:nat" in sh("iptables", "-S", "DOCKER-USER", ns=host.ns).stdout
    assert host.nat_out() and host.iso_peers()


def test_our_rules_removed_by_someone_are_put_back_others_never_touched(host: Host) -> None:
    host.docker()
    sh("iptables", "-I", "DOCKER-USER", "-s", "192.0.2.9", "-j", "DROP", ns=host.ns)
    host.sync()
    sh("iptables", "-F", "DOCKER-USER", ns=host.ns)
    sh("iptables", "-A", "DOCKER-USER", "-s", "192.0.2.9", "-j", "DROP", ns=host.ns)
    before = iptables_save(host.ns)
    assert host.sync() > 0
    assert host.nat_out()
    after = iptables_save(host.ns)
    assert [ln for ln in after.splitlines() if "kvmnetd:" not in ln] == before.splitlines()


def test_foreign_nft_table_is_reported_and_only_touched_when_allowed(host: Host) -> None:
    sh("nft", "-f", "-", ns=host.ns, input=FOREIGN_NFT)
    before = foreign(host.ns)
    ff = run_in(host.ns, host.adapter.observe)
    plan = coexist_rules(NETS, ff)
    assert plan.rules == () and "inet fw" in plan.reports[0]
    assert host.sync() == 0 and not host.nat_out()
    assert host.sync("all") > 0
    assert host.nat_out() and host.iso_peers()
    listed = sh("nft", "list", "chain", "inet", "fw", "forward", ns=host.ns).stdout
    assert "ct state established,related accept comment \"kvmnetd:nat\"" in listed
    assert foreign(host.ns) == before
    host.remove_all()
    assert foreign(host.ns) == before and not host.nat_out()
