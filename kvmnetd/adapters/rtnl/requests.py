"""Raw rtnetlink sockets: an event subscription and a request channel that matches replies
to requests by sequence number, so many requests can be in flight at once."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import queue
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmnetd.adapters.rtnl.bpf import attach_filter, event_filter
from kvmnetd.adapters.rtnl.decode import (
    IFF_UP,
    IFINFOMSG,
    IFLA_EXT_MASK,
    IFLA_IFNAME,
    NLM_F_MULTI,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSGERR,
    NLMSGHDR,
    RTA,
    RTM_GETLINK,
    RTM_NEWLINK,
    Record,
    decode,
    decode_all,
    decode_error,
    messages,
)

RTMGRP_LINK = 0x1
RTMGRP_NEIGH = 0x4  # only fdb and IPv4 entries pass the filter below
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
GROUPS = (RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR
          | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE)

SOL_NETLINK = 270
NETLINK_CAP_ACK, NETLINK_EXT_ACK = 10, 11
SO_RCVBUFFORCE = 33
RTEXT_FILTER_SKIP_STATS = 1 << 3  # dumps and gets: the counters are most of a link message

EVENT_RCVBUF = 8 << 20
REQUEST_RCVBUF = 4 << 20
RECV_SIZE = 1 << 17  # a dump datagram is at most 32 KiB; multicast ones are single messages
SEND_BATCH = 64  # requests per datagram; far below the socket's send buffer
SEND_NICE = -10



class NetlinkFailure(OSError):
    """The kernel refused a request; `reason` is its extended ack, if it gave one."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason or errno.errorcode.get(code, str(code)))
        self.code = code
        self.reason = reason


def attr(kind: int, payload: bytes) -> bytes:
    out = RTA.pack(4 + len(payload), kind) + payload
    return out + bytes(-len(out) % 4)


def attr_u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("=I", value))


