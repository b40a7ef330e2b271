"""One network's trouble is that network's alone: the real daemon, real routes and links."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from tests.support.dbus import PrivateBus
from tests.support.netns import sh
from tests.support.rig import PY, Sandbox, _reap, wait_until
from tests.support.toml import network_toml

pytestmark = pytest.mark.integration

TWO = (network_toml("a", "nat", "kvta0", "10.70.0.1/24", dns=False)
       + network_toml("b", "nat", "kvtb0", "10.71.0.1/24", dns=False))


def states(box: Sandbox) -> dict[str, str]:
    return {n["name"]: n["state"] for n in box.jctl("network", "list")}


def show(box: Sandbox, name: str) -> dict[str, Any]:
    data = box.jctl("network", "show", name)
    assert isinstance(data, dict)
    return data


def vpn_link(box: Sandbox) -> None:
    """A device that is not kvmnetd's, such as a VPN's tun, to carry foreign routes."""
    sh("ip", "link", "add", "vpn0", "type", "veth", "peer", "name", "vpn0p", ns=box.host)
    sh("ip", "link", "set", "vpn0p", "up", ns=box.host)
    sh("ip", "link", "set", "vpn0", "up", ns=box.host)


def has_link(box: Sandbox, name: str) -> bool:
    return sh("ip", "link", "show", name, ns=box.host, check=False).returncode == 0


def test_host_route_degrades_only_its_network_and_it_recovers(box: Sandbox,
                                                              bus: PrivateBus) -> None:
    box.write_config(TWO)
    vpn_link(box)
    sh("ip", "route", "add", "10.71.0.0/16", "dev", "vpn0", ns=box.host)
    box.start_daemon("--bus-address", bus.address)

    # At start: the other network starts, the overlapped one is degraded and not built.
    assert states(box) == {"a": "active", "b": "degraded"}
    assert not has_link(box, "kvtb0") and has_link(box, "kvta0")
    reason = show(box, "b")["reason"]
    assert "10.71.0.0/16 dev vpn0" in reason and "10.71.0.0/24" in reason
    # The same over D-Bus (State/StateReason properties), in status and in doctor.
    over_bus = json.loads(subprocess.run(
        ["ip", "netns", "exec", box.host, *box.cli_argv()[:3], "--bus-address", bus.address,
         "network", "show", "b", "--json"], capture_output=True, text=True, check=True).stdout)
    assert over_bus["state"] == "degraded" and over_bus["reason"] == reason
    assert "10.71.0.0/16 dev vpn0" in box.ctl_out("status")
    findings = json.loads(box.ctl("doctor", "--json", check=False).stdout)
    assert any(f["check"] == "subnet-overlaps-host-route" and f["network"] == "b"
               and "dev vpn0" in f["subject"] for f in findings), findings
    assert not any(f["check"] in ("bridge-missing", "dhcp-degraded") for f in findings)

    # The route goes: the network comes up by itself.
    sh("ip", "route", "del", "10.71.0.0/16", "dev", "vpn0", ns=box.host)
    assert wait_until(lambda: states(box) == {"a": "active", "b": "active"}, timeout=15)
    assert has_link(box, "kvtb0")

    # A route over a running network: degraded with the reason, but left running.
    sh("ip", "route", "add", "10.71.0.128/25", "dev", "vpn0", ns=box.host)
    assert wait_until(lambda: states(box) == {"a": "active", "b": "degraded"}, timeout=15)
    assert "10.71.0.128/25 dev vpn0" in show(box, "b")["reason"]
    assert has_link(box, "kvtb0")
    assert "10.71.0.1/24" in sh("ip", "-o", "addr", "show", "kvtb0", ns=box.host).stdout
    sh("ip", "route", "del", "10.71.0.128/25", "dev", "vpn0", ns=box.host)
    assert wait_until(lambda: states(box) == {"a": "active", "b": "active"}, timeout=15)
    assert show(box, "b")["reason"] in ("", None)


def test_reload_and_define_are_not_refused_over_a_host_route(box: Sandbox) -> None:
    box.write_config(TWO)
    vpn_link(box)
    box.start_daemon("--no-bus")
    sh("ip", "route", "add", "10.72.0.0/16", "dev", "vpn0", ns=box.host)
    box.write_config(TWO + '\n[network.c]\nbridge = "kvtc0"\nipv4 = "10.72.0.1/24"\n'
                           '[network.c.dns]\nenabled = false\n')
    box.ctl("reload")
    assert wait_until(lambda: states(box) == {"a": "active", "b": "active", "c": "degraded"})
    lab = box.tmp / "lab.toml"
    lab.write_text('[network.lab]\nbridge = "kvtl0"\nipv4 = "10.72.5.1/24"\n'
                   '[network.lab.dns]\nenabled = false\n')
    box.ctl("network", "define", str(lab), "--runtime")
    assert states(box)["lab"] == "degraded"
    assert states(box)["a"] == "active"


FREEBIND_HOLDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND: the address comes later, with the bridge
s.bind((sys.argv[1], 53))
print("bound", flush=True)
time.sleep(600)
"""

