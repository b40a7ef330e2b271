"""Hostile calls: each gets an error reply, the service stays up, the core is unchanged."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from dbus_fast import BusType, Message, MessageType

from kvmnetd.control.dbus_objects import SteadyBus
from kvmnetd.control.names import BUS_NAME, MANAGER_IFACE, MANAGER_PATH, NETWORK_IFACE, network_path
from tests.support.core import Served

pytestmark = pytest.mark.integration

CALLS = 2000
IN_FLIGHT = 250

# member -> correct signature; wrong ones are derived from these.
MEMBERS = {
    "AttachPort": "ssb", "DetachPort": "s", "MovePort": "ss", "StartNetwork": "s",
    "StopNetwork": "s", "UndefineNetwork": "sb", "GetNetwork": "s",
}
HOSTILE = ["", "x" * 200_000, "../../etc/passwd", "a\nb", "default\n", "/", "vnet0;rm -rf /",
           "é" * 300, "\u202e", "default ", "-" * 16, "lab\t", "$(id)"]
GEN = {"s": lambda r: r.choice(HOSTILE), "b": lambda r: r.random() < 0.5,
       "u": lambda r: r.randrange(2**32), "x": lambda r: -(2**63)}
NO_NETWORK = ["nope", "x" * 1000, "lab/../default", "default\n", "LAB"]


def hostile_message(r: random.Random, serial: int) -> Message:
    kind = serial % 4
    member = r.choice([*MEMBERS, "Nope", "attachport", "Introspect2"])
    if kind == 0:  # right member, wrong signature
        sig = r.choice(["", "s", "ss", "sss", "sbs", "u", "bs", "ssbb", "x", "sx"])
        if sig == MEMBERS.get(member):
            sig += "u"
    elif kind == 1:  # unknown methods
        sig, member = "s", r.choice(["Nope", "Destroy", "__init__", "_before_dispatch"])
    else:  # right signature, hostile values; nothing named may exist
        sig = MEMBERS.get(member, "s")
    body = [GEN[c](r) for c in sig]
    if member in ("AttachPort", "MovePort") and sig == MEMBERS[member]:
        body[1] = r.choice(NO_NETWORK)
    iface = r.choice([MANAGER_IFACE, MANAGER_IFACE, NETWORK_IFACE, "org.example.Nope", None])
    path = r.choice([MANAGER_PATH, MANAGER_PATH, network_path("default"), "/", "/nope"])
    return Message(destination=BUS_NAME, path=path, interface=iface, member=member,
                   signature=sig, body=body)


async def test_fuzz(served: Served) -> None:
    assert served.bus is not None
    before = json.dumps(served.core.describe(), sort_keys=True)
    client = await SteadyBus(bus_address=served.bus.address, bus_type=BusType.SYSTEM).connect()
    r = random.Random(1234)
    sem = asyncio.Semaphore(IN_FLIGHT)
    errors: dict[str, int] = {}

    async def one(i: int) -> None:
        msg = hostile_message(r, i)
        async with sem:
            reply = await asyncio.wait_for(client.call(msg), 30)
        assert reply.message_type is MessageType.ERROR, (msg.member, msg.signature, reply.body)
        errors[reply.error_name or ""] = errors.get(reply.error_name or "", 0) + 1

    try:
        await asyncio.gather(*(one(i) for i in range(CALLS)))
        ping = await client.call(Message(destination=BUS_NAME, path=MANAGER_PATH,
                                         interface=MANAGER_IFACE, member="ListNetworks"))
        assert ping.message_type is MessageType.METHOD_RETURN
    finally:
        client.disconnect()
    assert json.dumps(served.core.describe(), sort_keys=True) == before
    assert served.server.bus_connected
    assert sum(errors.values()) == CALLS
    assert "org.freedesktop.DBus.Error.UnknownMethod" in errors
    assert f"{BUS_NAME}.Error.NoSuchNetwork" in errors
    assert not any(e.endswith(".Error.Failed") for e in errors), errors
