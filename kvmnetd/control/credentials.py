"""Who is calling: uid from the bus daemon or from SO_PEERCRED, groups from the user database."""

from __future__ import annotations

import asyncio
import os
import pwd
import socket
import struct
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from kvmnetd.model.errors import PermissionDenied
from kvmnetd.model.records import Caller

_UCRED = struct.Struct("3i")  # pid, uid, gid
_CACHE_LIMIT = 4096


def groups_of(uid: int) -> tuple[int, ...]:
    """Groups of the uid's account; an unknown uid has none (not even its own gid)."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return ()
    try:
        return tuple(sorted(set(os.getgrouplist(entry.pw_name, entry.pw_gid))))
    except OSError:
        return (entry.pw_gid,)




def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (after the parenthesised command, which may hold spaces)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def caller_from_socket(sock: socket.socket) -> Caller:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, _gid = _UCRED.unpack(raw)
    if uid == 0:
        # Root may do everything: neither its groups nor polkit's subject are ever read
        # (the qemu hooks connect once per guest start; the user database costs each).
        return Caller(uid=0, pid=pid or None)
    # Read at connect time: the pid names this process only while it lives.
    start = process_start_time(pid) if pid else None
    return Caller(uid=uid, gids=groups_of(uid), pid=pid or None, start_time=start)


class BusCallers:
    """Resolves unique bus names to callers once each; concurrent first calls share one lookup."""

    def __init__(self) -> None:
        self._known: dict[str, Caller] = {}
        self._pending: dict[str, asyncio.Future[Caller]] = {}

    def forget(self, unique_name: str) -> None:
        self._known.pop(unique_name, None)

    def clear(self) -> None:
        self._known.clear()

    def on_message(self, msg: Message) -> None:
        # A unique name is never reused on one bus; dropping it keeps the cache small.
        if (msg.message_type is MessageType.SIGNAL and msg.member == "NameOwnerChanged"
                and msg.sender == "org.freedesktop.DBus" and len(msg.body) == 3
                and msg.body[2] == "" and str(msg.body[0]).startswith(":")):
            self.forget(msg.body[0])

    async def resolve(self, bus: MessageBus, sender: str) -> Caller:
        if (known := self._known.get(sender)) is not None:
            return known
        if (pending := self._pending.get(sender)) is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Caller] = asyncio.get_running_loop().create_future()
        self._pending[sender] = fut
        try:
            caller = await _lookup(bus, sender)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()  # retrieved: waiters, if any, get it through shield
            raise
        finally:
            self._pending.pop(sender, None)
        fut.set_result(caller)
        if len(self._known) >= _CACHE_LIMIT:
            self._known.clear()
        self._known[sender] = caller
        return caller


async def _dbus_call(bus: MessageBus, member: str, sender: str) -> Message:
    return await bus.call(Message(
        destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus", member=member, signature="s", body=[sender]))


async def _lookup(bus: MessageBus, sender: str) -> Caller:
    reply = await _dbus_call(bus, "GetConnectionCredentials", sender)
    if reply.message_type is MessageType.METHOD_RETURN:
        creds: dict[str, Any] = reply.body[0]
        uid_v = creds.get("UnixUserID")
        pid_v = creds.get("ProcessID")
        if uid_v is not None:
            uid = int(uid_v.value)
            pid = int(pid_v.value) if pid_v is not None else None
            return Caller(uid=uid, gids=groups_of(uid), pid=pid, bus_name=sender)
    # Older or foreign bus daemons: the narrower call every daemon has.
    reply = await _dbus_call(bus, "GetConnectionUnixUser", sender)
    if reply.message_type is not MessageType.METHOD_RETURN:
        raise PermissionDenied(f"cannot identify bus peer {sender}: {reply.error_name}")
    uid = int(reply.body[0])
    return Caller(uid=uid, gids=groups_of(uid), bus_name=sender)


NAME_OWNER_MATCH = (
    "type='signal',sender='org.freedesktop.DBus',path='/org/freedesktop/DBus',"
    "interface='org.freedesktop.DBus',member='NameOwnerChanged',arg2=''"
)
