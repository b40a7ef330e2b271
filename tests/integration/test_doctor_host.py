"""Doctor against the real daemon: host settings that block guests' DHCP/DNS or IPv6.

Each test makes the condition in the sandbox's host namespace (where the daemon runs),
asks `kvmnetctl doctor --json`, and checks the finding, its fix, and that the fix works.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.support.netns import sh
from tests.support.rig import Sandbox, wait_until
from tests.support.toml import network_toml

pytestmark = pytest.mark.integration

BR = "kvdoc0"
CONFIG = network_toml("nat", "nat", BR, "10.58.0.1/24", dhcp_range="10.58.0.100-10.58.0.150")


def findings(box: Sandbox, check: str) -> list[dict[str, Any]]:
    r = box.ctl("doctor", "--json", check=False)
    return [f for f in json.loads(r.stdout) if f["check"] == check]


def test_iptables_input_drop_of_dhcp(box: Sandbox) -> None:
    box.write_config(CONFIG)
    g = box.guest("vmd1")
    box.start_daemon("--no-bus")
    box.ctl("port", "attach", "vmd1", "nat")
    assert findings(box, "foreign-input-drop") == []
    # What a host firewall written with plain iptables (iptables-nft) does.
    sh("iptables", "-I", "INPUT", "-p", "udp", "--dport", "67", "-j", "DROP", ns=box.host)
    assert box.dhcp(g) == {}, "the drop is real: no lease"
    [f] = findings(box, "foreign-input-drop")
    assert f["network"] == "nat" and f["subject"] == "table ip filter chain INPUT"
    assert "DHCP (udp/67)" in f["message"] and "DNS" not in f["message"]
    assert f["fix"] == f"iptables -I INPUT -i {BR} -p udp --dport 67 -j ACCEPT"
    sh(*f["fix"].split(), ns=box.host)
    assert findings(box, "foreign-input-drop") == []
    assert box.dhcp(g).get("ip", "").startswith("10.58.0.")


def test_nft_input_chain_with_policy_drop(box: Sandbox) -> None:
    box.write_config(CONFIG)
    g = box.guest("vmd2")
    box.start_daemon("--no-bus")
    box.ctl("port", "attach", "vmd2", "nat")
    sh("nft", "-f", "-", ns=box.host, input=(
        "table inet filter {\n chain input {\n  type filter hook input priority 0; policy drop;\n"
        '  ct state established,related accept\n  iifname "lo" accept\n }\n}\n'))
    [f] = findings(box, "foreign-input-drop")
    assert f["subject"] == "table inet filter chain input" and "policy drop" in f["message"]
    assert "DHCP (udp/67), DNS (udp/53)" in f["message"]
    assert f["fix"] == (f'nft insert rule inet filter input iifname "{BR}" '
                        "udp dport { 67, 53 } accept")
    assert box.dhcp(g) == {}
    sh("sh", "-c", f["fix"], ns=box.host)
    assert findings(box, "foreign-input-drop") == []
    assert wait_until(lambda: box.dhcp(g).get("ip", "").startswith("10.58.0."), timeout=10)


def test_ufw_layout_written_with_iptables(box: Sandbox) -> None:
    """ufw's INPUT as iptables-nft stores it: policy DROP, conntrack and addrtype as xt."""
    box.write_config(CONFIG)
    g = box.guest("vmd3")
    box.start_daemon("--no-bus")
    box.ctl("port", "attach", "vmd3", "nat")
    for chain in ("ufw-before-input", "ufw-user-input", "ufw-after-input",
                  "ufw-skip-to-policy-input"):
        sh("iptables", "-N", chain, ns=box.host)
    for rule in ("INPUT -j ufw-before-input", "INPUT -j ufw-after-input",
                 "ufw-before-input -i lo -j ACCEPT",
                 "ufw-before-input -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                 "ufw-before-input -m conntrack --ctstate INVALID -j DROP",
                 "ufw-before-input -p udp --sport 67 --dport 68 -j ACCEPT",
                 "ufw-before-input -j ufw-user-input",
                 "ufw-after-input -m addrtype --dst-type BROADCAST -j ufw-skip-to-policy-input",
                 "ufw-skip-to-policy-input -j DROP"):
        sh("iptables", "-A", *rule.split(), ns=box.host)
    sh("iptables", "-P", "INPUT", "DROP", ns=box.host)
    [f] = findings(box, "foreign-input-drop")
    assert "DHCP (udp/67), DNS (udp/53)" in f["message"]
    assert f["fix"] == (f"ufw allow in on {BR} to any port 67 proto udp; "
                        f"ufw allow in on {BR} to any port 53 proto udp")
    assert box.dhcp(g) == {}
    # What `ufw allow in on BR to any port 67 proto udp` adds.
    sh("iptables", "-A", "ufw-user-input", "-i", BR, "-p", "udp", "--dport", "67", "-j",
       "ACCEPT", ns=box.host)
    [f] = findings(box, "foreign-input-drop")
    assert "DHCP" not in f["message"] and "DNS (udp/53)" in f["message"]
    assert box.dhcp(g).get("ip", "").startswith("10.58.0.")

SIX = (network_toml("six", "nat", "kvdoc6", "10.59.0.1/24", dns=False, ipv6="fd59::1/64")
       + network_toml("four", "nat", "kvdoc4", "10.56.0.1/24", dns=False))


def sysctl(box: Sandbox, key: str) -> str:
    return sh("sysctl", "-n", key, ns=box.host).stdout.strip()


def state(box: Sandbox, name: str) -> dict[str, Any]:
    out: dict[str, Any] = box.jctl("network", "show", name)
    return out


def test_accept_ra_on_an_uplink_that_learned_its_ipv6_route(box: Sandbox) -> None:
    # An uplink whose IPv6 default route the kernel learned from a router advertisement.
    sh("sysctl", "-qw", "net.ipv6.conf.uplink0.accept_ra=1",
       "net.ipv6.conf.all.forwarding=0", ns=box.host)
    sh("ip", "-6", "route", "add", "default", "via", "fe80::1", "dev", "uplink0", "proto", "ra",
       ns=box.host)
    box.write_config(SIX)
    box.start_daemon("--no-bus")
    six = state(box, "six")
    assert six["state"] == "failed" and "uplink0" in six["reason"], six
    assert "net.ipv6.conf.uplink0.accept_ra=2" in six["reason"]
    assert state(box, "four")["state"] == "active", "only the network needing IPv6 forwarding"
    assert sysctl(box, "net.ipv6.conf.all.forwarding") == "0", "kvmnetd left it off"
    [f] = findings(box, "accept-ra-forwarding")
    assert f["network"] == "six" and f["subject"] == "net.ipv6.conf.uplink0.accept_ra"
    assert f["fix"].startswith("sysctl -w net.ipv6.conf.uplink0.accept_ra=2")
    # The fix as given; the periodic verification notices it and the network comes up.
    sh(*f["fix"].split(",")[0].split(), ns=box.host)
    assert wait_until(lambda: state(box, "six")["state"] == "active", timeout=15)
    assert sysctl(box, "net.ipv6.conf.all.forwarding") == "1"
    assert "default via fe80::1" in sh("ip", "-6", "route", "show", "default", ns=box.host).stdout
    assert findings(box, "accept-ra-forwarding") == []
