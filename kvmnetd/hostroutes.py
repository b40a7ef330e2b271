"""Which routes are the host's own, for the built-in default network's choice of subnet.

Routes on our bridges and on bridged uplinks are ours; the config is read twice
to learn those first. Host routes never make a config invalid: a network whose
subnet overlaps one is reported by the planner, for that network alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from . import config as cfg
from .model import Network


def host_routes(obs: Any, ours: set[str]) -> list[Any]:
    """Routes that are the host's own: not on one of our bridges or bridged uplinks."""
    mine = {obs.link(b).index for b in ours if obs.link(b) is not None}
    return [r.dst for r in obs.routes if r.oif not in mine and r.dst.prefixlen > 0]


def devices_of(networks: Iterable[Network]) -> set[str]:
    """Our bridges and bridged uplinks: the routes on them are not the host's."""
    nets = list(networks)
    return {n.bridge for n in nets} | {n.uplink for n in nets if n.uplink}


def load_config(config_file: str | None, networks_dir: str | None, overrides: dict[str, str],
                observed: Any) -> cfg.Config:
    """Load twice: first to learn our bridges and uplinks, whose routes are not the host's."""
    first = cfg.load(config_file, networks_dir, host_routes=(), overrides=overrides)
    routes = host_routes(observed, devices_of(first.networks.values()))
    return cfg.load(config_file, networks_dir, host_routes=routes, overrides=overrides)
