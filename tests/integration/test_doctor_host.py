"""Doctor against the real daemon: host settings that block guests' DHCP/DNS or IPv6.

Each test makes the condition in the sandbox's host namespace (where the daemon runs),
asks `kvmnetctl doctor --json`, and checks the finding, its fix, and that the fix works.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.netns import sh
from tests.rig import Sandbox, wait_until

pytestmark = pytest.mark.integration

BR = "kvdoc0"
CONFIG = f"""
[network.nat]
mode = "nat"
bridge = "{BR}"
ipv4 = "10.58.0.1/24"
[network.nat.dhcp]
ranges = ["10.58.0.100-10.58.0.150"]
"""


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
