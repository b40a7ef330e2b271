"""Per-port rate limits: the value (bytes per second), what was seen, and the action.

A rate is kept in bytes per second because that is what the kernel stores (tbf's rate
is bytes/s): a limit read back compares equal to the one asked for, with no rounding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

from kvmnetd.model.actions import Action

# tc's units: "bit" forms count bits, "bps" forms count bytes (tc-rate(8)); SI steps of
# 1000, IEC ("kibit") of 1024.
_UNITS = {
    "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12,
    "kibit": 2**10, "mibit": 2**20, "gibit": 2**30, "tibit": 2**40,
}
_BYTE_UNITS = {
    "bps": 1, "kbps": 10**3, "mbps": 10**6, "gbps": 10**9, "tbps": 10**12,
    "kibps": 2**10, "mibps": 2**20, "gibps": 2**30, "tibps": 2**40,
}
_RATE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]+)\s*")
MIN_RATE = 1000  # bytes/s (8 kbit): below that a full-size frame waits over a second
MAX_RATE = 10**12 // 8 * 10  # 10 tbit, far above any NIC
# The words a per-port override takes besides a rate.
NO_LIMIT = "none"  # no limit on this port, whatever its network's default
DEFAULT = "default"  # drop the override: the network's port_rate applies again


def parse_rate(text: str) -> int:
    """"100mbit", "1.5gbit", "500kbps" -> bytes per second; ValueError says why not."""
    m = _RATE.fullmatch(text.lower())
    if m is None:
        raise ValueError(f"{text!r} is not a rate: a number and a unit, e.g. \"100mbit\" "
                         "(bit, kbit, mbit, gbit; bps, kbps, mbps, gbps for bytes)")
    number, unit = m.groups()
    if unit in _UNITS:
        rate = int(Decimal(number) * _UNITS[unit]) // 8
    elif unit in _BYTE_UNITS:
        rate = int(Decimal(number) * _BYTE_UNITS[unit])
    else:
        raise ValueError(f"unknown rate unit {unit!r} in {text!r}: use bit, kbit, mbit, "
                         "gbit, tbit or bps, kbps, mbps, gbps (bytes per second)")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(f"rate {text!r} is outside 8kbit..10tbit")
    return rate


def format_rate(rate: int) -> str:
    """Bytes per second as tc would write it: the largest bit unit that divides it."""
    bits = rate * 8
    for unit, size in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bits % size == 0:
            return f"{bits // size}{unit}"
    return f"{bits}bit"


def ifb_name(ifname: str, index: int) -> str:
    """The ifb device that shapes what the guest on `ifname` sends (15 bytes at most)."""
    name = f"kr-{ifname}"
    return name if len(name.encode()) <= 15 else f"kr{index}"


@dataclass(frozen=True)
class SetPortRate(Action):
    """Limit both directions of a port to `rate` bytes/s through `ifb`; None removes the
    limit and the ifb (the port may be gone already)."""

    ifname: str
    rate: int | None
    ifb: str