MANY = (network_toml("ok", "nat", "kvok0", "10.73.0.1/24", dhcp_range="10.73.0.100-10.73.0.150")
        + network_toml("lan", "bridged", "kvlan0", uplink="nic9")
        + network_toml("taken", "nat", "kvtk0", "10.74.0.1/24", dns=False)
        + network_toml("foreign", "nat", "kvfb0", "10.75.0.1/24", dns=False)
        + network_toml("nobind", "nat", "kvnb0", "10.76.0.1/24",
                       dhcp_range="10.76.0.100-10.76.0.150"))


def test_each_run_time_failure_stays_with_its_network(box: Sandbox) -> None:
    box.write_config(MANY)
    # A bridge name held by a non-bridge link, and one by a bridge that is someone else's.
    sh("ip", "link", "add", "kvtk0", "type", "veth", "peer", "name", "kvtk0p", ns=box.host)
    sh("ip", "link", "add", "kvfb0", "type", "bridge", ns=box.host)
    sh("ip", "addr", "add", "192.0.2.1/24", "dev", "kvfb0", ns=box.host)
    # Something else already holds DNS on nobind's gateway address.
    holder = subprocess.Popen(["ip", "netns", "exec", box.host, PY, "-c", FREEBIND_HOLDER,
                               "10.76.0.1"], stdout=subprocess.PIPE, text=True)
    box.stack.callback(_reap, holder)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "bound"
    box.start_daemon("--no-bus")

    assert states(box)["ok"] == "active"
    lan, taken, foreign = show(box, "lan"), show(box, "taken"), show(box, "foreign")
    assert lan["state"] == "failed" and "uplink nic9 not found" in lan["reason"]
    assert taken["state"] == "failed" and "not a bridge" in taken["reason"]
    assert foreign["state"] == "failed" and "192.0.2.1/24" in foreign["reason"]
    assert "10.75.0.1/24" not in sh("ip", "-o", "addr", "show", "kvfb0", ns=box.host).stdout
    assert wait_until(lambda: show(box, "nobind")["state"] == "degraded", timeout=20)
    assert show(box, "nobind")["reason"].startswith("dhcp: ")
    assert states(box)["ok"] == "active"
    ok_pid = (box.run_dir / "dnsmasq" / "ok.pid")
    assert not ok_pid.exists() or ok_pid.read_text().strip()

    # The missing NIC appears: its network comes up by itself.
    sh("ip", "link", "add", "nic9", "type", "veth", "peer", "name", "nic9p", ns=box.host)
    assert wait_until(lambda: show(box, "lan")["state"] == "active", timeout=15)
    assert box.master_of("nic9") == "kvlan0"
    assert states(box)["ok"] == "active"
