"""Unprivileged callers: the bus policy and the daemon's own check, on the bus and the socket."""

from __future__ import annotations

import asyncio
import json

import pytest

from kvmnetd.control.names import BUS_NAME, MANAGER_IFACE, MANAGER_PATH
from kvmnetd.model.records import ROOT
from tests.support.core import Served
from tests.support.dbus import KVMNETCTL, NOBODY, run
from tests.support.fakes import FakeAuthority

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
        assert "kvmnet may" in err or "may not use network" in err, err
    assert served.core.describe() == before


@pytest.mark.parametrize("socket", [False, True], ids=["bus", "socket"])
async def test_allow_list_lets_nobody_attach(served: Served, socket: bool) -> None:
    await served.core.start_network(ROOT, "lab")
    rc, _, err = await as_nobody(served, "port", "attach", "vnet7", "lab", socket=socket)
    assert rc == 0, err
    assert served.ports() == {"vnet7": "lab"}
    rc, _, err = await as_nobody(served, "port", "attach", "vnet0", "lab", socket=socket)
    assert rc == 1 and "not a tap owned by uid 65534" in err, err  # root's tap
    assert (await as_nobody(served, "port", "detach", "vnet7", socket=socket))[0] == 0
    assert served.ports() == {}


@pytest.mark.parametrize("socket", [False, True], ids=["bus", "socket"])
async def test_polkit_is_asked_about_the_caller(served: Served, socket: bool) -> None:
    polkit = FakeAuthority(True)
    served.core.authority = polkit
    rc, _, err = await as_nobody(served, "network", "start", "lab", socket=socket)
    assert rc == 0, err
    assert served.state("lab") == "active"
    ((who, _action),) = polkit.asked
    assert who.uid == NOBODY and who.pid is not None
    assert (who.bus_name is None) if socket else who.bus_name  # polkit's subject on the bus


async def test_the_daemon_not_the_policy_refuses_admin_methods(served: Served) -> None:
    # The bus lets the call through (polkit may allow it); the core says no, typed.
    assert served.bus is not None
    env = {"DBUS_SYSTEM_BUS_ADDRESS": served.bus.address}
    rc, _, err = await run("busctl", "--system", "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE,
                           "StartNetwork", "s", "lab", user=NOBODY, env=env)
    assert rc != 0 and "AccessDenied" not in err, err
    assert "only root and members of group kvmnet may start networks" in err, err
    assert served.state("lab") == "inactive"


async def test_nobody_cannot_own_the_name(served: Served) -> None:
    assert served.bus is not None
    env = {"DBUS_SYSTEM_BUS_ADDRESS": served.bus.address}
    rc, _, err = await run("busctl", "--system", "call", "org.freedesktop.DBus",
                           "/org/freedesktop/DBus", "org.freedesktop.DBus", "RequestName", "su",
                           BUS_NAME, "4", user=NOBODY, env=env)
    assert rc != 0 and ("AccessDenied" in err or "denied" in err.lower()), err


async def test_concurrent_callers_keep_their_identity(served: Served) -> None:
    served.rig.netlink.delay = 0.05  # calls overlap inside the core
    assert served.bus is not None
    jobs = []
    for i in range(8):
        jobs.append(run(KVMNETCTL, "--bus-address", served.bus.address, "port", "attach",
                        f"r{i}", "default"))
        jobs.append(as_nobody(served, "port", "attach", f"n{i}", "default"))
    results = await asyncio.gather(*jobs)
    assert [rc for rc, _, _ in results] == [0, 1] * 8
    assert served.ports() == {f"r{i}": "default" for i in range(8)}
