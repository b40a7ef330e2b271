"""qemu-bridge-helper's ACL for kvmnetd's open networks. Pure.

`qemu:///session` guests (virt-manager's user session, GNOME Boxes) reach a bridge through the
setuid qemu-bridge-helper, which reads /etc/qemu/bridge.conf. That file includes kvmnetd's own,
which allows exactly the bridges of active networks whose allow_users admits every user ("*").
"""

from __future__ import annotations

from collections.abc import Iterable

from kvmnetd.config.schema import EVERY_USER
from kvmnetd.model.desired import Network

HEADER = ("# Written by kvmnetd: bridges of its active networks open to every user "
          "(allow_users = [\"*\"]).\n# Include it from /etc/qemu/bridge.conf: include {path}\n")


def bridge_acl(networks: Iterable[Network], path: str) -> str:
    bridges = sorted(n.bridge for n in networks if EVERY_USER in n.allow_users)
    return HEADER.format(path=path) + "".join(f"allow {b}\n" for b in bridges)
