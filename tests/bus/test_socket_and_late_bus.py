"""No bus at all: the control socket serves every verb. A bus that appears later is joined."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvmnetd import __version__
from kvmnetd.control.server import ControlServer, serve
from tests.support.core import Served, served_core
from tests.support.dbus import KVMNETCTL, NOBODY, run, start_bus, stop_bus
from tests.support.toml import network_toml

pytestmark = pytest.mark.integration


@pytest.fixture
async def busless(scratch: str) -> AsyncIterator[ControlServer]:
    rig = await served_core(Path(scratch) / "core")
    server = await serve(rig.core, f"unix:path={scratch}/no-bus-here",
                         f"{scratch}/control.sock", retry_interval=0.1)
    try:
        yield server
    finally:
        await server.close()


async def sock(server: ControlServer, *argv: str, user: int | None = None) -> tuple[int, str, str]:
    # No --socket: the default order must find the socket by itself (env).
    return await run(KVMNETCTL, *argv, user=user,
                     env={"KVMNETD_SOCKET": server.socket.path,
                          "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent"})


async def test_verbs_over_the_socket(busless: ControlServer, tmp_path: Path) -> None:
    assert not busless.bus_connected
    assert stat.S_IMODE(os.stat(busless.socket.path).st_mode) == 0o666
    rc, out, err = await sock(busless, "network", "list", "--json")
    assert rc == 0, err
    assert [n["name"] for n in json.loads(out)] == ["default", "lab"]
    assert json.loads((await sock(busless, "network", "show", "lab", "--json"))[1])["mode"] \
        == "isolated"
    toml = tmp_path / "n.toml"
    toml.write_text(network_toml("sock", "isolated", "br-sock", "10.9.0.1/24", autostart=False))
    assert (await sock(busless, "network", "define", str(toml)))[1].strip() \
        == "sock: defined (persistent)"
    for argv in (["network", "start", "sock"], ["port", "attach", "vnet3", "sock"],
                 ["port", "move", "vnet3", "default"], ["reload"]):
        rc, _, err = await sock(busless, *argv)
        assert rc == 0, (argv, err)
    ports = json.loads((await sock(busless, "port", "list", "--json"))[1])
    assert ports == [{"ifname": "vnet3", "network": "default", "state": "attached", "rate": "none",
                      "domain": ""}]
    assert (await sock(busless, "port", "detach", "vnet3"))[0] == 0
    assert (await sock(busless, "network", "stop", "sock"))[0] == 0
    assert (await sock(busless, "network", "undefine", "sock"))[0] == 0
    assert (await sock(busless, "version"))[1].strip() == __version__
    assert json.loads((await sock(busless, "leases", "default", "--json"))[1])[0]["ip"] \
        == "192.0.2.10"
    assert json.loads((await sock(busless, "status", "--json"))[1])["version"] == __version__
    rc, _, err = await sock(busless, "network", "start", "nope")
    assert rc == 1 and "nope" in err


async def test_socket_refuses_nobody(busless: ControlServer) -> None:
    core = busless.core
    before = core.describe()
    rc, _, err = await sock(busless, "network", "start", "lab", user=NOBODY)
    assert rc == 1 and "only root and members of group kvmnet may" in err
    rc, _, err = await sock(busless, "port", "attach", "vnet7", "default", user=NOBODY)
    assert rc == 1 and "may not use network default" in err
    assert core.describe() == before
    assert (await sock(busless, "network", "list", user=NOBODY))[0] == 0


async def test_socket_protocol_edges(busless: ControlServer) -> None:
    reader, writer = await asyncio.open_unix_connection(busless.socket.path)
    try:
        for line, error in ((b"not json\n", "InvalidArgs"),
                            (b'{"method": "Nope"}\n', "UnknownMethod"),
                            (b'{"method": "AttachPort", "args": ["a", "b", 1]}\n', "InvalidArgs"),
                            (b'{"method": "StartNetwork", "args": ["a\\u0000"]}\n', "InvalidArgs"),
                            (b'[1, 2]\n', "UnknownMethod")):
            writer.write(line)
            reply = json.loads(await reader.readline())
            assert not reply["ok"] and reply["error"].endswith(error), (line, reply)
        writer.write(b'{"id": 7, "method": "ListPorts", "args": []}\n')
        assert json.loads(await reader.readline()) == {"id": 7, "ok": True, "result": []}
    finally:
        writer.close()


async def test_no_daemon_at_all(scratch: str) -> None:
    rc, _, err = await run(KVMNETCTL, "network", "list",
                           env={"KVMNETD_SOCKET": f"{scratch}/none.sock"})
    assert rc == 1 and "not reachable" in err
    rc, _, err = await run(KVMNETCTL, "--bus-address", f"unix:path={scratch}/none", "version")
    assert rc == 1 and "not reachable" in err


async def test_bus_started_later_is_joined(scratch: str) -> None:
    bus_dir = os.path.join(scratch, "late")
    os.mkdir(bus_dir)
    os.chmod(bus_dir, 0o755)
    rig = await served_core(Path(scratch) / "core")
    server = await serve(rig.core, f"unix:path={bus_dir}/bus", f"{scratch}/c.sock",
                         retry_interval=0.2)
    bus = None
    try:
        await asyncio.sleep(0.5)
        assert not server.bus_connected and server.bus_error
        bus = start_bus(bus_dir)
        assert await server.wait_for_bus(5), server.bus_error
        rc, out, err = await run(KVMNETCTL, "--bus-address", bus.address, "version")
        assert (rc, out.strip()) == (0, __version__), err
        # The bus goes away and comes back: the name is taken again, no restart.
        stop_bus(bus)
        for _ in range(50):
            if not server.bus_connected:
                break
            await asyncio.sleep(0.1)
        assert not server.bus_connected
        bus = start_bus(bus_dir)
        assert await server.wait_for_bus(5), server.bus_error
    finally:
        await server.close()
        if bus is not None:
            stop_bus(bus)




async def test_name_owned_elsewhere_is_reported(served: Served, scratch: str) -> None:
    assert served.bus is not None
    rig = await served_core(Path(scratch) / "second")
    second = await serve(rig.core, served.bus.address, f"{scratch}/second.sock",
                         retry_interval=0.1)
    try:
        for _ in range(50):
            if second.bus_error and "owned by" in second.bus_error:
                break
            await asyncio.sleep(0.05)
        assert second.bus_error and f"pid {os.getpid()}" in second.bus_error
        assert not second.bus_connected and served.server.bus_connected
    finally:
        await second.close()
