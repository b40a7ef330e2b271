"""Links, addresses and routes through rtnetlink: a mirror kept current from events, and writes."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Callable, Sequence

import structlog

from kvmnetd.adapters.rtnl import requests as raw
from kvmnetd.adapters.rtnl.decode import (
    IFADDRMSG,
    IFLA_EXT_MASK,
    IFLA_MASTER,
    IFLA_MTU,
    NDMSG,
    NLM_F_ACK,
    NLM_F_DUMP,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_GETNEIGH,
    RTM_GETROUTE,
    RTM_NEWLINK,
    RTMSG,
    LinkRec,
    PortRec,
    Record,
    kernel_error,
)
from kvmnetd.adapters.rtnl.mirror import Mirror
from kvmnetd.adapters.rtnl.requests import NetlinkFailure, attr_u32, ifinfo
from kvmnetd.adapters.rtnl.writes import ConfigWriter, exists_error, kind_of
from kvmnetd.model import actions as act
from kvmnetd.model.errors import Conflict, InvalidArgument, KvmnetError, NoSuchPort
from kvmnetd.model.observed import Link, ObservedState

log = structlog.get_logger(__name__)

RESYNC_BACKOFF = 1.0
IN_FLIGHT = 128  # requests sent before their acks are awaited: bounded by the reply buffer
_PIPELINED = (act.Enslave, act.SetUp, act.Release, act.SetMtu)


class NetlinkAdapter:
    def __init__(self) -> None:
        self.writes = 0  # mutating requests sent (refused ones included: they cost the same)
        self.resyncs = 0  # full re-reads after the kernel dropped events
        self.event_rcvbuf = raw.EVENT_RCVBUF
        self.observed = ObservedState()
        self._mirror = Mirror(self.observed)
        self._chan: raw.RequestChannel | None = None
        # Bridges, addresses, routes: a handful per network, through the same channel.
        self._cfg = ConfigWriter(self._write)
        self._events: raw.EventSocket | None = None
        # While a dump runs, events wait here and are replayed after it, in order.
        self._pending: list[Record] | None = None
        self._on_change: Callable[[], None] = lambda: None
        # Called with the links a read of events shows for the first time, together
        # (not for dumps).
        self.on_links_added: Callable[[list[Link]], None] | None = None
        # What events changed since take_changes(): link indexes, and whether anything else
        # (an address, a route, a re-read) did.
        self._changed: set[int] = set()
        self._changed_other = True
        self._dump_lock = asyncio.Lock()
        self._resync: asyncio.Task[None] | None = None
        self._resync_again = False
        self._following = (True, True)  # (port flags, fdb entries): what the sockets read

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self, on_change: Callable[[], None]) -> None:
        """Subscribe, dump, then follow events. Sockets live in the caller's network namespace."""
        self._on_change = on_change
        self._chan = raw.RequestChannel()
        self._following = (True, True)  # new sockets read everything
        self._events = raw.EventSocket(self._on_records, self._overflow,
                                       self.event_rcvbuf)
        await self._dump()

    async def refresh(self) -> None:
        await self._dump()
        self._notify()

    async def close(self) -> None:
        if self._resync is not None:
            self._resync.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._resync
            self._resync = None
        for sock in (self._events, self._chan):
            if sock is not None:
                sock.close()
        self._events = self._chan = None

    @property
    def chan(self) -> raw.RequestChannel:
        if self._chan is None:
            raise OSError(errno.EBADF, "the netlink adapter is not open")
        return self._chan

    # -- lookups -----------------------------------------------------------------------------

    async def tap_info(self, ifname: str) -> tuple[int | None, int | None] | None:
        """(owner uid, group gid) of a tun/tap, None when there is no such tun/tap.

        Read from the kernel each time: it announces no owner change on a tap that is down,
        and `ip tuntap add ... user U` sets the owner only after the creation event.
        The answer also refreshes the observed link.
        """
        link = await self._get(ifname)
        if link is None or link.kind != "tun":
            return None
        return link.tun_owner, link.tun_group

    async def _get(self, name: str) -> Link | None:
        """Ask the kernel; the answer also goes into the mirror."""
        try:
            records = await self.chan.get_link(name)
        except NetlinkFailure as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                return None
            raise kernel_error(exc.code, exc.reason, f"look up {name}") from exc
        link = None
        for rec in records:
            if isinstance(rec, LinkRec):
                link = rec.link
            if self._pending is not None:
                self._pending.append(rec)
            elif self._mirror.apply(rec):
                self._changed_other = True
                self._notify()
        return link

    # -- events ------------------------------------------------------------------------------

    async def _dump(self) -> None:
        skip_stats = attr_u32(IFLA_EXT_MASK, raw.RTEXT_FILTER_SKIP_STATS)
        async with self._dump_lock:
            self._pending = []
            try:
                records = await self.chan.request(RTM_GETLINK, NLM_F_DUMP, ifinfo() + skip_stats)
                # AF_UNSPEC: every family; the decoder keeps IPv4 and IPv6.
                records += await self.chan.request(RTM_GETADDR, NLM_F_DUMP,
                                                   IFADDRMSG.pack(0, 0, 0, 0, 0))
                records += await self.chan.request(RTM_GETROUTE, NLM_F_DUMP,
                                                   RTMSG.pack(0, 0, 0, 0, 0, 0, 0, 0, 0))
                # Bridge-family fdb: the mirror keeps the VXLAN devices' entries; IPv4
                # neighbours: the bridges' ones.
                for family in (socket.AF_BRIDGE, socket.AF_INET):
                    records += await self.chan.request(RTM_GETNEIGH, NLM_F_DUMP,
                                                       NDMSG.pack(family, 0, 0, 0, 0))
                self._mirror.load(records)
            finally:
                # Replayed even when the dump failed: the old state plus every event stays right.
                self._changed_other = True
                pending, self._pending = self._pending, None
                for rec in pending:
                    self._mirror.apply(rec)

    def _on_records(self, records: list[Record]) -> None:
        if self._pending is not None:
            self._pending.extend(records)
            return
        changed = False
        apply, links = self._mirror.apply, self.observed.links
        added: list[int] = []
        for rec in records:
            if isinstance(rec, LinkRec):
                if rec.new and rec.link.index not in links:
                    added.append(rec.link.index)
                if apply(rec):
                    self._changed.add(rec.link.index)
                    changed = True
            elif isinstance(rec, PortRec):
                if apply(rec):
                    self._changed.add(rec.ifindex)
                    changed = True
            elif apply(rec):
                self._changed_other = changed = True
        if added and self.on_links_added is not None:
            # As the whole batch left them.
            born = [link for index in added if (link := links.get(index)) is not None]
            try:
                self.on_links_added(born)
            except Exception:
                log.exception("on_links_added callback failed")
        if changed:
            self._notify()

    def follow(self, port_flags: bool, fdb: bool) -> None:
        """Which optional kernel news to follow: bridge ports' flags (isolated,
        neigh_suppress) and fdb entries. Each enslave brings four such messages, most of
        what a burst of new taps costs to read, so they are followed only while a network
        needs them. What stops being followed reads as unknown; what starts is read anew."""
        before = self._following
        if self._events is None or self._chan is None or before == (port_flags, fdb):
            return
        self._following = (port_flags, fdb)
        self._events.follow(port_flags, fdb)
        self._chan.port_flags = port_flags
        if before[0] and not port_flags:
            self._mirror.forget_port_flags()
        if before[1] and not fdb:
            self._mirror.forget_fdb()
        if (port_flags and not before[0]) or (fdb and not before[1]):
            self._reread()

    def events_pending(self) -> bool:
        """Kernel events not yet read: the mirror may still show a passing state."""
        return self._events is not None and self._events.pending()

    def take_changes(self) -> tuple[set[int], bool]:
        """(link indexes changed, anything else changed) since the last call."""
        out = (self._changed, self._changed_other)
        self._changed, self._changed_other = set(), False
        return out

    def _overflow(self) -> None:
        log.warning("netlink events lost; re-reading all links")
        self.resyncs += 1
        self._reread()

    def _reread(self) -> None:
        """A full re-read in the background (events that arrive meanwhile are replayed)."""
        if self._resync is not None and not self._resync.done():
            self._resync_again = True
            return
        self._resync = asyncio.get_running_loop().create_task(self._resync_loop(),
                                                              name="netlink-resync")

    async def _resync_loop(self) -> None:
        self._resync_again = True
        while self._resync_again:
            self._resync_again = False
            try:
                await self.refresh()
            except Exception as exc:
                log.error("netlink resync failed; retrying", error=str(exc))
                self._resync_again = True
                await asyncio.sleep(RESYNC_BACKOFF)

    def _notify(self) -> None:
        try:
            self._on_change()
        except Exception:
            log.exception("on_change callback failed")

    # -- writes ------------------------------------------------------------------------------

    async def apply_many(self, actions: Sequence[act.Action],
                         sent: Callable[[], None] | None = None,
                         waited: bool = True) -> list[BaseException | None]:
        """Apply in order; runs of port actions are sent together and their acks collected
        after. One result per action: None, or the error apply() would have raised.

        sent: called once every request has gone out, before their acks are read, so a
        caller may plan and send the next batch while the kernel works on this one."""
        if len(actions) == 1 and isinstance(actions[0], act.Enslave):
            # The common case, a new tap: the same request as below, without the batch's
            # bookkeeping, which would cost about as much again on the loop.
            tap = actions[0]
            master = self._mirror.by_name.get(tap.bridge)
            if master is not None:
                ack = self._start_enslave(tap, master, background=not waited)
                if sent is not None:
                    sent()
                try:
                    await ack
                except Exception as exc:
                    return [exc]
                return [None]
        results: list[BaseException | None] = [None] * len(actions)
        remaining = len(actions)

        def started() -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0 and sent is not None:
                sent()

        async def one(i: int) -> None:
            pending = True
            try:
                action = actions[i]
                if isinstance(action, act.Enslave):
                    # A burst of new taps: queued for the request channel's own thread,
                    # so the loop goes straight on to the next taps' events.
                    master = await self._index(action.bridge, _attach(action))
                    ack = self._start_enslave(action, master, background=True)
                    pending = False
                    started()
                    await ack
                else:
                    # Its request goes out in apply()'s first step, before any other
                    # task runs: counted as sent now.
                    pending = False
                    started()
                    await self.apply(action)
            except Exception as exc:
                results[i] = exc
            finally:
                if pending:
                    started()

        if not actions and sent is not None:
            sent()
        batch: list[int] = []  # pipelined, sent by their own tasks
        acks: list[tuple[int, asyncio.Future[None]]] = []  # enslaves sent right here

        async def flush() -> None:
            await asyncio.gather(*(one(j) for j in batch))
            batch.clear()
            for j, ack in acks:
                try:
                    await ack
                except Exception as exc:
                    results[j] = exc
            acks.clear()

        for i, action in enumerate(actions):
            if len(batch) + len(acks) >= IN_FLIGHT:
                await flush()
            master = (self._mirror.by_name.get(action.bridge)
                      if isinstance(action, act.Enslave) and not batch else None)
            if master is not None:
                # Sent before this returns to the loop: a tap's enslave waits for no
                # other callback (a burst of events being read) to run first.
                assert isinstance(action, act.Enslave)
                # One alone that a caller waits for (an API call) goes out from here:
                # the sender thread would cost a wake-up. Nobody waiting (a new tap,
                # maybe of a burst): the sender thread takes it, or the loop would wait
                # in the kernel while the tool making the taps holds the rtnl lock,
                # instead of reading the next taps' events.
                background = len(actions) > 1 or not waited
                acks.append((i, self._start_enslave(action, master, background)))
                started()
            elif isinstance(action, _PIPELINED):
                batch.append(i)
            else:
                await flush()
                await one(i)
        await flush()
        return results

    async def apply(self, action: act.Action) -> None:
        """Apply one action. When the kernel acknowledges it, the mirror is updated from what
        the request did: the next plan must not wait for the events."""
        mirror = self._mirror
        match action:
            case act.CreateBridge():
                await self._create_bridge(action)
            case act.SetBridgeOptions():
                await self._cfg.stp_and_delay(action)
                mirror.update_link(action.bridge, stp=action.stp,
                                   forward_delay=action.forward_delay)
            case act.SetMtu(ifname=name, mtu=mtu):
                await self._set_link(f"set mtu {mtu} on {name}", name, attr_u32(IFLA_MTU, mtu))
                mirror.update_link(name, mtu=mtu)
            case act.SetUp(ifname=name):
                await self._set_link(f"bring up {name}", name, up=True)
                mirror.update_link(name, up=True)
            case act.Enslave():
                await self._enslave(action)
            case act.SetIsolated(ifname=name, isolated=isolated):
                await self._cfg.port_isolated(name, isolated)
                mirror.update_link(name, isolated=isolated)
            case act.Release(ifname=name):
                await self._set_link(f"detach {name} from its bridge", name,
                                     attr_u32(IFLA_MASTER, 0))
                mirror.update_link(name, master=None, isolated=None)
            case act.AddAddress() | act.RemoveAddress():
                index = await self._address(action)
                if index is not None:
                    mirror.set_address(index, action.address, isinstance(action, act.AddAddress))
            case act.AddRoute() | act.RemoveRoute():
                # No mirror update: the kernel fills in proto and scope; its event is the copy.
                await self._route(action)
            case act.DeleteBridge(bridge=name):
                index = await self._delete_bridge(name)
                mirror.apply_deleted(index)
            case act.CreateVxlan():
                await self._create_vxlan(action)
            case act.AttachVxlan(ifname=name, bridge=bridge):
                master = await self._index(bridge, f"attach {name} to bridge {bridge}")
                await self._set_link(f"attach {name} to bridge {bridge}", name,
                                     attr_u32(IFLA_MASTER, master))
                mirror.update_link(name, master=master)
            case act.SetNeighSuppress(ifname=name, on=on):
                await self._cfg.neigh_suppress(name, on)
                mirror.update_link(name, neigh_suppress=on)
            case act.SetBridgeNeighbours(bridge=name):
                await self._cfg.bridge_neighbours(name)
                mirror.update_link(name, arp_accept=True, addrgenmode=1)
            case act.SetLinkLocalOff(ifname=name):
                await self._cfg.link_local_off(name)
                mirror.update_link(name, addrgenmode=1)
            case act.SetMac(ifname=name, mac=mac):
                await self._cfg.mac(name, mac)
                mirror.update_link(name, mac=mac)
            case act.AddFlood(ifname=name, dst=dst) | act.RemoveFlood(ifname=name, dst=dst):
                adding = isinstance(action, act.AddFlood)
                what = f"{'add' if adding else 'remove'} flood entry to {dst} on {name}"
                index = await self._index(name, what)
                try:
                    await self._cfg.flood(what, index, dst, adding)
                except KvmnetError as exc:
                    # Already so: the goal holds.
                    if getattr(exc.__cause__, "code", None) not in (errno.EEXIST, errno.ENOENT):
                        raise
                mirror.set_fdb(index, "00:00:00:00:00:00", dst, adding)
            case act.DeleteVxlan(ifname=name):
                link = self._mirror.link(name) or await self._get(name)
                if link is not None:
                    what = f"delete VXLAN device {name}"
                    if link.kind != "vxlan":
                        raise Conflict(f"{what}: refusing, {name} is {kind_of(link)}")
                    await self._cfg.delete_link(what, link.index)
                    mirror.apply_deleted(link.index)
            case _:
                name = type(action).__name__
                raise InvalidArgument(f"the netlink adapter does not handle {name}")

    async def _enslave(self, action: act.Enslave, background: bool = False) -> None:
        master = await self._index(action.bridge, _attach(action))
        await self._start_enslave(action, master, background)

    def _start_enslave(self, action: act.Enslave, master: int,
                       background: bool) -> asyncio.Future[None]:
        name = action.ifname
        self.writes += 1
        # One request: a port moved between bridges never goes down.
        sent = self.chan.start(RTM_NEWLINK, NLM_F_ACK,
                               raw.set_link(name, attr_u32(IFLA_MASTER, master), up=True),
                               background=background)
        out: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def acked(f: asyncio.Future[list[Record]]) -> None:
            if f.cancelled():
                out.cancel()
            elif (exc := f.exception()) is None:
                # A port joining a bridge starts without isolation; the plan sets it after.
                # Unless port flags are followed, the flag stays unknown, as its events say.
                old = self._mirror.link(name)
                moved = old is None or old.master != master
                reset = {"isolated": False} if moved and self._following[0] else {}
                self._mirror.update_link(name, master=master, up=True, **reset)
                out.set_result(None)
            elif isinstance(exc, NetlinkFailure):
                err = kernel_error(exc.code, exc.reason, _attach(action))
                err.__cause__ = exc
                out.set_exception(err)
            else:
                out.set_exception(exc)

        sent.add_done_callback(acked)
        return out

    async def _write(self, what: str, kind: int, flags: int, body: bytes) -> None:
        self.writes += 1
        try:
            await self.chan.request(kind, flags | NLM_F_ACK, body)
        except NetlinkFailure as exc:
            raise kernel_error(exc.code, exc.reason, what) from exc

    async def _set_link(self, what: str, name: str, attrs: bytes = b"",
                        up: bool = False) -> None:
        await self._write(what, RTM_NEWLINK, 0, raw.set_link(name, attrs, up))

    async def _index(self, name: str, what: str) -> int:
        index = self._mirror.by_name.get(name)
        if index is not None:
            return index
        # Not seen yet (its event may still be queued): ask the kernel.
        link = await self._get(name)
        if link is None:
            raise NoSuchPort(f"{what}: there is no link named {name}")
        return link.index

    async def _create_bridge(self, a: act.CreateBridge) -> None:
        what = f"create bridge {a.bridge}"
        existing = self._mirror.link(a.bridge)
        if existing is not None:
            raise exists_error(what, existing)
        try:
            await self._cfg.create_bridge(what, a.bridge, a.mtu, a.mac)
        except Conflict:
            existing = await self._get(a.bridge)
            if existing is not None:
                raise exists_error(what, existing) from None
            raise
        await self._get(a.bridge)  # its index, for the ports that follow

    async def _create_vxlan(self, a: act.CreateVxlan) -> None:
        what = f"create VXLAN device {a.ifname} (VNI {a.vni})"
        existing = self._mirror.link(a.ifname)
        if existing is not None:
            raise Conflict(f"{what}: {a.ifname} already exists and is {kind_of(existing)}")
        await self._cfg.create_vxlan(what, a.ifname, a.vni, a.local, a.port, a.mtu)
        await self._get(a.ifname)

    async def _address(self, a: act.AddAddress | act.RemoveAddress) -> int | None:
        """The link's index once the kernel holds the goal."""
        adding = isinstance(a, act.AddAddress)
        what = f"{'add' if adding else 'remove'} address {a.address} {'on' if adding else 'from'} "
        what += a.ifname
        index = await self._index(a.ifname, what)
        try:
            await self._cfg.address(what, index, a.address, adding)
        except KvmnetError as exc:
            # Already so (a late event made us plan it twice): the goal holds.
            code = getattr(exc.__cause__, "code", None)
            if code not in (errno.EEXIST, errno.EADDRNOTAVAIL):
                raise
        return index

    async def _route(self, a: act.AddRoute | act.RemoveRoute) -> None:
        adding = isinstance(a, act.AddRoute)
        r = a.route
        what = f"{'add' if adding else 'remove'} route {r.dst}"
        what += f" via {r.gateway}" if r.gateway else ""
        what += f" dev {a.ifname}"
        index = await self._index(a.ifname, what)
        await self._cfg.route(what, index, r, adding)

    async def _delete_bridge(self, name: str) -> int:
        what = f"delete bridge {name}"
        link = self._mirror.link(name) or await self._get(name)
        if link is None:
            raise NoSuchPort(f"{what}: there is no link named {name}")
        if link.kind != "bridge":
            raise Conflict(f"{what}: refusing, {name} is {kind_of(link)}, not a bridge")
        await self._cfg.delete_link(what, link.index)
        return link.index


def _attach(action: act.Enslave) -> str:
    return f"attach {action.ifname} to bridge {action.bridge}"
