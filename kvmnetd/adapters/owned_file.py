"""owned.json: what kvmnetd created, kept across restarts (the record itself is model/owned.py)."""

from __future__ import annotations

import json

from kvmnetd.adapters.files import atomic_write
from kvmnetd.model.owned import Owned


def load_owned(path: str) -> Owned:
    try:
        with open(path) as f:
            return Owned.from_json(json.load(f))
    except FileNotFoundError:
        return Owned()
    except (ValueError, TypeError, KeyError):
        # A torn or foreign file: start empty rather than act on garbage.
        return Owned()


def save_owned(path: str, owned: Owned) -> None:
    # dumps, not dump: one call into the C encoder instead of Python's chunked path.
    # Not durable: it lives on /run (tmpfs); the rename alone keeps it whole across a kill.
    atomic_write(path, json.dumps(owned.to_json(), sort_keys=True, separators=(",", ":")),
                 0o600, make_dir=True)
