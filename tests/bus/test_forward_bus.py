"""kvmnetctl forward over a private system bus and the socket: typed errors, access."""

from __future__ import annotations

import json

import pytest
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from kvmnetd.control.names import BUS_NAME, MANAGER_IFACE, MANAGER_PATH, error_name
from kvmnetd.model.records import ROOT
from tests.support.core import Served
from tests.support.dbus import KVMNETCTL, NOBODY, run
from tests.support.fakes import FakeAuthority

pytestmark = pytest.mark.integration


async def ctl(s: Served, *argv: str, socket: bool = False,
              user: int | None = None) -> tuple[int, str, str]:
    assert s.bus is not None
    where = ["--socket", s.socket_path] if socket else ["--bus-address", s.bus.address]
    return await run(KVMNETCTL, *where, *argv, user=user)


@pytest.mark.parametrize("socket", [False, True], ids=["bus", "socket"])
async def test_add_list_remove(served: Served, socket: bool) -> None:
    rc, out, err = await ctl(served, "forward", "add", "default", "tcp", "8080",
                             "192.0.2.50:80", socket=socket)
    assert (rc, out.strip()) == (0, "default: tcp 8080 -> 192.0.2.50:80 (runtime)"), err
    rc, out, err = await ctl(served, "forward", "list", "--json", socket=socket)
    assert json.loads(out) == [{"network": "default", "proto": "tcp", "port": "8080",
                                "to": "192.0.2.50", "to_port": 80, "runtime": True}], err
    rc, out, err = await ctl(served, "forward", "list", socket=socket)
    assert [line.split() for line in out.splitlines()] == [
        ["NETWORK", "PROTO", "PORT", "TO", "TO_PORT", "FROM"],
        ["default", "tcp", "8080", "192.0.2.50", "80", "runtime"]]
    rc, _, err = await ctl(served, "forward", "add", "default", "udp", "53", "192.0.2.50",
                           socket=socket)
    assert rc == 1 and "kvmnetd's DNS (dnsmasq)" in err, err
    rc, _, err = await ctl(served, "forward", "list", "nope", socket=socket)
    assert rc == 1 and "no network named 'nope'" in err, err
    assert (await ctl(served, "forward", "remove", "default", "tcp", "8080",
                      socket=socket))[0] == 0
    assert served.core.list_forwards() == []


async def test_bad_input_gets_a_typed_dbus_error(served: Served) -> None:
    assert served.bus is not None
    bus = await MessageBus(bus_address=served.bus.address, bus_type=BusType.SYSTEM).connect()
    try:
        for args, error in ((["default", "sctp", "80", "192.0.2.50", False], "InvalidArgument"),
                            (["nope", "tcp", "80", "192.0.2.50", False], "NoSuchNetwork"),
                            (["default", "tcp", "80", "10.0.0.9", False], "InvalidArgument")):
            reply = await bus.call(Message(destination=BUS_NAME, path=MANAGER_PATH,
                                           interface=MANAGER_IFACE, member="AddForward",
                                           signature="ssssb", body=args))
            assert reply.message_type is MessageType.ERROR
            assert reply.error_name == error_name(error), (args, reply.body)
        await served.core.add_forward(ROOT, "default", "tcp", "80", "192.0.2.50",
                                      False)
        reply = await bus.call(Message(destination=BUS_NAME, path=MANAGER_PATH,
                                       interface=MANAGER_IFACE, member="AddForward",
                                       signature="ssssb",
                                       body=["default", "tcp", "79-81", "192.0.2.51", False]))
        assert reply.error_name == error_name("Conflict"), reply.body
    finally:
        bus.disconnect()


@pytest.mark.parametrize("socket", [False, True], ids=["bus", "socket"])
async def test_nobody_lists_but_changes_only_with_polkit(served: Served, socket: bool) -> None:
    rc, _, err = await ctl(served, "forward", "list", socket=socket, user=NOBODY)
    assert rc == 0, err
    for argv in (["add", "default", "tcp", "8080", "192.0.2.50"],
                 ["remove", "default", "tcp", "8080"]):
        rc, _, err = await ctl(served, "forward", *argv, socket=socket, user=NOBODY)
        assert rc == 1 and "kvmnet may" in err, err
    served.core.authority = FakeAuthority(True)
    rc, _, err = await ctl(served, "forward", "add", "default", "tcp", "8080", "192.0.2.50",
                           socket=socket, user=NOBODY)
    assert rc == 0, err
    assert [r.port for r in served.core.list_forwards()] == ["8080"]
