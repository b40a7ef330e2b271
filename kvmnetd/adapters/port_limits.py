"""Per-port rate overrides set at run time, kept in state_dir so a restart keeps them."""

from __future__ import annotations

import json
import os

import structlog

from kvmnetd.adapters.files import atomic_write

log = structlog.get_logger("kvmnetd.port_limits")
FILE_NAME = "port-limits.json"


def load_port_limits(state_dir: str) -> dict[str, int]:
    """ifname -> bytes/s (0: no limit); empty when the file is missing or unreadable."""
    path = os.path.join(state_dir, FILE_NAME)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("port_limits.unreadable", path=path, error=str(e))
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items()
            if isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0}


def save_port_limits(state_dir: str, limits: dict[str, int]) -> None:
    atomic_write(os.path.join(state_dir, FILE_NAME),
                 json.dumps(limits, sort_keys=True, indent=1) + "\n", durable=True,
                 make_dir=True)
