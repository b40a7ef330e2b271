"""The real daemon on a private system bus: signals, and hostile calls against the real core."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import time

import pytest
from dbus_fast import BusType, Message, MessageType

from kvmnetd.control.dbus_objects import SteadyBus
from kvmnetd.control.names import BUS_NAME, MANAGER_IFACE, MANAGER_PATH
from tests.support.dbus import PrivateBus, start_bus, stop_bus
from tests.support.netns import sh
from tests.support.rig import Sandbox, wait_until
from tests.support.toml import network_toml

pytestmark = pytest.mark.integration

CONFIG = (network_toml("nat", "nat", "kvnat0", "10.60.0.1/24",
                       dhcp_range="10.60.0.100-10.60.0.150")
          + network_toml("iso", "isolated", "kviso0", "10.61.0.1/24", dns=False))


def test_signals_for_ports_networks_and_leases(box: Sandbox, bus: PrivateBus) -> None:
    box.write_config(CONFIG)
    g = box.guest("vm1", mac="52:54:00:00:00:21")
    box.start_daemon("--bus-address", bus.address)
    monitor = subprocess.Popen(["gdbus", "monitor", "--address", bus.address, "--dest", BUS_NAME],
                               stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # let the monitor subscribe
        box.ctl_out("port", "attach", "vm1", "nat")
        assert box.dhcp(g)
        box.ctl_out("port", "move", "vm1", "iso")
        box.ctl_out("network", "stop", "iso")
        time.sleep(1.5)  # lease events are polled from the lease file
    finally:
        monitor.terminate()
        out = monitor.communicate(timeout=10)[0]
    assert f"{MANAGER_IFACE}.PortAttached ('vm1', 'nat')" in out
    assert f"{MANAGER_IFACE}.PortDetached ('vm1', 'nat')" in out
    assert f"{MANAGER_IFACE}.PortAttached ('vm1', 'iso')" in out
    assert f"{MANAGER_IFACE}.LeaseAdded ('nat', '52:54:00:00:00:21'" in out
    assert "NetworkStateChanged ('iso', 'inactive'" in out
    assert "org.freedesktop.DBus.Properties.PropertiesChanged" in out


HOSTILE = ["", "x" * 100_000, "../../etc/passwd", "a\nb", "nat\n", "/", "vm1;rm -rf /",
           "$(id)", "é" * 300, "-" * 16, "kvnat0", "lo", "uplink0", "vm1 ", "nat\x7f"]
SIGS = {"AttachPort": "ssb", "DetachPort": "s", "MovePort": "ss", "StartNetwork": "s",
        "StopNetwork": "s", "UndefineNetwork": "sb", "GetNetwork": "s", "DefineNetwork": "sb"}
TOML = ['[network.x]\nmode = "nat"\nipv4 = "10.60.0.5/24"\n',  # overlaps nat
        '[network.y]\nbridge = "a\\nb"\n', "not toml [[[", '[daemon]\nrun_dir = "/"\n',
        '[network.z]\nmode = "isolated"\nipv4 = "10.63.0.1/24"\n[network.z.dhcp]\n'
        'ranges = ["10.63.0.2-10.63.0.9"]\n[[network.z.dhcp.host]]\nmac = "52:54:00:00:00:01"\n'
        'name = "a\\ndhcp-script=/bin/sh"\n']


def hostile(r: random.Random) -> Message:
    member = r.choice(list(SIGS))
    sig = SIGS[member]
    if r.random() < 0.2:
        sig = r.choice(["", "u", "sss", "bs"])
    body: list[object] = []
    for c in sig:
        if c == "b":
            body.append(r.random() < 0.5)
        elif c == "u":
            body.append(r.randrange(2**32))
        elif member == "DefineNetwork":
            body.append(r.choice(TOML))
        else:
            body.append(r.choice(HOSTILE))
    return Message(destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER_IFACE,
                   member=member, signature=sig, body=body)


async def fuzz(address: str, calls: int) -> dict[str, int]:
    client = await SteadyBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
    r = random.Random(20261125)
    errors: dict[str, int] = {}
    sem = asyncio.Semaphore(50)

    async def one() -> None:
        async with sem:
            reply = await client.call(hostile(r))
            assert reply is not None
            kind = reply.error_name if reply.message_type == MessageType.ERROR else "ok"
            errors[kind or "?"] = errors.get(kind or "?", 0) + 1

    await asyncio.gather(*(one() for _ in range(calls)))
    client.disconnect()
    return errors


def test_hostile_calls_against_the_real_core(box: Sandbox, bus: PrivateBus) -> None:
    box.write_config(CONFIG)
    box.guest("vm1")
    box.start_daemon("--bus-address", bus.address)
    box.ctl_out("port", "attach", "vm1", "nat")
    before = json.loads(box.ctl_out("status", "--json"))
    ruleset, links = box.nft(), sh("ip", "-o", "link", ns=box.host).stdout
    replies = asyncio.run(fuzz(bus.address, 1500))
    print(replies)
    assert "ok" not in replies, f"a hostile call succeeded: {replies}"
    assert not any(k.endswith(".Failed") for k in replies), replies
    assert box.daemon is not None and box.daemon.poll() is None
    after = json.loads(box.ctl_out("status", "--json"))
    assert after["networks"] == before["networks"] and after["ports"] == before["ports"]
    assert box.nft() == ruleset
    assert wait_until(lambda: sh("ip", "-o", "link", ns=box.host).stdout.count("\n")
                      == links.count("\n"))
    assert not (box.networks_dir / "z.toml").exists()


async def fake_firewalld(address: str) -> None:
    """Take firewalld's name, announce a reload, then leave (as a restarting firewalld)."""
    fw = await SteadyBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
    await fw.request_name("org.fedoraproject.FirewallD1")
    await asyncio.sleep(0.2)
    await fw.send(Message.new_signal("/org/fedoraproject/FirewallD1",
                                     "org.fedoraproject.FirewallD1", "Reloaded"))
    await asyncio.sleep(0.2)
    fw.disconnect()


def test_firewalld_reload_and_restart_make_the_daemon_recheck(box: Sandbox) -> None:
    bus = start_bus(str(box.tmp), '<policy user="root">'
                                  '<allow own="org.fedoraproject.FirewallD1"/></policy>')
    try:
        firewalld_scenario(box, bus)
    finally:
        stop_bus(bus)


def firewalld_scenario(box: Sandbox, bus: PrivateBus) -> None:
    box.write_config(CONFIG)
    box.start_daemon("--bus-address", bus.address)
    time.sleep(0.3)  # the watcher subscribes in the background
    asyncio.run(fake_firewalld(bus.address))
    log = box.log
    assert wait_until(lambda: "firewalld.reloaded" in log.read_text())
    assert wait_until(lambda: "state='stopped'" in log.read_text())
    assert "state='started'" in log.read_text()
