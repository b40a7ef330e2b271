"""IP forwarding switches, read and written through /proc/sys.

/proc/sys/net shows the network namespace of the calling thread, so these
functions act on whatever namespace that thread is in.
"""

from __future__ import annotations

_PATHS = {
    4: "/proc/sys/net/ipv4/ip_forward",
    6: "/proc/sys/net/ipv6/conf/all/forwarding",
}


def _path(family: int) -> str:
    try:
        return _PATHS[family]
    except KeyError:
        raise ValueError(f"address family must be 4 or 6, not {family!r}") from None


def forwarding(family: int) -> bool:
    with open(_path(family)) as f:
        return f.read().strip() != "0"


def set_forwarding(family: int, enabled: bool) -> None:
    with open(_path(family), "w") as f:
        f.write("1\n" if enabled else "0\n")


class SysctlAdapter:
    """Counts writes so tests can check that a settled system is left alone."""

    def __init__(self) -> None:
        self.writes = 0

    def forwarding(self, family: int) -> bool:
        return forwarding(family)

    def set_forwarding(self, family: int, enabled: bool) -> None:
        set_forwarding(family, enabled)
        self.writes += 1