def attr_str(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def ifinfo(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)


def set_link(name: str, attrs: bytes = b"", up: bool = False) -> bytes:
    # By name (index 0): the action names the device, and a stale index must not hit another.
    flags = IFF_UP if up else 0
    return ifinfo(0, flags, flags) + attr_str(IFLA_IFNAME, name) + attrs


def _newly_registered(buf: bytearray, start: int) -> bool:
    # ifi_change is ~0 only in the message announcing a device's registration.
    return buf[start + 12:start + 16] == b"\xff\xff\xff\xff"


def open_socket(groups: int, rcvbuf: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK,
                         socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                         socket.NETLINK_ROUTE)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:  # not root: capped by net.core.rmem_max
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((0, groups))
    except BaseException:
        sock.close()
        raise
    return sock


class EventSocket:
    """The multicast groups, read from the event loop. `on_records` gets each batch decoded,
    what announces new devices before the rest read with it (each device's own news stays
    in order); `on_overflow` is called when the kernel dropped events (ENOBUFS): the stream
    has a gap."""

    def __init__(self, on_records: Callable[[list[Record]], None],
                 on_overflow: Callable[[], None], rcvbuf: int = EVENT_RCVBUF) -> None:
        self.sock = open_socket(GROUPS, rcvbuf)
        self.port_flags = True
        attach_filter(self.sock, event_filter(True, True))
        self._buf = bytearray(RECV_SIZE)
        self._on_records = on_records
        self._on_overflow = on_overflow
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._readable)

    def follow(self, port_flags: bool, fdb: bool) -> None:
        """Which optional events to receive and decode (see event_filter)."""
        attach_filter(self.sock, event_filter(port_flags, fdb))
        self.port_flags = port_flags

    def pending(self) -> bool:
        """Events are waiting to be read: what was read so far may be behind the kernel."""
        try:
            return bool(self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True  # ENOBUFS: events were lost; the resync that follows catches up

    def _readable(self) -> None:
        born: list[bytearray] = []
        rest: list[bytearray] = []
        buf, port_flags = self._buf, self.port_flags
        # Bounded per wake-up so a flood cannot starve the rest of the loop.
        for _ in range(256):
            try:
                size = self.sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self._on_overflow()
                continue
            # A device registered (all its flags "changed"): new taps are handed on
            # first, together, before the news about known devices read with them is
            # decoded. A loop that falls behind in a burst of taps then plans the taps
            # waiting in one pass, and no tap waits for the echoes of earlier ones.
            announces = any(kind == RTM_NEWLINK and _newly_registered(buf, start)
                            for kind, _, _, start, _ in messages(buf, size))
            (born if announces else rest).append(buf[:size])
        for group in (born, rest):
            records = [rec for data in group for rec in decode_all(data, len(data), port_flags)]
            if records:
                self._on_records(records)

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


@dataclass
class _Waiter:
    future: asyncio.Future[list[Record]]
    records: list[Record] = field(default_factory=list)


class RequestChannel:
    """Requests and their replies. Each request gets its own sequence number; the kernel
    handles a socket's requests in the order they were sent.

    The kernel carries out a request inside send(): ~0.3 ms for an enslave, more while
    another process holds the rtnl lock. Requests asked to go in the background (new taps'
    enslaves, during a burst) are sent by a thread of their own, so the event loop goes on
    reading events meanwhile. The others are sent at once from the loop, which saves the
    thread hand-off, unless background ones are still queued: order is kept.
    """

    def __init__(self, rcvbuf: int = REQUEST_RCVBUF) -> None:
        self.sock = open_socket(0, rcvbuf)
        for opt in (NETLINK_EXT_ACK, NETLINK_CAP_ACK):
            with contextlib.suppress(OSError):
                self.sock.setsockopt(SOL_NETLINK, opt, 1)
        self._buf = bytearray(RECV_SIZE)
        self.port_flags = True  # decode dumps and replies as the event socket does
        self._seq = itertools.count(1)
        self._waiting: dict[int, _Waiter] = {}
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._readable)
        self._outbox: queue.SimpleQueue[tuple[int, bytes] | None] = queue.SimpleQueue()
        self._queued = 0  # written by the loop only
        self._sent = 0  # written by the sender only
        self._sender = threading.Thread(target=self._send_loop, name="netlink-send",
                                        daemon=True)
        self._sender.start()

    async def request(self, kind: int, flags: int, body: bytes) -> list[Record]:
        """Send one request; its reply records once acknowledged (or done, for a dump).
        Raises NetlinkFailure when the kernel refuses it."""
        return await self.start(kind, flags, body)

    def start(self, kind: int, flags: int, body: bytes, *,
              background: bool = False) -> asyncio.Future[list[Record]]:
        """request(), as a future: sent, or queued for sending, before this returns."""
        seq = next(self._seq) & 0xFFFFFFFF
        header = NLMSGHDR.pack(16 + len(body), kind, NLM_F_REQUEST | flags, seq, 0)
        future: asyncio.Future[list[Record]] = self._loop.create_future()
        self._waiting[seq] = _Waiter(future)
        future.add_done_callback(lambda _: self._waiting.pop(seq, None))
        if not self._sender.is_alive():
            future.set_exception(OSError(errno.EBADF, "netlink socket closed"))
        elif background or self._sent != self._queued:
            self._queued += 1
            self._outbox.put((seq, header + body))
        else:
            try:
                self.sock.send(header + body)
            except OSError as exc:
                future.set_exception(OSError(exc.errno, exc.strerror))
            else:
                # The kernel ran the request inside send(): its ack is already queued.
                # Read it now, so its caller goes on before the loop decodes the burst
                # of events the request caused.
                self._readable()
        return future

    def _send_loop(self) -> None:
        # When a tool creates taps in a burst, it and this thread take turns on the rtnl
        # lock; at normal priority the tool wins most turns and the enslaves pile up
        # behind it. The thread only ever waits in the kernel, so raising it costs others
        # little. Needs CAP_SYS_NICE; without it, normal priority.
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SEND_NICE)
        while (item := self._outbox.get()) is not None:
            batch = [item]
            # What queued up meanwhile goes in the same datagram: the kernel runs its
            # messages one after another without this thread sleeping on the rtnl lock
            # in between (each still gets its own ack).
            while len(batch) < SEND_BATCH:
                try:
                    more = self._outbox.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._outbox.put(None)
                    break
                batch.append(more)
            try:
                self.sock.send(b"".join(data for _, data in batch))
            except OSError as exc:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    for seq, _ in batch:
                        self._loop.call_soon_threadsafe(self._send_failed, seq, exc)
            self._sent += len(batch)

    def _send_failed(self, seq: int, exc: OSError) -> None:
        waiter = self._waiting.get(seq)
        if waiter is not None and not waiter.future.done():
            waiter.future.set_exception(OSError(exc.errno, exc.strerror))

    async def get_link(self, name: str) -> list[Record]:
        body = ifinfo() + attr_str(IFLA_IFNAME, name)
        return await self.request(RTM_GETLINK, 0,
                                  body + attr_u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS))

    def _readable(self) -> None:
        buf = self._buf
        for _ in range(256):
            try:
                size = self.sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Replies were dropped: nobody can tell whose, so every waiter fails.
                for waiter in self._waiting.values():
                    if not waiter.future.done():
                        waiter.future.set_exception(OSError(exc.errno, exc.strerror))
                if exc.errno != errno.ENOBUFS:
                    raise
                continue
            for kind, flags, seq, start, end in messages(buf, size):
                self._reply(buf, kind, flags, seq, start, end)

    def _reply(self, buf: bytearray, kind: int, flags: int, seq: int, start: int,
               end: int) -> None:
        waiter = self._waiting.get(seq)
        if waiter is None or waiter.future.done():
            return  # its requester was cancelled
        if kind == NLMSG_ERROR:
            code, reason = decode_error(buf, flags, start, end)
            if code:
                waiter.future.set_exception(NetlinkFailure(code, reason))
            else:
                waiter.future.set_result(waiter.records)
        elif kind == NLMSG_DONE:
            code = -NLMSGERR.unpack_from(buf, start)[0] if end - start >= 4 else 0
            if code > 0:
                waiter.future.set_exception(NetlinkFailure(code))
            else:
                waiter.future.set_result(waiter.records)
        else:
            rec = decode(kind, flags, buf, start, end, self.port_flags)
            if rec is not None:
                waiter.records.append(rec)
            if not flags & NLM_F_MULTI:
                waiter.future.set_result(waiter.records)  # a get's single answer

    def close(self) -> None:
        self._outbox.put(None)
        self._sender.join(5)
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for waiter in list(self._waiting.values()):
            if not waiter.future.done():
                waiter.future.set_exception(OSError(errno.EBADF, "netlink socket closed"))
