"""The D-Bus Manager, the control socket and kvmnetctl all come from one method table."""

from __future__ import annotations

import re
from pathlib import Path
from typing import cast

from kvmnetd.cli import _bus_message
from kvmnetd.control.api import CoreAPI
from kvmnetd.control.dbus_objects import BusService, Manager, NetworkObject
from kvmnetd.control.methods import BY_NAME, METHODS
from kvmnetd.control.socket_server import _args_ok
from kvmnetd.model.records import NetworkStatus


def test_manager_methods_are_the_table_rows_on_the_bus() -> None:
    manager = Manager(cast(BusService, None)).introspect()
    exported = {m.name: m for m in manager.methods}
    assert set(exported) == {m.name for m in METHODS if m.on_bus}
    for name, dbus in exported.items():
        row = BY_NAME[name]
        assert [(a.name, a.signature) for a in dbus.in_args] == list(row.args)
        assert "".join(a.signature for a in dbus.out_args) == row.returns


def test_socket_and_client_use_the_same_argument_types() -> None:
    samples = {"s": "x", "b": True}
    for m in METHODS:
        args = [samples[code] for _, code in m.args]
        assert _args_ok(m.arg_types, args)
        if m.args:
            assert not _args_ok(m.arg_types, args[:-1])
        if m.on_bus:
            assert _bus_message(m.name, args)[2:] == (m.name, m.signature, args)


def test_the_network_objects_leases_reply_as_the_socket_does() -> None:
    network = NetworkObject(cast(CoreAPI, None), NetworkStatus(name="", mode="", bridge=""))
    (leases,) = [m for m in network.introspect().methods if m.name == "Leases"]
    assert "".join(a.signature for a in leases.out_args) == BY_NAME["Leases"].returns


def test_docs_list_every_method_with_its_access() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "control.md").read_text()
    socket_rows = re.findall(r"^\| ([A-Z]\w+)(?: / ([A-Z]\w+))? \|", doc, re.MULTILINE)
    assert {name for row in socket_rows for name in row if name} >= {m.name for m in METHODS}
    # "Who may do what": one row each for read, port and admin methods, in that order.
    section = doc[doc.index("## Who may do what"):]
    rows = re.findall(r"^\| (`[A-Z].*?) \| ", section, re.MULTILINE)[:3]
    listed = [set(re.findall(r"`(\w+)`", row)) for row in rows]
    want = [{m.name for m in METHODS if m.on_bus and m.access == access}
            for access in ("read", "port", "admin")]
    want[0].add("Leases")  # the network object's method
    assert listed == want
