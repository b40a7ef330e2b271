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


def accept_ra_key(ifname: str) -> str:
    """sysctl's name for a device's accept_ra (a dot in the name becomes '/')."""
    return f"net.ipv6.conf.{ifname.replace('.', '/')}.accept_ra"


def accept_ra(ifname: str) -> int | None:
    """net.ipv6.conf.IFNAME.accept_ra; None if the device (or IPv6 on it) is gone."""
    if not ifname or "/" in ifname or ifname in (".", ".."):
        return None
    try:
        with open(f"/proc/sys/net/ipv6/conf/{ifname}/accept_ra") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


class SysctlAdapter:
    """Counts writes so tests can check that a settled system is left alone."""

    def __init__(self) -> None:
        self.writes = 0

    def forwarding(self, family: int) -> bool:
        return forwarding(family)

    def set_forwarding(self, family: int, enabled: bool) -> None:
        set_forwarding(family, enabled)
        self.writes += 1

    def accept_ra(self, ifname: str) -> int | None:
        return accept_ra(ifname)
