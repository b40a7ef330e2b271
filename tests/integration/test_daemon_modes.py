"""The real daemon in a sandbox namespace: each mode, end to end, with real traffic."""

from __future__ import annotations

import json
import re
import signal

import pytest

from tests.support.netns import ping, sh
from tests.support.rig import FAR_HOST, HOST_UPLINK_IP, UPSTREAM_IP, Sandbox, wait_until
from tests.support.toml import attach_toml, daemon_toml, network_toml

pytestmark = pytest.mark.integration



def config(host_access: bool = False) -> str:
    return (network_toml("nat", "nat", "kvnat0", "10.50.0.1/24", dns=False)
            + network_toml("iso", "isolated", "kviso0", "10.51.0.1/24", dns=False,
                           host_access=host_access)
            + network_toml("rt", "routed", "kvrt0", "10.52.0.1/24", dns=False)
            + attach_toml("nat", ifname="pn*") + attach_toml("iso", ifname="pi*")
            + attach_toml("rt", ifname="pr*"))






def writes_at_ready(box: Sandbox) -> list[int]:
    return [int(w) for w in re.findall(r"event='daemon.ready'.*?writes=(\d+)",
                                       box.log.read_text())]


def test_nat_guests_reach_each_other_and_upstream_through_masquerade(box: Sandbox) -> None:
    box.write_config(config())
    g1 = box.guest("pn1", "10.50.0.11/24", "10.50.0.1")
    g2 = box.guest("pn2", "10.50.0.12/24", "10.50.0.1")
    box.start_daemon("--no-bus")
    assert wait_until(lambda: box.master_of("pn1") == "kvnat0" == box.master_of("pn2"))
    assert ping(g1, "10.50.0.12") and ping(g2, "10.50.0.11")
    assert ping(g1, "10.50.0.1")
    assert ping(g1, FAR_HOST)
    assert box.source_seen_by_upstream(g1) == HOST_UPLINK_IP
    assert sh("cat", "/proc/sys/net/ipv4/ip_forward", ns=box.host).stdout.strip() == "1"


def test_isolated_guests_reach_only_each_other(box: Sandbox) -> None:
    box.write_config(config())
    g1 = box.guest("pi1", "10.51.0.11/24", "10.51.0.1")
    g2 = box.guest("pi2", "10.51.0.12/24", "10.51.0.1")
    box.start_daemon("--no-bus")
    assert wait_until(lambda: box.master_of("pi2") == "kviso0")
    assert ping(g1, "10.51.0.12") and ping(g2, "10.51.0.11")
    assert not ping(g1, "10.51.0.1"), "the host must not be reachable without host_access"
    assert not ping(g1, UPSTREAM_IP)
    assert box.source_seen_by_upstream(g1, timeout=0.3) is None


def test_isolated_host_access_opens_only_the_host(box: Sandbox) -> None:
    box.write_config(config(host_access=True))
    g1 = box.guest("pi1", "10.51.0.11/24", "10.51.0.1")
    box.start_daemon("--no-bus")
    assert wait_until(lambda: box.master_of("pi1") == "kviso0")
    assert ping(g1, "10.51.0.1")
    assert not ping(g1, UPSTREAM_IP)


def test_routed_guests_keep_their_source_address(box: Sandbox) -> None:
    box.write_config(config())
    sh("ip", "route", "add", "10.52.0.0/24", "via", HOST_UPLINK_IP, ns=box.upstream)
    g1 = box.guest("pr1", "10.52.0.11/24", "10.52.0.1")
    box.start_daemon("--no-bus")
    assert wait_until(lambda: box.master_of("pr1") == "kvrt0")
    assert box.source_seen_by_upstream(g1) == "10.52.0.11"


