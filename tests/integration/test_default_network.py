"""The built-in default network's subnet: clear of other tools' ranges, chosen once, kept.

The real daemon with no configuration file, in a sandbox namespace. Podman's network
is simulated by a route to 10.88.0.0/16 on a veth, and another route takes the first
candidate, so the choice depends on the routes of that moment.
"""

from __future__ import annotations

import ipaddress
import json

import pytest

from kvmnetd.config import load as cfg
from tests.support.netns import sh
from tests.support.rig import Sandbox

pytestmark = pytest.mark.integration


def bridge_subnet(box: Sandbox) -> ipaddress.IPv4Network:
    addrs = json.loads(sh("ip", "-j", "-4", "addr", "show", "dev", "kvbr0", ns=box.host).stdout)
    info = addrs[0]["addr_info"][0]
    return ipaddress.IPv4Interface(f"{info['local']}/{info['prefixlen']}").network


def kept_file(box: Sandbox) -> str:
    return (box.state_dir / "default-network.toml").read_text()


def test_default_subnet_avoids_podman_and_is_kept_across_restarts(box: Sandbox) -> None:
    box.networks_dir.mkdir()
    # Podman's bridge with its default network, and a VPN-like route over 10.80.0.0/24.
    sh("ip", "link", "add", "podman0", "type", "veth", "peer", "name", "podman0p", ns=box.host)
    sh("ip", "addr", "add", "10.88.0.1/16", "dev", "podman0", ns=box.host)
    sh("ip", "link", "set", "podman0", "up", ns=box.host)
    sh("ip", "route", "add", "10.80.0.0/24", "dev", "podman0", ns=box.host)

    box.start_daemon("--no-bus")
    chosen = bridge_subnet(box)
    assert chosen == ipaddress.IPv4Network("10.80.1.0/24")
    avoided = [ipaddress.IPv4Network(net) for net, _ in cfg.AVOIDED]
    assert not any(chosen.overlaps(a) for a in avoided), chosen
    assert f'subnet = "{chosen}"' in kept_file(box)
    assert box.jctl("network", "list")[0]["name"] == "default"

    # Podman and the VPN are gone; the default would now be 10.80.0.0/24, yet it stays.
    box.stop_daemon()
    sh("ip", "link", "del", "podman0", ns=box.host)
    assert cfg.choose_default_subnet([]) != chosen
    box.start_daemon("--no-bus")
    assert bridge_subnet(box) == chosen
    g = box.guest("vnet0")
    box.ctl("port", "attach", "vnet0", "default")
    got = box.dhcp(g)
    assert ipaddress.IPv4Address(got["ip"]) in chosen, got

    # A route over it now (a VPN up before kvmnetd at the next boot) does not move it.
    box.stop_daemon()
    sh("ip", "link", "add", "vpn0", "type", "veth", "peer", "name", "vpn0p", ns=box.host)
    sh("ip", "link", "set", "vpn0", "up", ns=box.host)
    sh("ip", "route", "add", "10.80.0.0/16", "dev", "vpn0", ns=box.host)
    box.start_daemon("--no-bus")
    assert bridge_subnet(box) == chosen

    # The file is the admin's handle: deleted, the next load chooses again (and keeps that).
    (box.state_dir / "default-network.toml").unlink()
    box.ctl("reload")
    assert bridge_subnet(box) == ipaddress.IPv4Network("10.81.0.0/24")
    assert 'subnet = "10.81.0.0/24"' in kept_file(box)
