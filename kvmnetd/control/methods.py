"""The API, once: every method's name, arguments, reply, access class and handler.

The D-Bus Manager object (bus/service.py), the control socket (bus/socket_server.py),
kvmnetctl (cli.py) and the checked-in introspection XML are all built from METHODS, so
they cannot drift apart. kvmnetctl imports this module at start-up, so it stays cheap to
import: a NamedTuple and plain strings (dataclasses and enum classes cost a qemu hook
~13 ms), bus names and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from kvmnetd.control.names import network_path

if TYPE_CHECKING:
    from kvmnetd.control.api import CoreAPI
    from kvmnetd.model.records import Caller, NetworkStatus


# Who may call: "read" anyone (the caller is not even looked up); "port" anyone at the
# bus policy level, the per-network allow lists decide; "admin" root, group kvmnet or polkit.
Access = Literal["read", "port", "admin"]
# Which network objects the bus re-reads after a successful call: none, the one named by
# the first argument, the one whose path the call returned, or all.
Refresh = Literal["none", "arg", "result", "all"]


# Python types of the D-Bus argument codes used here (the socket checks them exactly).
_PY_TYPES: dict[str, type] = {"s": str, "b": bool}

# A read that waits for nothing is a plain function: the bus answers it in the call's
# own dispatch, without a task per call.
Handler = Callable[["CoreAPI", "Caller | None", list[Any]], Any]


class Method(NamedTuple):
    name: str  # the D-Bus member and the socket's "method"
    args: tuple[tuple[str, str], ...]  # (argument name, D-Bus type code)
    returns: str  # D-Bus signature of the reply; "" for none
    access: Access
    run: Handler  # calls the core; returns the reply as both transports send it
    refresh: Refresh = "none"
    on_bus: bool = True  # False: the bus has it as a property or on the network object

    @property
    def signature(self) -> str:
        return "".join(code for _, code in self.args)

    @property
    def arg_types(self) -> tuple[type, ...]:
        return tuple(_PY_TYPES[code] for _, code in self.args)


def network_properties(st: NetworkStatus) -> dict[str, Any]:
    """A network object's D-Bus properties (the socket's "Network" reply)."""
    return {
        "Name": st.name,
        "Mode": st.mode,
        "Bridge": st.bridge,
        "Addresses": list(st.addresses),
        "State": st.state,
        "StateReason": st.reason,
        "Ports": list(st.ports),
        "DhcpState": st.dhcp.state,
        "Autostart": st.autostart,
        "IsolatePorts": st.isolate_ports,
        "AntiSpoofing": st.anti_spoofing,
        "PortRate": st.port_rate,
    }


def lease_rows(core: CoreAPI, network: str) -> list[list[Any]]:
    """a(sssst): mac, ip, hostname, client id, expiry (seconds since the epoch, 0: never)."""
    return [[le.mac, le.ip, le.hostname, le.client_id, max(0, int(le.expires))]
            for le in core.leases(network)]


def _caller(c: Caller | None) -> Caller:
    if c is None:  # a transport that skipped the look-up for a method that needs it
        raise TypeError("this method needs the caller")
    return c


def _list_networks(core: CoreAPI, _c: Caller | None, _a: list[Any]) -> Any:
    return [[n.name, n.mode, n.bridge, n.state] for n in core.list_networks()]


async def _describe(core: CoreAPI, _c: Caller | None, _a: list[Any]) -> Any:
    await core.refresh_frr()
    return json.dumps(core.describe(), sort_keys=True, default=str)


async def _doctor(core: CoreAPI, _c: Caller | None, _a: list[Any]) -> Any:
    return json.dumps(await core.doctor(), sort_keys=True)


def _get_network(core: CoreAPI, _c: Caller | None, a: list[Any]) -> Any:
    return network_path(core.network(a[0]).name)


def _list_ports(core: CoreAPI, _c: Caller | None, _a: list[Any]) -> Any:
    return [[p.ifname, p.network, p.state] for p in core.list_ports()]


def _port_stats(core: CoreAPI, _c: Caller | None, a: list[Any]) -> Any:
    return [[r.ifname, r.network, r.rx_bytes, r.tx_bytes, r.rx_packets, r.tx_packets,
             r.drops, r.spoof_drops] for r in core.port_stats(a[0])]


async def _define(core: CoreAPI, c: Caller | None, a: list[Any]) -> Any:
    return network_path(await core.define_network(_caller(c), a[0], a[1]))


async def _undefine(core: CoreAPI, c: Caller | None, a: list[Any]) -> Any:
    await core.undefine_network(_caller(c), a[0], a[1])


async def _start(core: CoreAPI, c: Caller | None, a: list[Any]) -> Any:
    await core.start_network(_caller(c), a[0])


async def _stop(core: CoreAPI, c: Caller | None, a: list[Any]) -> Any:
    await core.stop_network(_caller(c), a[0])


async def _attach(core: CoreAPI, c: Caller | None, a: list[Any]) -> Any:
    await core.attach_port(_caller(c), a[0], a[1], a[2])


async def _detach(core: CoreAPI, c: Caller | None, a: list[Any]) -> Any:
    await core.detach_port(_caller(c), a[0])


async def _move(core: CoreAPI, c: Caller | None, a: list[Any]) -> Any:
    await core.move_port(_caller(c), a[0], a[1])


async def _limit(core: CoreAPI, c: Caller | None, a: list[Any]) -> Any:
    await core.limit_port(_caller(c), a[0], a[1])


async def _reload(core: CoreAPI, c: Caller | None, _a: list[Any]) -> Any:
    await core.reload(_caller(c))


async def _set_log_level(core: CoreAPI, c: Caller | None, a: list[Any]) -> Any:
    await core.set_log_level(_caller(c), a[0])


# ---- port forwards ----------------------------------------------------------------------


def _list_forwards(core: CoreAPI, _c: Caller | None, a: list[Any]) -> Any:
    # to_port 0: the same port(s) as on the host.
    return [[r.network, r.proto, r.port, r.to, r.to_port or 0, r.runtime]
            for r in core.list_forwards(a[0])]


async def _add_forward(core: CoreAPI, c: Caller | None, a: list[Any]) -> Any:
    await core.add_forward(_caller(c), a[0], a[1], a[2], a[3], a[4])


async def _remove_forward(core: CoreAPI, c: Caller | None, a: list[Any]) -> Any:
    await core.remove_forward(_caller(c), a[0], a[1], a[2])


def _network(core: CoreAPI, _c: Caller | None, a: list[Any]) -> Any:
    return network_properties(core.network(a[0]))


def _leases(core: CoreAPI, _c: Caller | None, a: list[Any]) -> Any:
    return lease_rows(core, a[0])


def _version(core: CoreAPI, _c: Caller | None, _a: list[Any]) -> Any:
    return core.version


_S, _B = "s", "b"
READ: Access = "read"
PORT: Access = "port"
ADMIN: Access = "admin"

METHODS: tuple[Method, ...] = (
    Method("ListNetworks", (), "a(ssss)", READ, _list_networks),
    Method("Describe", (), "s", READ, _describe),
    Method("Doctor", (), "s", READ, _doctor),
    Method("GetNetwork", (("name", _S),), "o", READ, _get_network),
    Method("ListPorts", (), "a(sss)", READ, _list_ports),
    # ifname "": every port. Guest's view: tx is what the guest sent.
    Method("PortStats", (("ifname", _S),), "a(sstttttt)", READ, _port_stats),
    Method("DefineNetwork", (("toml_text", _S), ("persist", _B)), "o", ADMIN, _define,
           "result"),
    Method("UndefineNetwork", (("name", _S), ("persist", _B)), "", ADMIN, _undefine,
           "arg"),
    Method("StartNetwork", (("name", _S),), "", ADMIN, _start, "arg"),
    Method("StopNetwork", (("name", _S),), "", ADMIN, _stop, "arg"),
    Method("AttachPort", (("ifname", _S), ("network", _S), ("force", _B)), "", PORT, _attach),
    Method("DetachPort", (("ifname", _S),), "", PORT, _detach),
    Method("MovePort", (("ifname", _S), ("network", _S)), "", PORT, _move),
    # rate: "100mbit" and the like, "none" (no limit) or "default" (the network's).
    Method("LimitPort", (("ifname", _S), ("rate", _S)), "", ADMIN, _limit),
    Method("Reload", (), "", ADMIN, _reload, "all"),
    Method("SetLogLevel", (("level", _S),), "", ADMIN, _set_log_level),
    # Port forwards: network "" lists every network's; target is TO[:TO_PORT].
    Method("ListForwards", (("network", _S),), "a(ssssqb)", READ, _list_forwards),
    Method("AddForward", (("network", _S), ("proto", _S), ("port", _S), ("target", _S),
                          ("persist", _B)), "", ADMIN, _add_forward),
    Method("RemoveForward", (("network", _S), ("proto", _S), ("port", _S)), "", ADMIN,
           _remove_forward),
    # The bus reaches these through the network object and the Version property.
    Method("Network", (("name", _S),), "a{sv}", READ, _network, on_bus=False),
    Method("Leases", (("name", _S),), "a(sssst)", READ, _leases, on_bus=False),
    Method("Version", (), "s", READ, _version, on_bus=False),
)

BY_NAME: dict[str, Method] = {m.name: m for m in METHODS}