def test_bridged_uplink_keeps_the_host_connected(box: Sandbox) -> None:
    box.write_config(network_toml("lan", "bridged", "kvlan0", uplink="uplink0")
                     + attach_toml("lan", ifname="pb*"))
    g1 = box.guest("pb1", "198.51.100.50/24", UPSTREAM_IP)
    box.start_daemon("--no-bus")
    assert wait_until(lambda: box.master_of("uplink0") == "kvlan0")
    addrs = sh("ip", "-o", "addr", "show", "dev", "kvlan0", ns=box.host).stdout
    assert f"{HOST_UPLINK_IP}/24" in addrs
    assert "default via 198.51.100.2 dev kvlan0" in sh("ip", "route", ns=box.host).stdout
    assert ping(box.host, FAR_HOST), "the host lost its connectivity"
    assert wait_until(lambda: box.master_of("pb1") == "kvlan0")
    assert box.source_seen_by_upstream(g1) == "198.51.100.50"
    # A reload must not take the uplink's own subnet (now on the bridge) for a host route.
    assert box.daemon is not None
    box.daemon.send_signal(signal.SIGHUP)
    box.wait_notify("READY=1")
    assert "config.reload_refused" not in box.log.read_text()
    # Stopping with teardown gives the NIC its address and route back.
    box.write_config(box.config.read_text() + daemon_toml(teardown_on_stop=True))
    box.stop_daemon()
    box.start_daemon("--no-bus")
    box.stop_daemon()
    assert box.master_of("uplink0") is None
    assert f"{HOST_UPLINK_IP}/24" in sh("ip", "-o", "addr", "show", "uplink0",
                                        ns=box.host).stdout
    assert "default via 198.51.100.2 dev uplink0" in sh("ip", "route", ns=box.host).stdout
    assert ping(box.host, FAR_HOST)


def test_restart_on_a_right_system_writes_nothing(box: Sandbox) -> None:
    box.write_config(config())
    box.guest("pn1", "10.50.0.11/24", "10.50.0.1")
    box.start_daemon("--no-bus")
    assert wait_until(lambda: box.master_of("pn1") == "kvnat0")
    links = box.link_table()
    ruleset = box.nft()
    box.stop_daemon()
    box.start_daemon("--no-bus")
    assert writes_at_ready(box)[-1] == 0
    assert box.nft() == ruleset
    assert box.link_table() == links


FOREIGN = """
table inet foreign {
    chain guard {
        type filter hook forward priority 10; policy accept;
        ip saddr 192.0.2.0/24 counter accept comment "someone else's"
    }
}
"""


def foreign_state(box: Sandbox) -> tuple[str, str]:
    table = sh("nft", "list", "table", "inet", "foreign", ns=box.host).stdout
    ipt = sh("iptables-save", ns=box.host).stdout
    ipt = "\n".join(line for line in ipt.splitlines() if not line.startswith("#"))
    return table, ipt


def test_foreign_rules_are_byte_identical_after_everything(box: Sandbox) -> None:
    sh("nft", "-f", "-", ns=box.host, input=FOREIGN)
    sh("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "192.0.2.0/24", "-j", "MASQUERADE",
       ns=box.host)
    sh("iptables", "-A", "FORWARD", "-s", "192.0.2.0/24", "-j", "ACCEPT", ns=box.host)
    before = foreign_state(box)
    box.write_config(config())
    box.guest("pn1", "10.50.0.11/24", "10.50.0.1")
    box.start_daemon("--no-bus")
    assert wait_until(lambda: box.master_of("pn1") == "kvnat0")
    assert foreign_state(box) == before
    # A reload that moves the policy (nat guests now go to the isolated network).
    box.write_config(config().replace('ifname = "pn*"', 'ifname = "zz*"')
                     .replace('ifname = "pi*"', 'ifname = "p[in]*"'))
    import signal as _signal
    box.daemon.send_signal(_signal.SIGHUP)  # type: ignore[union-attr]
    assert wait_until(lambda: box.master_of("pn1") == "kviso0")
    assert foreign_state(box) == before
    box.write_config(box.config.read_text() + daemon_toml(teardown_on_stop=True))
    box.daemon.send_signal(_signal.SIGHUP)  # type: ignore[union-attr]
    box.wait_notify("READY=1")
    box.stop_daemon()
    assert foreign_state(box) == before
    assert "kvmnetd" not in box.nft()
    assert "kvnat0" not in sh("ip", "-o", "link", ns=box.host).stdout


