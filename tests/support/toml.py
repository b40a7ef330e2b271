"""Builders for the kvmnetd.toml text the tests write: one network, one rule, [daemon]."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

Value = str | int | bool | Iterable[str]


def _value(v: Value) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    return "[" + ", ".join(json.dumps(x) for x in v) + "]"


def _table(header: str, keys: Mapping[str, Value]) -> str:
    return header + "\n" + "".join(f"{k} = {_value(v)}\n" for k, v in keys.items())


def network_toml(name: str, mode: str, bridge: str, ipv4: str | None = None, *,
                 dhcp_range: str | None = None, dhcp: bool | Mapping[str, Value] = False,
                 hosts: Iterable[tuple[str, str, str]] = (), dns: bool = True,
                 domain: str | None = None, **extra: Value) -> str:
    """[network.NAME]; extra keys (allow_users, autostart, uplink, ...) go in that table.

    dhcp_range: one range, which also turns DHCP on; dhcp: True for DHCP with its
    defaults, or a mapping of further [dhcp] keys (lease_time, ...). hosts: (mac, ip, name)
    reservations. dns=False writes `enabled = false`; domain names the DNS domain.
    """
    keys: dict[str, Value] = {"mode": mode, "bridge": bridge}
    if ipv4 is not None:
        keys["ipv4"] = ipv4
    out = _table(f"[network.{name}]", {**keys, **extra})
    hosts = list(hosts)
    if dhcp_range is not None or dhcp or hosts:
        dkeys: dict[str, Value] = {"ranges": [dhcp_range]} if dhcp_range else {}
        if isinstance(dhcp, Mapping):
            dkeys.update(dhcp)
        out += _table(f"[network.{name}.dhcp]", dkeys)
        for mac, ip, host in hosts:
            out += _table(f"[[network.{name}.dhcp.host]]", {"mac": mac, "ip": ip, "name": host})
    if not dns:
        out += _table(f"[network.{name}.dns]", {"enabled": False})
    elif domain is not None:
        out += _table(f"[network.{name}.dns]", {"domain": domain})
    return out + "\n"


def attach_toml(network: str, **match: str) -> str:
    """One [[attach]] rule: devices that match (ifname glob, mac, domain) join `network`."""
    return _table("[[attach]]", {"network": network, **match}) + "\n"


def daemon_toml(**settings: Value) -> str:
    """The [daemon] table with these settings."""
    return _table("[daemon]", settings) + "\n"
