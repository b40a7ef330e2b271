"""Asks polkit (org.freedesktop.PolicyKit1 on the system bus) whether a bus caller may act.

The subject is a bus caller's unique name, as systemd-networkd and firewalld send it, or
a socket caller's process (pid and start time, taken when it connected): polkit
resolves either to the user and session itself. AllowUserInteraction lets
an authentication agent prompt the user (virt-manager's "enter your password").
Where polkit is not on the bus, or cannot answer, check() says None and the core
falls back to its own rule (root and group kvmnet).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from kvmnetd.model.records import Caller

log = structlog.get_logger("kvmnetd.polkit")

POLKIT = "org.freedesktop.PolicyKit1"
AUTHORITY_PATH = "/org/freedesktop/PolicyKit1/Authority"
AUTHORITY_IFACE = "org.freedesktop.PolicyKit1.Authority"
ALLOW_USER_INTERACTION = 0x1
# A person may be typing a password into the agent's prompt.
TIMEOUT = 120.0
# polkit is not there: the fallback rule applies, and nothing is worth a warning.
_ABSENT = ("org.freedesktop.DBus.Error.ServiceUnknown",
           "org.freedesktop.DBus.Error.NameHasNoOwner",
           "org.freedesktop.DBus.Error.NoReply",
           "org.freedesktop.DBus.Error.Disconnected")


def subject_of(caller: Caller) -> list[object] | None:
    """polkit's subject: the bus name, else the process (pid and start time), else none."""
    if caller.bus_name is not None:
        return ["system-bus-name", {"name": Variant("s", caller.bus_name)}]
    if caller.pid is not None and caller.start_time is not None:
        return ["unix-process", {"pid": Variant("u", caller.pid),
                                 "start-time": Variant("t", caller.start_time),
                                 "uid": Variant("i", caller.uid)}]
    return None


def check_message(subject: list[object], action: str, interactive: bool = True) -> Message:
    flags = ALLOW_USER_INTERACTION if interactive else 0
    return Message(destination=POLKIT, path=AUTHORITY_PATH, interface=AUTHORITY_IFACE,
                   member="CheckAuthorization", signature="(sa{sv})sa{ss}us",
                   body=[subject, action, {}, flags, ""])


class PolkitAuthority:
    def __init__(self, bus: Callable[[], MessageBus | None], timeout: float = TIMEOUT) -> None:
        self._bus = bus  # the daemon's current bus connection (it reconnects)
        self.timeout = timeout

    async def check(self, caller: Caller, action: str) -> bool | None:
        bus = self._bus()
        subject = subject_of(caller)
        if bus is None or subject is None:
            return None  # no bus, or nothing polkit could identify: the core's rule decides
        try:
            reply = await asyncio.wait_for(bus.call(check_message(subject, action)),
                                           self.timeout)
        except (TimeoutError, OSError, EOFError) as e:
            log.warning("polkit.no_answer", action=action, error=str(e) or type(e).__name__)
            return None
        if reply is None or reply.message_type is MessageType.ERROR:
            name = reply.error_name if reply is not None else "no reply"
            if name not in _ABSENT:
                # e.g. the action file is not installed: say so, use the fallback rule.
                log.warning("polkit.error", action=action, error=name,
                            message=str(reply.body[0]) if reply and reply.body else "")
            return None
        authorized, _challenge, _details = reply.body[0]
        log.info("polkit.checked", action=action, uid=caller.uid, authorized=bool(authorized))
        return bool(authorized)
