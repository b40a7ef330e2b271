"""An in-memory CoreAPI for the bus, socket and CLI tests.

Access rule: root may do anything; anyone else gets PermissionDenied for a mutating call
unless the uid is in the network's allow set (port verbs only).
"""

from __future__ import annotations

import asyncio
import re
import tomllib
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from kvmnetd.errors import (
    ConfigError,
    ConfigIssue,
    Conflict,
    InvalidArgument,
    NoSuchNetwork,
    NoSuchPort,
    PermissionDenied,
)
from kvmnetd.status import Caller, CoreEvent, DhcpStatus, Lease, NetworkStatus, PortStatus

_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_NETNAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class FakeCore:
    version = "0.1.0-fake"

    def __init__(self) -> None:
        self.networks: dict[str, NetworkStatus] = {}
        self.ports: dict[str, PortStatus] = {}
        self.leases_by_net: dict[str, list[Lease]] = {}
        self.allow: dict[str, set[int]] = {}
        self.persisted: set[str] = set()
        self.listeners: list[Callable[[CoreEvent], None]] = []
        self.calls: list[tuple[str, Caller]] = []
        self.delay = 0.0
        self.config_issues: list[ConfigIssue] = []  # a reload then fails with these
        self.log_level = "info"

    # -- helpers for tests -------------------------------------------------
    def add_network(self, name: str, mode: str = "nat", bridge: str | None = None,
                    addresses: tuple[str, ...] = (), state: str = "active",
                    allow: set[int] | None = None) -> None:
        self.networks[name] = NetworkStatus(
            name=name, mode=mode, bridge=bridge or f"br-{name}"[:15], addresses=addresses,
            state=state, dhcp=DhcpStatus(state="running" if state == "active" else "off"))
        self.allow[name] = set(allow or ())
        self.leases_by_net.setdefault(name, [])
        self._emit(CoreEvent("network-changed", name))

    def add_lease(self, network: str, lease: Lease) -> None:
        self.leases_by_net[network].append(lease)
        self._emit(CoreEvent("lease-added", network, lease=lease))

    def _emit(self, ev: CoreEvent) -> None:
        for fn in list(self.listeners):
            fn(ev)

    def _net(self, name: str) -> NetworkStatus:
        try:
            return self.networks[name]
        except KeyError:
            raise NoSuchNetwork(f"no network named {name!r}") from None

    def _check(self, caller: Caller, what: str, network: str | None = None) -> None:
        self.calls.append((what, caller))
        if caller.is_root:
            return
        if network is not None and caller.uid in self.allow.get(network, set()):
            return
        raise PermissionDenied(f"uid {caller.uid} may not {what}")

    async def _pause(self) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)

    def _set_ports(self, network: str) -> None:
        if network in self.networks:
            ports = tuple(sorted(p.ifname for p in self.ports.values() if p.network == network))
            self.networks[network] = replace(self.networks[network], ports=ports)

    # -- CoreAPI reads -----------------------------------------------------
    def list_networks(self) -> list[NetworkStatus]:
        return [self.networks[k] for k in sorted(self.networks)]

    def network(self, name: str) -> NetworkStatus:
        return self._net(name)

    def list_ports(self) -> list[PortStatus]:
        return [self.ports[k] for k in sorted(self.ports)]

    def leases(self, network: str) -> list[Lease]:
        self._net(network)
        return list(self.leases_by_net.get(network, []))

    async def doctor(self) -> list[dict[str, Any]]:
        return []

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "networks": [n.to_json() for n in self.list_networks()],
            "ports": [p.to_json() for p in self.list_ports()],
            "persisted": sorted(self.persisted),
        }

    # -- CoreAPI writes ----------------------------------------------------
    async def define_network(self, caller: Caller, toml_text: str, persist: bool) -> str:
        self._check(caller, "define networks")
        await self._pause()
        try:
            doc = tomllib.loads(toml_text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument(f"bad TOML: {exc}") from None
        name = doc.get("name")
        if not isinstance(name, str) or not _NETNAME.match(name):
            raise InvalidArgument("name: missing or invalid")
        if name in self.networks:
            raise Conflict(f"network {name!r} exists")
        self.add_network(name, mode=str(doc.get("mode", "nat")), state="inactive",
                         addresses=tuple(doc.get("addresses", ())))
        if persist:
            self.persisted.add(name)
        return name

    async def undefine_network(self, caller: Caller, name: str, persist: bool) -> None:
        self._check(caller, "undefine networks")
        self._net(name)
        if any(p.network == name for p in self.ports.values()):
            raise Conflict(f"network {name!r} has ports")
        del self.networks[name]
        self.persisted.discard(name)
        self._emit(CoreEvent("network-changed", name))

    async def _set_state(self, caller: Caller, name: str, state: str) -> None:
        self._check(caller, f"change network state to {state}")
        st = self._net(name)
        self.networks[name] = replace(st, state=state, reason="requested")
        self._emit(CoreEvent("network-changed", name))

    async def start_network(self, caller: Caller, name: str) -> None:
        await self._set_state(caller, name, "active")

    async def stop_network(self, caller: Caller, name: str) -> None:
        await self._set_state(caller, name, "inactive")

    async def attach_port(self, caller: Caller, ifname: str, network: str,
                          force: bool = False) -> None:
        self._check(caller, "attach ports", network)
        await self._pause()
        if not _IFNAME.match(ifname):
            raise InvalidArgument(f"invalid interface name {ifname!r}")
        st = self._net(network)
        old = self.ports.get(ifname)
        if old is not None and old.network != network and not force:
            raise Conflict(f"{ifname} is attached to {old.network}")
        self.ports[ifname] = PortStatus(ifname, network, st.bridge, "attached")
        if old is not None and old.network != network:
            self._set_ports(old.network)
        self._set_ports(network)
        self._emit(CoreEvent("port-attached", network, ifname))

    async def detach_port(self, caller: Caller, ifname: str) -> None:
        port = self.ports.get(ifname)
        if port is None:
            self.calls.append(("detach ports", caller))
            raise NoSuchPort(f"no port {ifname!r}")
        self._check(caller, "detach ports", port.network)
        del self.ports[ifname]
        self._set_ports(port.network)
        self._emit(CoreEvent("port-detached", port.network, ifname))

    async def move_port(self, caller: Caller, ifname: str, network: str) -> None:
        self._check(caller, "move ports", network)
        if ifname not in self.ports:
            raise NoSuchPort(f"no port {ifname!r}")
        await self.attach_port(caller, ifname, network, force=True)

    async def reload(self, caller: Caller) -> None:
        self._check(caller, "reload")
        if self.config_issues:
            raise ConfigError(list(self.config_issues))

    async def set_log_level(self, caller: Caller, level: str) -> None:
        self._check(caller, "change the log level")
        if level not in ("debug", "info", "warning", "error"):
            raise InvalidArgument(f"log level {level!r} is not one of debug, info, warning, error")
        self.log_level = level

    def subscribe(self, listener: Callable[[CoreEvent], None]) -> None:
        self.listeners.append(listener)
