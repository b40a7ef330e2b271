"""Who may administer kvmnetd: root, members of group kvmnet, and whom polkit allows.

The order is networkd's and libvirt's: the group is a standing grant that works with
or without polkit; anyone else is asked about through polkit where it runs (a desktop
user gets the usual password prompt); where it does not, only root and the group pass.
"""

from __future__ import annotations

import grp
from typing import Protocol

from kvmnetd.model.errors import PermissionDenied
from kvmnetd.model.records import Caller

ADMIN_GROUP = "kvmnet"
# polkit action ids (polkit/org.kvmnetd.policy)
MANAGE = "org.kvmnetd.manage"


class Authority(Protocol):
    """polkit, as the core sees it."""

    async def check(self, caller: Caller, action: str) -> bool | None:
        """True/False: polkit's answer; None: no polkit to ask (or it could not answer)."""
        ...


def admin_gid() -> int | None:
    try:
        return grp.getgrnam(ADMIN_GROUP).gr_gid
    except KeyError:
        return None


def in_admin_group(caller: Caller) -> bool:
    """Root, or a member of group kvmnet (by the user database, as the caller's groups)."""
    if caller.is_root:
        return True
    gid = admin_gid()
    return gid is not None and gid in caller.gids


async def authorize(caller: Caller, what: str, authority: Authority | None,
                    action: str = MANAGE) -> None:
    """Raise PermissionDenied unless the caller may do `what` (e.g. "start networks")."""
    if in_admin_group(caller):
        return
    answer = await authority.check(caller, action) if authority is not None else None
    if answer:
        return
    if answer is False:
        raise PermissionDenied(f"polkit does not allow uid {caller.uid} to {what} "
                               f"(action {action}); root and members of group "
                               f"{ADMIN_GROUP} may")
    raise PermissionDenied(f"only root and members of group {ADMIN_GROUP} may {what}")
