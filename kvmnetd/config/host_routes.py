"""Which routes are the host's own, for the built-in default network's choice of subnet.

Routes on our bridges and on bridged uplinks are ours; the config is read twice
to learn those first. Host routes never make a config invalid: a network whose
subnet overlaps one is reported by the planner, for that network alone.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any, Protocol

from kvmnetd.config import load as cfg
from kvmnetd.model.desired import Network


def host_routes(obs: Any, ours: set[str]) -> list[Any]:
    """Routes that are the host's own: not on one of our bridges or bridged uplinks."""
    mine = {obs.link(b).index for b in ours if obs.link(b) is not None}
    return [r.dst for r in obs.routes if r.oif not in mine and r.dst.prefixlen > 0]


def devices_of(networks: Iterable[Network]) -> set[str]:
    """Our bridges and bridged uplinks: the routes on them are not the host's."""
    nets = list(networks)
    return {n.bridge for n in nets} | {n.uplink for n in nets if n.uplink}


class DefaultSubnetStore(Protocol):
    """Where the built-in default network's subnet is kept once chosen (an adapter)."""

    def read(self, state_dir: str) -> ipaddress.IPv4Network | None: ...
    def write(self, state_dir: str, subnet: ipaddress.IPv4Network) -> None: ...


def load_config(config_file: str | None, networks_dir: str | None, overrides: dict[str, str],
                observed: Any, store: DefaultSubnetStore | None = None) -> cfg.Config:
    """Load twice: first to learn our bridges and uplinks, whose routes are not the host's.

    With a store, the built-in default network takes the subnet kept there, or keeps
    the one chosen now: it does not move when the host's routes change later.
    """
    first = cfg.load(config_file, networks_dir, host_routes=(), overrides=overrides)
    builtin = not first.files
    kept = store.read(first.settings.state_dir) if store is not None and builtin else None
    routes = host_routes(observed, devices_of(first.networks.values()))
    conf = cfg.load(config_file, networks_dir, host_routes=routes, overrides=overrides,
                    default_subnet=kept)
    default = conf.networks.get("default")
    if store is not None and builtin and kept is None and default and default.ipv4:
        store.write(conf.settings.state_dir, default.ipv4.network)
    return conf
