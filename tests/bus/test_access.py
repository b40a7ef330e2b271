"""Unprivileged callers: the bus policy and the daemon's own check, on the bus and the socket."""

from __future__ import annotations

import asyncio
import json

import pytest

from kvmnetd.bus.names import BUS_NAME, MANAGER_IFACE, MANAGER_PATH
from tests.support.dbus import KVMNETCTL, NOBODY, run

from .conftest import Served

pytestmark = pytest.mark.integration


async def as_nobody(s: Served, *argv: str, socket: bool = False) -> tuple[int, str, str]:
    assert s.bus is not None
    where = ["--socket", s.socket_path] if socket else ["--bus-address", s.bus.address]
    return await run(KVMNETCTL, *where, *argv, user=NOBODY)


@pytest.mark.parametrize("socket", [False, True], ids=["bus", "socket"])
async def test_nobody_reads_but_may_not_change(served: Served, socket: bool) -> None:
    rc, out, err = await as_nobody(served, "network", "list", "--json", socket=socket)
    assert rc == 0, err
    assert [n["name"] for n in json.loads(out)] == ["default", "lab"]
    assert (await as_nobody(served, "leases", "default", socket=socket))[0] == 0
    assert (await as_nobody(served, "status", socket=socket))[0] == 0
    before = served.core.describe()
    for argv in (["network", "start", "lab"], ["network", "stop", "default"],
                 ["network", "undefine", "lab"], ["reload"], ["log-level", "debug"],
                 ["port", "attach", "vnet1", "default"]):
        rc, _, err = await as_nobody(served, *argv, socket=socket)
        assert rc == 1, argv
        assert "denied" in err.lower() or "may not" in err or "needs root" in err, err
    assert served.core.describe() == before


@pytest.mark.parametrize("socket", [False, True], ids=["bus", "socket"])
async def test_allow_list_lets_nobody_attach(served: Served, socket: bool) -> None:
    rc, _, err = await as_nobody(served, "port", "attach", "vnet7", "lab", socket=socket)
    assert rc == 0, err
    assert served.core.ports["vnet7"].network == "lab"
    who = [c for what, c in served.core.calls if what == "attach ports"][-1]
    assert who.uid == NOBODY and who.pid is not None
    assert (await as_nobody(served, "port", "detach", "vnet7", socket=socket))[0] == 0


async def test_the_daemon_not_the_policy_refuses_admin_methods(served: Served) -> None:
    # The bus lets the call through (polkit may allow it); the core says no, typed.
    assert served.bus is not None
    env = {"DBUS_SYSTEM_BUS_ADDRESS": served.bus.address}
    rc, _, err = await run("busctl", "--system", "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE,
                           "StartNetwork", "s", "lab", user=NOBODY, env=env)
    assert rc != 0 and "AccessDenied" not in err, err
    assert "PermissionDenied" in err or "may not" in err or "denied" in err.lower(), err
    assert served.core.networks["lab"].state == "inactive"


async def test_nobody_cannot_own_the_name(served: Served) -> None:
    assert served.bus is not None
    env = {"DBUS_SYSTEM_BUS_ADDRESS": served.bus.address}
    rc, _, err = await run("busctl", "--system", "call", "org.freedesktop.DBus",
                           "/org/freedesktop/DBus", "org.freedesktop.DBus", "RequestName", "su",
                           BUS_NAME, "4", user=NOBODY, env=env)
    assert rc != 0 and ("AccessDenied" in err or "denied" in err.lower()), err


async def test_concurrent_callers_keep_their_identity(served: Served) -> None:
    served.core.delay = 0.05  # calls overlap inside the core
    assert served.bus is not None
    jobs = []
    for i in range(8):
        jobs.append(run(KVMNETCTL, "--bus-address", served.bus.address, "port", "attach",
                        f"r{i}", "default"))
        jobs.append(as_nobody(served, "port", "attach", f"n{i}", "default"))
    results = await asyncio.gather(*jobs)
    assert [rc for rc, _, _ in results] == [0, 1] * 8
    assert sorted(served.core.ports) == sorted(f"r{i}" for i in range(8))
