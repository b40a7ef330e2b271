"""port-macs.json: each guarded port's learned MAC, kept across daemon restarts (on /run,
so not across reboots, when every tap is new anyway)."""

from __future__ import annotations

import json
from typing import Any

from kvmnetd.adapters.files import atomic_write

# ifname -> (the tap's link index, None: not seen yet; MAC)
PortMacs = dict[str, tuple[int | None, str]]


def load_port_macs(path: str) -> PortMacs:
    try:
        with open(path) as f:
            data: Any = json.load(f)
        return {str(k): (v[0] if isinstance(v[0], int) else None, str(v[1]))
                for k, v in data.items()}
    except FileNotFoundError:
        return {}
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        # A torn or foreign file: learn again rather than act on garbage.
        return {}


def save_port_macs(path: str, macs: PortMacs) -> None:
    atomic_write(path, json.dumps({k: list(v) for k, v in sorted(macs.items())}), 0o600,
                 make_dir=True)
