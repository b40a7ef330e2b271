"""libvirt's networks: listing them and carrying out the planned actions. Blocking: run in a thread.

What should exist is decided by plan_networks (kvmnetd.plan.libvirt_networks);
this only reads and writes.
"""

from __future__ import annotations

import contextlib
import subprocess
from dataclasses import dataclass
from typing import Any

import structlog

from kvmnetd.plan.libvirt_networks import NetAction, SeenNetwork, parse_seen

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


# -- adopt-libvirt: taking a running libvirt network over --------------------------------------

@dataclass(frozen=True)
class Snapshot:
    """A libvirt network as it is now, enough to take it over and to put it back."""

    xml: str                      # the persistent definition (or the live one if transient)
    active: bool
    autostart: bool
    bridge: str
    leases: tuple[dict[str, Any], ...]  # virNetworkGetDHCPLeases records
    taps: tuple[tuple[str, str], ...]   # (domain, tap) of running guests on it


def _connect(uri: str) -> Any:
    if libvirt is None:
        raise RuntimeError("libvirt-python is not installed (python3-libvirt)")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise RuntimeError(f"cannot connect to {uri}: {str(exc).strip()}") from None


def snapshot(uri: str, name: str) -> Snapshot:
    from kvmnetd.model.domxml import parse_domain

    conn = _connect(uri)
    try:
        net = conn.networkLookupByName(name)
        persistent = bool(net.isPersistent())
        xml = net.XMLDesc(libvirt.VIR_NETWORK_XML_INACTIVE if persistent else 0)
        active = bool(net.isActive())
        leases = tuple(net.DHCPLeases()) if active else ()
        taps = []
        for dom in conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
            try:
                parsed = parse_domain(dom.XMLDesc(0))
            except (libvirt.libvirtError, ValueError):
                continue
            taps += [(parsed.name, n.tap) for n in parsed.nics
                     if n.source_network == name and n.tap]
        return Snapshot(xml, active, bool(net.autostart()) if persistent else False,
                        str(net.bridgeName()), leases, tuple(taps))
    except libvirt.libvirtError as exc:
        raise RuntimeError(f"libvirt network {name}: {str(exc).strip()}") from None
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def stop(uri: str, name: str) -> None:
    """Autostart off, then stopped (libvirt removes its bridge and dnsmasq)."""
    _on_network(uri, name, lambda net: (net.setAutostart(0), net.destroy()))


def restore(uri: str, snap: Snapshot, name: str) -> None:
    """Back as it was: defined again if it was undefined, started, autostart as it was."""
    conn = _connect(uri)
    try:
        try:
            net = conn.networkLookupByName(name)
        except libvirt.libvirtError:
            net = conn.networkDefineXML(snap.xml)
        if snap.active and not net.isActive():
            net.create()
        if net.isPersistent():
            net.setAutostart(1 if snap.autostart else 0)
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def undefine(uri: str, name: str) -> None:
    _on_network(uri, name, lambda net: net.undefine())


def _on_network(uri: str, name: str, fn: Any) -> None:
    conn = _connect(uri)
    try:
        fn(conn.networkLookupByName(name))
    except libvirt.libvirtError as exc:
        raise RuntimeError(f"libvirt network {name}: {str(exc).strip()}") from None
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def plug(tap: str, bridge: str) -> None:
    """Put a guest's tap back on a bridge (libvirt does not re-plug taps on net-start)."""
    subprocess.run(["ip", "link", "set", tap, "master", bridge], check=False,
                   capture_output=True, timeout=10)
