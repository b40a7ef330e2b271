"""The built-in default network's subnet, kept in state_dir once chosen.

The choice depends on the host's routes at the time; without this file a VPN or a
container network that came up before kvmnetd at the next boot would move the
network, and every guest's address with it. The file is small TOML with a comment
saying what it is, so an admin who finds it knows what to do with it.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from datetime import UTC, datetime

import structlog

from kvmnetd.adapters.files import atomic_write

log = structlog.get_logger("kvmnetd")

FILE_NAME = "default-network.toml"

_TEMPLATE = """\
# The subnet kvmnetd chose for its built-in default network (kvbr0) on {when}.
# It is kept so that the network does not move when the host's routes change.
# Only used while no configuration file exists. To use another subnet, declare
# [network.default] in /etc/kvmnetd/kvmnetd.toml, or delete this file: kvmnetd
# then chooses again at its next start.
subnet = "{subnet}"
"""


class DefaultSubnetFile:
    """Reads and writes state_dir/default-network.toml. `writable=False` only reads."""

    def __init__(self, writable: bool = True) -> None:
        self.writable = writable

    def read(self, state_dir: str) -> ipaddress.IPv4Network | None:
        """The kept subnet; None when there is none or it cannot be used (then logged)."""
        path = os.path.join(state_dir, FILE_NAME)
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
            subnet = ipaddress.IPv4Network(doc["subnet"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            # ValueError covers TOMLDecodeError and bad addresses.
            log.warning("default_network.state_unusable", path=path, error=str(e))
            return None
        if subnet.prefixlen > 30 or not subnet.is_private:
            log.warning("default_network.state_unusable", path=path,
                        error=f"{subnet} is not a private subnet with room for guests")
            return None
        return subnet

    def write(self, state_dir: str, subnet: ipaddress.IPv4Network) -> None:
        """Keep `subnet`, atomically; a failure is logged and the daemon runs on."""
        if not self.writable:
            return
        path = os.path.join(state_dir, FILE_NAME)
        when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        try:
            atomic_write(path, _TEMPLATE.format(when=when, subnet=subnet), 0o644,
                         durable=True, make_dir=True)
        except OSError as e:
            log.warning("default_network.state_not_written", path=path, error=str(e))
            return
        log.info("default_network.chosen", subnet=str(subnet), kept_in=path)
