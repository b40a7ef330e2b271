"""Every kvmnetctl verb end to end over a private system bus, then busctl and gdbus."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from kvmnetd import __version__, logsetup
from kvmnetd.control.names import BUS_NAME, MANAGER_IFACE, MANAGER_PATH, network_path
from kvmnetd.model.records import ROOT
from tests.support.core import SERVED_CONFIG, Served
from tests.support.dbus import KVMNETCTL, run
from tests.support.toml import network_toml

pytestmark = pytest.mark.integration


async def ctl(s: Served, *argv: str, user: int | None = None) -> tuple[int, str, str]:
    assert s.bus is not None
    return await run(KVMNETCTL, "--bus-address", s.bus.address, *argv, user=user)


async def ok_json(s: Served, *argv: str) -> object:
    rc, out, err = await ctl(s, *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


async def test_every_verb(served: Served, tmp_path: Path) -> None:
    s = served
    assert await ok_json(s, "network", "list") == [
        {"name": "default", "mode": "nat", "bridge": "virbr-kt", "state": "active"},
        {"name": "lab", "mode": "isolated", "bridge": "br-lab", "state": "inactive"},
    ]
    show = await ok_json(s, "network", "show", "default")
    assert show == {"name": "default", "mode": "nat", "bridge": "virbr-kt",
                    "addresses": ["192.0.2.1/24"], "state": "active", "reason": "",
                    "ports": [], "dhcp_state": "running", "autostart": True,
                    "isolate_ports": False, "anti_spoofing": False,
                    "port_rate": "none"}
    assert await ok_json(s, "leases", "default") == [
        {"mac": "52:54:00:00:00:01", "ip": "192.0.2.10", "hostname": "guest1",
         "client_id": "", "expires": 1700000000}]
    assert (await ctl(s, "version"))[1].strip() == __version__

    toml = tmp_path / "net.toml"
    toml.write_text(network_toml("extra", "routed", "br-extra", "10.9.0.1/24",
                                 autostart=False))
    rc, out, err = await ctl(s, "network", "define", str(toml), "--runtime")
    assert (rc, out.strip()) == (0, "extra: defined (runtime)"), err
    assert list(s.rig.networks_dir.iterdir()) == []
    assert (await ctl(s, "network", "start", "extra"))[0] == 0
    assert s.state("extra") == "active"

    assert (await ctl(s, "port", "attach", "vnet0", "default"))[0] == 0
    assert (await ctl(s, "port", "move", "vnet0", "extra"))[0] == 0
    assert await ok_json(s, "port", "list") == [
        {"ifname": "vnet0", "network": "extra", "state": "attached", "rate": "none",
         "domain": ""}]
    rc, out, err = await ctl(s, "port", "limit", "vnet0", "20mbit")
    assert (rc, out.strip()) == (0, "vnet0: limit 20mbit each way"), err
    assert [p["rate"] for p in await ok_json(s, "port", "list")] == ["20mbit"]
    assert (await ctl(s, "port", "detach", "vnet0"))[0] == 0
    assert (await ctl(s, "network", "stop", "extra"))[0] == 0
    assert s.state("extra") == "inactive"
    # Undefined with a port on it: the port goes with it.
    assert (await ctl(s, "network", "start", "extra"))[0] == 0
    assert (await ctl(s, "port", "attach", "vnet1", "extra"))[0] == 0
    assert (await ctl(s, "network", "undefine", "extra"))[0] == 0
    assert "extra" not in s.core.networks() and s.ports() == {}
    assert (await ctl(s, "reload"))[0] == 0

    status = await ok_json(s, "status")
    assert isinstance(status, dict) and status["version"] == __version__
    assert [n["name"] for n in status["networks"]] == ["default", "lab"]


async def test_errors_and_usage(served: Served) -> None:
    rc, out, err = await ctl(served, "network", "show", "nope")
    assert rc == 1 and "nope" in err and out == ""
    rc, _, err = await ctl(served, "port", "detach", "vnet9")
    assert rc == 1 and "vnet9 is not attached" in err
    rc, _, err = await ctl(served, "leases", "nope")
    assert rc == 1 and "nope" in err
    assert (await ctl(served, "network", "frobnicate"))[0] == 2
    assert (await ctl(served, "port", "attach", "only-one-arg"))[0] == 2


async def test_busctl_and_gdbus(served: Served) -> None:
    assert served.bus is not None
    env = {"DBUS_SYSTEM_BUS_ADDRESS": served.bus.address}
    busctl = ["busctl", "--system", "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE]
    rc, out, err = await run(*busctl, "ListNetworks", env=env)
    assert rc == 0, err
    assert out.startswith('a(ssss) 2 "default" "nat" "virbr-kt" "active"')
    assert (await run(*busctl, "AttachPort", "ssb", "tap1", "default", "false", env=env))[0] == 0
    rc, out, _ = await run(*busctl, "ListPorts", env=env)
    assert out.strip() == 'a(sss) 1 "tap1" "default" "attached"'
    rc, _, err = await run(*busctl, "StartNetwork", "s", "nope", env=env)
    assert rc != 0 and "nope" in err
    rc, out, _ = await run("busctl", "--system", "get-property", BUS_NAME,
                           network_path("default"), f"{BUS_NAME}.Network", "Ports", env=env)
    assert out.strip() == 'as 1 "tap1"'

    gdbus = ["gdbus", "call", "--system", "--dest", BUS_NAME, "--object-path", MANAGER_PATH,
             "--method"]
    rc, out, err = await run(*gdbus, f"{MANAGER_IFACE}.DetachPort", "tap1", env=env)
    assert rc == 0, err
    assert served.ports() == {}
    rc, out, _ = await run(*gdbus, f"{MANAGER_IFACE}.GetNetwork", "lab", env=env)
    assert out.strip() == f"(objectpath '{network_path('lab')}',)"
    rc, _, err = await run(*gdbus, f"{MANAGER_IFACE}.GetNetwork", "nope", env=env)
    assert rc != 0 and f"{BUS_NAME}.Error.NoSuchNetwork" in err
    rc, out, _ = await run("gdbus", "call", "--system", "--dest", BUS_NAME, "--object-path",
                           network_path("default"), "--method", f"{BUS_NAME}.Network.Leases",
                           env=env)
    assert "'52:54:00:00:00:01', '192.0.2.10', 'guest1', '', uint64 1700000000" in out


async def test_object_manager_signals(served: Served) -> None:
    assert served.bus is not None
    client = await MessageBus(bus_address=served.bus.address, bus_type=BusType.SYSTEM).connect()
    seen: list[Message] = []

    def on(msg: Message) -> None:
        if msg.message_type is MessageType.SIGNAL and msg.sender != "org.freedesktop.DBus":
            seen.append(msg)

    client.add_message_handler(on)
    await client.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                              interface="org.freedesktop.DBus", member="AddMatch",
                              signature="s", body=["type='signal',sender='" + BUS_NAME + "'"]))
    async def saw(member: str, path: str = MANAGER_PATH) -> bool:
        # Each step waits for its signal: a network gone before the service looked
        # at it was never exported, and would send no InterfacesAdded.
        for _ in range(100):
            if (member, path) in {(m.member, m.path) for m in seen}:
                return True
            await asyncio.sleep(0.05)
        return False

    try:
        await served.core.define_network(
            ROOT, network_toml("new", "nat", "br-new", "10.9.0.1/24"), False)
        assert await saw("InterfacesAdded")
        await served.core.attach_port(ROOT, "vnet5", "new")
        assert await saw("PortAttached")
        assert await saw("PropertiesChanged", network_path("new"))
        await served.core.stop_network(ROOT, "new")
        assert await saw("NetworkStateChanged")
        # Through the bus: the core sends no event when a network goes (see UndefineNetwork).
        reply = await client.call(Message(
            destination=BUS_NAME, path=MANAGER_PATH, interface=MANAGER_IFACE,
            member="UndefineNetwork", signature="sb", body=["new", False]))
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body
        assert await saw("InterfacesRemoved")
        added = next(m for m in seen if m.member == "InterfacesAdded")
        assert added.body[0] == network_path("new")
        assert added.body[1][f"{BUS_NAME}.Network"]["Mode"].value == "nat"
        changed = [m.body[1] for m in seen if m.member == "PropertiesChanged"]
        assert any("Ports" in c and c["Ports"].value == ["vnet5"] for c in changed)
    finally:
        client.disconnect()


@pytest.mark.parametrize("socket", [False, True], ids=["bus", "socket"])
async def test_reload_errors_and_log_level_reach_the_caller(served: Served, socket: bool) -> None:
    assert served.bus is not None
    where = ["--socket", served.socket_path] if socket else ["--bus-address", served.bus.address]
    main = served.rig.config_file
    served.rig.write_config(SERVED_CONFIG + network_toml("a", "nat", "br-a", "10.7.0.300/24"))
    other = served.rig.networks_dir / "b.toml"
    other.write_text(network_toml("b", "isolated", "br-b", "10.8.0.1/24", brige="x"))
    rc, out, err = await run(KVMNETCTL, *where, "reload")
    assert rc == 1 and out == ""
    a_line = main.read_text().splitlines().index('ipv4 = "10.7.0.300/24"') + 1
    b_line = other.read_text().splitlines().index('brige = "x"') + 1
    lines = err.splitlines()
    assert any(ln.startswith(f"{main}:{a_line}: network.a.ipv4: ") for ln in lines), err
    assert any(ln.startswith(f"{other}:{b_line}: network.b.brige: unknown key")
               for ln in lines), err
    served.rig.write_config(SERVED_CONFIG)
    other.unlink()
    assert (await run(KVMNETCTL, *where, "reload"))[0] == 0

    assert (await run(KVMNETCTL, *where, "log-level", "debug"))[0] == 0
    assert logsetup._threshold[0] == logsetup._NUMERIC["debug"]
    rc, _, err = await run(KVMNETCTL, *where, "log-level", "loud")
    assert rc == 2 and "invalid choice" in err


async def test_config_errors_are_a_typed_bus_error(served: Served) -> None:
    assert served.bus is not None
    env = {"DBUS_SYSTEM_BUS_ADDRESS": served.bus.address}
    bad = served.rig.networks_dir / "x.toml"
    bad.write_text('[network.x]\nmode = "isolated"\nipv4 = "10.8.0.1/24"\ny = 1\n')
    rc, _, err = await run("busctl", "--system", "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE,
                           "Reload", env=env)
    assert rc != 0 and f"{bad}:4: network.x.y: unknown key" in err, err
    rc, _, err = await run("gdbus", "call", "--system", "--dest", BUS_NAME, "--object-path",
                           MANAGER_PATH, "--method", f"{MANAGER_IFACE}.Reload", env=env)
    assert rc != 0 and f"{BUS_NAME}.Error.ConfigInvalid" in err, err
    rc, _, err = await run("busctl", "--system", "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE,
                           "SetLogLevel", "s", "loud", env=env)
    assert rc != 0 and "loud" in err


@pytest.mark.parametrize("socket", [False, True], ids=["bus", "socket"])
async def test_changes_say_what_changed(served: Served, tmp_path: Path, socket: bool) -> None:
    assert served.bus is not None
    where = ["--socket", served.socket_path] if socket else ["--bus-address", served.bus.address]

    async def line(*argv: str) -> str:
        rc, out, err = await run(KVMNETCTL, *where, *argv)
        assert rc == 0, (argv, err)
        return out

    async def obj(*argv: str) -> object:
        return json.loads(await line(*argv, "--json"))

    toml = tmp_path / "lab2.toml"
    toml.write_text(network_toml("lab2", "isolated", "br-lab2", "10.9.0.1/24"))
    assert await line("network", "define", str(toml)) == "lab2: defined (persistent)\n"
    assert await line("network", "start", "lab") == "lab: started\n"
    assert await line("port", "attach", "vnet0", "default") == \
        "vnet0: attached to default (virbr-kt)\n"
    assert await line("port", "move", "vnet0", "lab") == \
        "vnet0: moved from default to lab (br-lab)\n"
    assert await line("port", "detach", "vnet0") == "vnet0: detached from lab\n"
    assert await line("network", "stop", "lab") == "lab: stopped\n"
    assert await line("network", "undefine", "lab2") == "lab2: undefined (persistent)\n"

    assert await obj("network", "start", "lab") == {"network": "lab", "action": "started"}
    assert await obj("port", "attach", "vnet1", "default") == {
        "ifname": "vnet1", "network": "default", "bridge": "virbr-kt", "action": "attached"}
    assert await obj("port", "move", "vnet1", "lab") == {
        "ifname": "vnet1", "from": "default", "network": "lab", "bridge": "br-lab",
        "action": "moved"}
    assert await obj("port", "detach", "vnet1") == {
        "ifname": "vnet1", "network": "lab", "action": "detached"}
    assert await obj("network", "stop", "lab") == {"network": "lab", "action": "stopped"}
    toml.write_text(network_toml("lab3", "isolated", "br-lab3", "10.9.0.1/24"))
    assert await obj("network", "define", str(toml), "--runtime") == {
        "network": "lab3", "action": "defined", "persistent": False}
    assert await obj("network", "undefine", "lab3", "--runtime") == {
        "network": "lab3", "action": "undefined", "persistent": False}

    # --quiet, global or per verb: nothing on success.
    assert await line("network", "start", "lab", "-q") == ""
    assert await line("--quiet", "port", "attach", "vnet2", "default") == ""
    assert await line("port", "move", "vnet2", "lab", "--quiet") == ""
    assert await line("-q", "port", "detach", "vnet2") == ""


async def test_port_stats_over_the_bus(served: Served) -> None:
    assert served.bus is not None
    env = {"DBUS_SYSTEM_BUS_ADDRESS": served.bus.address}
    served.core.read_counters = lambda ifname: (1, 2, 3, 4, 5)
    busctl = ["busctl", "--system", "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE]
    assert (await run(*busctl, "AttachPort", "ssb", "tap1", "default", "false", env=env))[0] == 0
    rc, out, err = await run(*busctl, "PortStats", "s", "", env=env)
    assert rc == 0, err
    assert out.strip() == 'a(sstttttt) 1 "tap1" "default" 1 2 3 4 5 0'
    rc, _, err = await run(*busctl, "PortStats", "s", "vnet9", env=env)
    assert rc != 0 and "vnet9 is not a port of any network" in err
    assert await ok_json(served, "port", "stats", "tap1") == [
        {"ifname": "tap1", "network": "default", "rx_bytes": 1, "tx_bytes": 2, "rx_packets": 3,
         "tx_packets": 4, "drops": 5, "spoof_drops": 0}]
