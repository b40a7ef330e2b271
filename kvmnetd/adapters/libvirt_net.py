"""libvirt's networks: listing them and carrying out the planned actions. Blocking: run in a thread.

What should exist is decided by kvmnetd.libvirt_networks.plan_networks; this only reads and writes.
"""

from __future__ import annotations

import contextlib
from typing import Any

import structlog

from ..libvirt_networks import NetAction, SeenNetwork, parse_seen

log = structlog.get_logger("kvmnetd.libvirt")

try:
    import libvirt
except ImportError:  # the watcher reports the missing binding; nothing here runs then
    libvirt = None


def network_definition(uri: str, name: str) -> str:
    """The definition of libvirt network `name` (its persistent one if it has one)."""
    if libvirt is None:
        raise RuntimeError("libvirt-python is not installed (python3-libvirt)")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.openReadOnly(uri)
    except libvirt.libvirtError as exc:
        raise RuntimeError(f"cannot connect to {uri}: {str(exc).strip()}") from None
    try:
        net = conn.networkLookupByName(name)
        flags = libvirt.VIR_NETWORK_XML_INACTIVE if net.isPersistent() else 0
        return str(net.XMLDesc(flags))
    except libvirt.libvirtError as exc:
        raise RuntimeError(f"libvirt network {name}: {str(exc).strip()}") from None
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def list_networks(conn: Any) -> dict[str, SeenNetwork]:
    seen: dict[str, SeenNetwork] = {}
    for net in conn.listAllNetworks(0):
        try:
            parsed = parse_seen(net.XMLDesc(0), bool(net.isActive()), bool(net.isPersistent()),
                                bool(net.autostart()) if net.isPersistent() else False)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
                continue  # gone since the listing
            raise
        except ValueError as exc:
            log.warning("libvirt.network_xml_invalid", network=net.name(), reason=str(exc))
            continue
        seen[parsed.name] = parsed
    return seen


def apply(conn: Any, actions: list[NetAction]) -> list[str]:
    """Carry out each action; one failing does not stop the others. Returns the failures."""
    failed = []
    for act in actions:
        try:
            _one(conn, act)
            log.info("libvirt.network_" + act.kind, network=act.name)
        except libvirt.libvirtError as exc:
            if not conn.isAlive():
                raise
            failed.append(f"{act.kind} {act.name}: {str(exc).strip()}")
            log.warning("libvirt.network_action_failed", action=act.kind, network=act.name,
                        reason=str(exc).strip())
    return failed


def _one(conn: Any, act: NetAction) -> None:
    if act.kind == "define":
        conn.networkDefineXML(act.xml)
        return
    net = conn.networkLookupByName(act.name)
    if act.kind == "start":
        with _already(libvirt.VIR_ERR_OPERATION_INVALID):  # started meanwhile
            net.create()
    elif act.kind == "autostart":
        net.setAutostart(1)
    elif act.kind == "destroy":
        with _already(libvirt.VIR_ERR_OPERATION_INVALID):
            net.destroy()
    elif act.kind == "undefine":
        net.undefine()
    else:
        raise ValueError(f"unknown action {act.kind}")


@contextlib.contextmanager
def _already(code: int) -> Any:
    try:
        yield
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != code:
            raise