def test_tampering_while_stopped_is_repaired_at_start(box: Sandbox) -> None:
    box.write_config(config())
    box.start_daemon("--no-bus")
    ruleset = box.nft()
    box.stop_daemon()
    handle = re.search(r'oifname "kvnat0" drop comment "net:nat" # handle (\d+)',
                       sh("nft", "-a", "list", "table", "inet", "kvmnetd", ns=box.host).stdout)
    assert handle
    sh("nft", "delete", "rule", "inet", "kvmnetd", "forward", "handle", handle.group(1),
       ns=box.host)
    box.start_daemon("--no-bus")
    assert box.nft() == ruleset


def iptables_state(box: Sandbox) -> str:
    out = sh("iptables-save", ns=box.host).stdout
    return "\n".join(line for line in out.splitlines() if not line.startswith("#"))


def docker_like(box: Sandbox) -> None:
    sh("iptables", "-P", "FORWARD", "DROP", ns=box.host)
    sh("iptables", "-N", "DOCKER-USER", ns=box.host)
    sh("iptables", "-A", "DOCKER-USER", "-j", "RETURN", ns=box.host)
    sh("iptables", "-I", "FORWARD", "-j", "DOCKER-USER", ns=box.host)


def test_guests_get_through_dockers_forward_drop(box: Sandbox) -> None:
    docker_like(box)
    foreign = iptables_state(box)
    box.write_config(config() + "\n[daemon]\nteardown_on_stop = true\n")
    g1 = box.guest("pn1", "10.50.0.11/24", "10.50.0.1")
    i1 = box.guest("pi1", "10.51.0.11/24", "10.51.0.1")
    i2 = box.guest("pi2", "10.51.0.12/24", "10.51.0.1")
    box.start_daemon("--no-bus")
    assert wait_until(lambda: box.master_of("pi2") == "kviso0")
    assert box.source_seen_by_upstream(g1) == HOST_UPLINK_IP
    assert ping(i1, "10.51.0.12"), "br_netfilter + FORWARD DROP must not cut isolated guests"
    assert not ping(i1, UPSTREAM_IP)
    rules = sh("iptables", "-S", "DOCKER-USER", ns=box.host).stdout
    assert "kvmnetd:nat" in rules and rules.splitlines()[-1] == "-A DOCKER-USER -j RETURN"
    box.stop_daemon()
    assert iptables_state(box) == foreign, "our accepts are gone, Docker's rules untouched"
    assert i2


def test_coexist_off_leaves_foreign_chains_alone(box: Sandbox) -> None:
    docker_like(box)
    foreign = iptables_state(box)
    box.write_config(config() + '\n[daemon]\ncoexist = "off"\n')
    g1 = box.guest("pn1", "10.50.0.11/24", "10.50.0.1")
    box.start_daemon("--no-bus")
    assert wait_until(lambda: box.master_of("pn1") == "kvnat0")
    assert iptables_state(box) == foreign
    assert box.source_seen_by_upstream(g1, timeout=0.3) is None


def test_ipv6_gateway_mtu_and_stp_are_applied(box: Sandbox) -> None:
    box.write_config(network_toml("six", "routed", "kvsix0", "10.53.0.1/24", dns=False,
                                  ipv6="fd53::1/64", mtu=1400, stp=True, forward_delay=2)
                     + attach_toml("six", ifname="p6*"))
    g = box.guest("p61")
    sh("ip", "addr", "add", "fd53::11/64", "dev", "eth0", "nodad", ns=g)
    box.start_daemon("--no-bus")
    link = json.loads(sh("ip", "-j", "-d", "link", "show", "kvsix0", ns=box.host).stdout)[0]
    assert link["mtu"] == 1400
    info = link["linkinfo"]["info_data"]
    assert info["stp_state"] == 1 and info["forward_delay"] in (199, 200)
    assert "fd53::1/64" in sh("ip", "-6", "addr", "show", "kvsix0", ns=box.host).stdout
    assert wait_until(lambda: box.master_of("p61") == "kvsix0")
    # STP on: the port learns for forward_delay seconds before it forwards.
    assert wait_until(lambda: sh("busybox", "ping6", "-c", "1", "-W", "1", "fd53::1", ns=g,
                                 check=False).returncode == 0, timeout=10)
    assert sh("cat", "/proc/sys/net/ipv6/conf/all/forwarding", ns=box.host).stdout.strip() == "1"
