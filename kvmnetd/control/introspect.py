"""Introspection XML of our interfaces, built from the service classes without a bus."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import cast

from dbus_fast import introspection as intr

from kvmnetd.control.api import CoreAPI
from kvmnetd.control.dbus_objects import BusService, Manager, NetworkObject
from kvmnetd.control.names import MANAGER_PATH
from kvmnetd.model.records import NetworkStatus

_DOCTYPE = ('<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"\n'
            ' "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">\n')


def introspection_xml() -> str:
    # The interfaces are built only to describe themselves; nothing is ever called.
    manager = Manager(cast(BusService, None))
    network = NetworkObject(cast(CoreAPI, None), NetworkStatus(name="", mode="", bridge=""))
    node = intr.Node(MANAGER_PATH, interfaces=[manager.introspect(), network.introspect()])
    root = node.to_xml()
    ET.indent(root, space="  ")
    return _DOCTYPE + ET.tostring(root, encoding="unicode") + "\n"


if __name__ == "__main__":
    print(introspection_xml(), end="")
