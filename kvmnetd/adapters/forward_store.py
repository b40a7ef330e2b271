"""Runtime port forwards (`kvmnetctl forward add` without --persist), kept in
state_dir/forwards.json so they survive a daemon restart."""

from __future__ import annotations

import ipaddress
import json
import os
from typing import Any

import structlog

from kvmnetd.adapters.files import atomic_write
from kvmnetd.model.forward import Forward

log = structlog.get_logger("kvmnetd.adapters.forward_store")
FILE_NAME = "forwards.json"


def _row(f: Forward) -> dict[str, Any]:
    return {"proto": f.proto, "port": f.port, "port_end": f.port_end, "to": f.to,
            "to_port": f.to_port, "address": None if f.address is None else str(f.address)}


def _forward(row: dict[str, Any]) -> Forward:
    address = row.get("address")
    to_port = row.get("to_port")
    return Forward(proto=str(row["proto"]), port=int(row["port"]),
                   port_end=int(row.get("port_end", row["port"])), to=str(row["to"]),
                   to_port=None if to_port is None else int(to_port),
                   address=None if address is None else ipaddress.ip_address(address))


class ForwardFile:
    """Reads and writes state_dir/forwards.json: {network: [forward, ...]}."""

    def read(self, state_dir: str) -> dict[str, tuple[Forward, ...]]:
        """The kept forwards; {} when there are none or the file cannot be used (logged)."""
        path = os.path.join(state_dir, FILE_NAME)
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
            return {str(net): tuple(_forward(r) for r in rows) for net, rows in doc.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("forwards.state_unusable", path=path, error=str(e))
            return {}

    def write(self, state_dir: str, forwards: dict[str, tuple[Forward, ...]]) -> None:
        """Keep `forwards` atomically; a failure is logged and the daemon runs on."""
        path = os.path.join(state_dir, FILE_NAME)
        doc = {net: [_row(f) for f in fwds] for net, fwds in sorted(forwards.items()) if fwds}
        try:
            atomic_write(path, json.dumps(doc, indent=1, sort_keys=True) + "\n", 0o644,
                         durable=True, make_dir=True)
        except OSError as e:
            log.warning("forwards.state_not_written", path=path, error=str(e))
