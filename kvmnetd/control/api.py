"""The core's control surface, as the bus and socket servers see it.

The servers depend on this protocol only, so they can be tested against an
in-memory fake and the core can run with no bus at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from kvmnetd.app.forwards import ForwardRow
from kvmnetd.model.records import (
    Caller,
    CoreEvent,
    Lease,
    NetworkStatus,
    PortCounters,
    PortStatus,
)


class CoreAPI(Protocol):
    version: str

    def list_networks(self) -> list[NetworkStatus]: ...

    def network(self, name: str) -> NetworkStatus: ...  # NoSuchNetwork

    def list_ports(self) -> list[PortStatus]: ...

    def port_stats(self, ifname: str = "") -> list[PortCounters]: ...  # NoSuchPort

    def leases(self, network: str) -> list[Lease]: ...

    def describe(self) -> dict[str, Any]: ...  # the whole state, JSON-able

    async def refresh_frr(self) -> None: ...  # before describe: FRR's peers read now

    async def doctor(self) -> list[dict[str, Any]]: ...  # findings, JSON-able

    async def define_network(self, caller: Caller, toml_text: str, persist: bool) -> str: ...

    async def undefine_network(self, caller: Caller, name: str, persist: bool) -> None: ...

    async def start_network(self, caller: Caller, name: str) -> None: ...

    async def stop_network(self, caller: Caller, name: str) -> None: ...

    async def attach_port(self, caller: Caller, ifname: str, network: str,
                          force: bool = False) -> None: ...

    async def detach_port(self, caller: Caller, ifname: str) -> None: ...

    async def move_port(self, caller: Caller, ifname: str, network: str) -> None: ...

    async def limit_port(self, caller: Caller, ifname: str, rate: str) -> None: ...

    async def reload(self, caller: Caller) -> None: ...  # ConfigError: nothing changed

    async def set_log_level(self, caller: Caller, level: str) -> None: ...

    # Port forwards (app/forwards.py): NoSuchNetwork, InvalidArgument, Conflict.
    def list_forwards(self, network: str = "") -> list[ForwardRow]: ...

    async def add_forward(self, caller: Caller, network: str, proto: str, port: str,
                          target: str, persist: bool) -> None: ...

    async def remove_forward(self, caller: Caller, network: str, proto: str,
                             port: str) -> None: ...

    def subscribe(self, listener: Callable[[CoreEvent], None]) -> None: ...
