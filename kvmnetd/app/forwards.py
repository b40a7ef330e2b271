"""Port forwards at run time: `kvmnetctl forward add/remove/list`, as a part of the core.

Runtime forwards live beside the config's, per network, and are kept in state_dir so a
restart brings them back; `persist` writes them into the network's file instead. Both
end in Network.port_forwards, which the planner renders: one write path for all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import structlog

from kvmnetd.adapters.files import atomic_write
from kvmnetd.adapters.forward_store import ForwardFile
from kvmnetd.config.forwards import (
    check_proto,
    forward_problems,
    overlap_problem,
    overlapping,
    parse_target,
    reserved_problem,
)
from kvmnetd.config.write import render_network_toml
from kvmnetd.model.errors import Conflict, InvalidArgument, NoSuchNetwork
from kvmnetd.model.forward import Forward, parse_ports

if TYPE_CHECKING:
    from kvmnetd.config import load as cfg
    from kvmnetd.model.desired import Network
    from kvmnetd.model.records import Caller

log = structlog.get_logger("kvmnetd.app.forwards")


@dataclass(frozen=True)
class ForwardRow:
    network: str
    proto: str
    port: str  # "8080" or "8000-8010"
    to: str
    to_port: int | None
    runtime: bool  # added at run time (not in a config file)

    def to_json(self) -> dict[str, object]:
        return {"network": self.network, "proto": self.proto, "port": self.port,
                "to": self.to, "to_port": self.to_port, "runtime": self.runtime}


class ForwardsMixin:
    """Needs from the core: config, runtime, networks(), apply(), authorize_admin()."""

    config: cfg.Config
    runtime: dict[str, Network]
    runtime_forwards: dict[str, tuple[Forward, ...]]
    forward_store: ForwardFile | None

    if TYPE_CHECKING:  # the core's own
        def networks(self) -> dict[str, Network]: ...
        async def apply(self, ports: dict[str, str] | None = None) -> None: ...
        async def authorize_admin(self, caller: Caller, what: str) -> None: ...

    def _init_forwards(self, store: ForwardFile | None) -> None:
        self.forward_store = store
        self._merged: tuple[object, object, tuple[Network, ...], dict[str, Network]] | None = None
        self.runtime_forwards = store.read(self.config.settings.state_dir) if store else {}

    def with_runtime_forwards(self, nets: dict[str, Network]) -> dict[str, Network]:
        """`nets` with each network's runtime forwards after its own. One that a reload made
        invalid (network gone, now overlapping the config) is left out and logged."""
        if not self.runtime_forwards:
            return nets
        # Asked for on every port event: merge once per change of its inputs (held, so
        # compared by identity without the risk of a reused id).
        defined = tuple(self.runtime.values())
        cached = self._merged
        if cached is not None and cached[0] is self.config.networks \
                and cached[1] is self.runtime_forwards and cached[2] == defined:
            return dict(cached[3])
        out = self._merge(nets)
        self._merged = (self.config.networks, self.runtime_forwards, defined, out)
        return dict(out)

    def _merge(self, nets: dict[str, Network]) -> dict[str, Network]:
        everything = list(nets.values())
        fine: list[tuple[str, Forward]] = []
        for name, extra in sorted(self.runtime_forwards.items()):
            net = nets.get(name)
            if net is None:
                continue  # kept: the network may be defined again
            for fwd in extra:
                if problem := _problem(fwd, net, everything, []):
                    _skipped(name, fwd, problem)
                else:
                    fine.append((name, fwd))
        # Against the config's forwards (first, so they win) and each other: one sweep.
        items = [(n.name, f) for n in everything for f in n.port_forwards] + fine
        clashes = overlapping(items)
        first = len(items) - len(fine)
        keep: dict[str, list[Forward]] = {}
        for k, (name, fwd) in enumerate(fine):
            if (other := clashes.get(first + k)) is not None:
                _skipped(name, fwd, f"overlaps {other[1].describe()} of network {other[0]}")
            else:
                keep.setdefault(name, []).append(fwd)
        out = dict(nets)
        for name, fwds in keep.items():
            out[name] = replace(out[name], port_forwards=(*out[name].port_forwards, *fwds))
        return out

    def list_forwards(self, network: str = "") -> list[ForwardRow]:
        nets = self.networks()
        if network and network not in nets:
            raise NoSuchNetwork(f"no network named {network!r}")
        rows = []
        for name in sorted(nets):
            if network and name != network:
                continue
            runtime = set(self.runtime_forwards.get(name, ()))
            for f in nets[name].port_forwards:
                rows.append(ForwardRow(name, f.proto, f.ports, f.to, f.to_port, f in runtime))
        return rows

    async def add_forward(self, caller: Caller, network: str, proto: str, port: str,
                          target: str, persist: bool) -> None:
        await self.authorize_admin(caller, "add port forwards")
        nets = self.networks()
        net = nets.get(network)
        if net is None:
            raise NoSuchNetwork(f"no network named {network!r}")
        fwd = _parse(proto, port, target)
        taken = [(n.name, f) for n in nets.values() for f in n.port_forwards]
        problem = _problem(fwd, net, list(nets.values()), [])
        if problem is not None:
            raise InvalidArgument(problem)
        if overlap := overlap_problem(fwd, network, taken):
            raise Conflict(overlap)
        if persist:
            self._rewrite_file(network, (*self.config.networks[network].port_forwards, fwd)
                               if network in self.config.networks else (fwd,))
        else:
            self._set_runtime(network, (*self.runtime_forwards.get(network, ()), fwd))
        log.info("forward.added", network=network, forward=fwd.describe(), persist=persist,
                 uid=caller.uid)
        await self.apply()

    async def remove_forward(self, caller: Caller, network: str, proto: str,
                             port: str) -> None:
        await self.authorize_admin(caller, "remove port forwards")
        if network not in self.networks():
            raise NoSuchNetwork(f"no network named {network!r}")
        key = (check_or_invalid(proto), _first_port(port))
        runtime = self.runtime_forwards.get(network, ())
        if any(f.key == key for f in runtime):
            self._set_runtime(network, tuple(f for f in runtime if f.key != key))
        else:
            declared = self.config.networks.get(network)
            if declared is None or not any(f.key == key for f in declared.port_forwards):
                raise InvalidArgument(f"network {network} has no {proto} forward on port "
                                      f"{key[1]}")
            self._rewrite_file(network, tuple(f for f in declared.port_forwards
                                              if f.key != key))
        log.info("forward.removed", network=network, proto=key[0], port=key[1],
                 uid=caller.uid)
        await self.apply()

    def _set_runtime(self, network: str, forwards: tuple[Forward, ...]) -> None:
        self.runtime_forwards = {**self.runtime_forwards, network: forwards}
        if not forwards:
            del self.runtime_forwards[network]
        if self.forward_store is not None:
            self.forward_store.write(self.config.settings.state_dir, self.runtime_forwards)

    def _rewrite_file(self, network: str, forwards: tuple[Forward, ...]) -> None:
        """The network's own file under networks_dir, written with these forwards."""
        net = self.config.networks.get(network)
        path = os.path.join(self.config.settings.networks_dir, f"{network}.toml")
        if net is None:
            raise InvalidArgument(f"network {network} was defined at run time, not on disk; "
                                  "add the forward without persist")
        if net.source is None or os.path.realpath(net.source.file) != os.path.realpath(path):
            where = f"{net.source.file}:{net.source.line}" if net.source else "its file"
            raise Conflict(f"network {network} is declared in {where}; change the forward "
                           "there and reload")
        new = replace(net, port_forwards=forwards)
        atomic_write(path, render_network_toml(new), durable=True, make_dir=True)
        self.config = replace(self.config, networks={**self.config.networks, network: new})


def _skipped(network: str, fwd: Forward, reason: str) -> None:
    log.warning("forward.runtime_skipped", network=network, forward=fwd.describe(),
                reason=reason)


def check_or_invalid(proto: str) -> str:
    try:
        return check_proto(proto)
    except ValueError as e:
        raise InvalidArgument(str(e)) from None


def _first_port(port: str) -> int:
    try:
        return parse_ports(port)[0]
    except ValueError as e:
        raise InvalidArgument(str(e)) from None


def _parse(proto: str, port: str, target: str) -> Forward:
    check_or_invalid(proto)
    try:
        lo, hi = parse_ports(port)
        to, to_port = parse_target(target)
    except ValueError as e:
        raise InvalidArgument(str(e)) from None
    return Forward(proto=proto, port=lo, port_end=hi, to=to, to_port=to_port)


def _problem(fwd: Forward, net: Network, nets: list[Network],
             taken: list[tuple[str, Forward]]) -> str | None:
    problems = forward_problems(fwd, net)
    if problems:
        return problems[0][1]
    return reserved_problem(fwd, nets) or overlap_problem(fwd, net.name, taken)
