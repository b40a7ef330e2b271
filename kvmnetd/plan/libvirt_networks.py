"""Which libvirt networks should exist for kvmnetd's networks, and what to do about it. Pure.

Each active kvmnetd network is mirrored in libvirt as a `<forward mode='bridge'/>` network of
the same name on the same bridge, so virt-manager, virsh and `<interface type='network'>` can
pick it. Ours carry `<kvmnet:network>` metadata; a libvirt network without it belongs to
someone else and is never changed, only reported when its name clashes with one of ours.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from kvmnetd.model.domxml import KVMNET_XMLNS, parse_root


@dataclass(frozen=True)
class SeenNetwork:
    """A libvirt network as listed: persistent or transient, running or not."""

    name: str
    ours: bool          # carries kvmnetd's metadata
    bridge: str | None
    active: bool
    persistent: bool
    autostart: bool
    uuid: str = ""


@dataclass(frozen=True)
class NetAction:
    """kind: define (xml) | start | autostart | destroy | undefine."""

    kind: str
    name: str
    xml: str = ""


def network_xml(name: str, bridge: str, uuid: str = "") -> str:
    """The libvirt definition of kvmnetd network `name`; `uuid` to redefine an existing one
    (libvirt refuses a second definition of a name under another UUID)."""
    uuid_el = f"  <uuid>{escape(uuid)}</uuid>\n" if uuid else ""
    return (f"<network>\n  <name>{escape(name)}</name>\n{uuid_el}"
            f"  <metadata>\n    <kvmnet:network xmlns:kvmnet={quoteattr(KVMNET_XMLNS)}>"
            f"{escape(name)}</kvmnet:network>\n  </metadata>\n"
            f"  <forward mode='bridge'/>\n  <bridge name={quoteattr(bridge)}/>\n</network>\n")


def parse_seen(xml: str, active: bool, persistent: bool, autostart: bool) -> SeenNetwork:
    """A listed network's XML; ValueError if it is not one."""
    root = parse_root(xml, "network")
    name = (root.findtext("name") or "").strip()
    br = root.find("bridge")
    ours = root.find(f"metadata/{{{KVMNET_XMLNS}}}network") is not None
    return SeenNetwork(name, ours, br.get("name") if br is not None else None,
                       active, persistent, autostart, (root.findtext("uuid") or "").strip())


def plan_networks(desired: Mapping[str, str], seen: Mapping[str, SeenNetwork]
                  ) -> tuple[list[NetAction], list[str]]:
    """(actions, clashes): `desired` maps kvmnetd network name to bridge; `seen` is libvirt's.

    Ours that are wrong are redefined (libvirt cannot change a running network's bridge, so
    destroy first); ours no longer wanted are destroyed and undefined; foreign ones are left
    alone, and the names clashing with ours returned sorted.
    """
    actions: list[NetAction] = []
    clashes: list[str] = []
    for name in sorted(desired):
        bridge = desired[name]
        have = seen.get(name)
        if have is not None and not have.ours:
            clashes.append(name)
            continue
        if have is not None and have.bridge != bridge:
            if have.active:
                actions.append(NetAction("destroy", name))
            if have.persistent:
                actions.append(NetAction("undefine", name))
            have = None
        if have is None or not have.persistent:
            uuid = have.uuid if have is not None else ""
            actions.append(NetAction("define", name, network_xml(name, bridge, uuid)))
        if have is None or not have.active:
            actions.append(NetAction("start", name))
        if have is None or not have.persistent or not have.autostart:
            actions.append(NetAction("autostart", name))
    for name in sorted(seen):
        have = seen[name]
        if have.ours and name not in desired:
            if have.active:
                actions.append(NetAction("destroy", name))
            if have.persistent:
                actions.append(NetAction("undefine", name))
    return actions, clashes
