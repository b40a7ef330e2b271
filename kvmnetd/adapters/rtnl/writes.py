"""Configuration writes: bridges, addresses, routes, encoded for the request channel.

These are few (a handful per network) and go through the same raw netlink channel as
the high-rate work (events and port enslaving), so kvmnetd has one netlink stack.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable

from kvmnetd.adapters.rtnl.decode import (
    IFA_ADDRESS,
    IFA_BROADCAST,
    IFA_F_NODAD,
    IFA_LOCAL,
    IFADDRMSG,
    IFLA_ADDRESS,
    IFLA_AF_SPEC,
    IFLA_BR_FORWARD_DELAY,
    IFLA_BR_STP_STATE,
    IFLA_BRPORT_ISOLATED,
    IFLA_BRPORT_NEIGH_SUPPRESS,
    IFLA_IFNAME,
    IFLA_INET6_ADDR_GEN_MODE,
    IFLA_INET_CONF,
    IFLA_INFO_DATA,
    IFLA_INFO_KIND,
    IFLA_INFO_SLAVE_DATA,
    IFLA_INFO_SLAVE_KIND,
    IFLA_LINKINFO,
    IFLA_MTU,
    IFLA_VXLAN_ID,
    IFLA_VXLAN_LEARNING,
    IFLA_VXLAN_LOCAL,
    IFLA_VXLAN_PORT,
    IPV4_DEVCONF_ARP_ACCEPT,
    MAIN_TABLE,
    NDA_DST,
    NDA_LLADDR,
    NDMSG,
    NLM_F_APPEND,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NTF_SELF,
    NUD_PERMANENT,
    RTA_DST,
    RTA_GATEWAY,
    RTA_OIF,
    RTA_PRIORITY,
    RTA_TABLE,
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELNEIGH,
    RTM_DELROUTE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    RTMSG,
    RTN_UNICAST,
    RTPROT_STATIC,
    USER_HZ,
)
from kvmnetd.adapters.rtnl.requests import attr, attr_str, attr_u32, ifinfo, set_link
from kvmnetd.model.actions import SetBridgeOptions
from kvmnetd.model.errors import Conflict, InvalidArgument, KvmnetError
from kvmnetd.model.observed import IPInterface, Link, Route

STP_DELAY_RANGE = range(2, 31)  # seconds the kernel accepts while STP is on

# (what, message type, flags, body) -> sent with an ack; a refusal raises a typed error.
Write = Callable[[str, int, int, bytes], Awaitable[None]]


def _bridge_info(stp: int | None, delay: int | None) -> bytes:
    data = b""
    if delay is not None:
        data += attr_u32(IFLA_BR_FORWARD_DELAY, delay)
    if stp is not None:
        data += attr_u32(IFLA_BR_STP_STATE, stp)
    return attr(IFLA_LINKINFO, attr_str(IFLA_INFO_KIND, "bridge") + attr(IFLA_INFO_DATA, data))


def _ip(value: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    return ipaddress.ip_address(value).packed


class ConfigWriter:
    def __init__(self, write: Write) -> None:
        self._write = write

    async def create_bridge(self, what: str, name: str, mtu: int | None,
                            mac: str | None) -> None:
        # STP off and no delay: a bridge without a physical port cannot loop, and a
        # guest's port should forward at once. It stays down until SetUp.
        body = ifinfo() + attr_str(IFLA_IFNAME, name)
        if mtu is not None:
            body += attr_u32(IFLA_MTU, mtu)
        if mac is not None:
            body += attr(IFLA_ADDRESS, bytes.fromhex(mac.replace(":", "")))
        body += _bridge_info(stp=0, delay=0)
        await self._write(what, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)

    async def bridge_options(self, what: str, name: str, stp: int | None = None,
                             delay: int | None = None) -> None:
        await self._write(what, RTM_NEWLINK, 0, set_link(name, _bridge_info(stp, delay)))

    async def create_vxlan(self, what: str, name: str, vni: int, local: str, port: int,
                           mtu: int | None) -> None:
        # Learning off: in static mode the flood list names the peers and the bridge learns
        # remote MACs on this port; with EVPN, FRR installs them.
        data = (attr_u32(IFLA_VXLAN_ID, vni) + attr(IFLA_VXLAN_LOCAL, _ip(local))
                + attr(IFLA_VXLAN_LEARNING, b"\0") + attr(IFLA_VXLAN_PORT, port.to_bytes(2, "big")))
        body = ifinfo() + attr_str(IFLA_IFNAME, name)
        if mtu is not None:
            body += attr_u32(IFLA_MTU, mtu)
        body += attr(IFLA_LINKINFO, attr_str(IFLA_INFO_KIND, "vxlan") + attr(IFLA_INFO_DATA, data))
        await self._write(what, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)

    async def neigh_suppress(self, name: str, on: bool) -> None:
        what = f"set neigh_suppress {'on' if on else 'off'} on {name}"
        data = attr(IFLA_BRPORT_NEIGH_SUPPRESS, bytes([int(on)]))
        info = attr(IFLA_LINKINFO, attr_str(IFLA_INFO_SLAVE_KIND, "bridge")
                    + attr(IFLA_INFO_SLAVE_DATA, data))
        await self._write(what, RTM_NEWLINK, 0, set_link(name, info))

    async def bridge_neighbours(self, name: str) -> None:
        """arp_accept on, and no IPv6 link-local address generation (addrgenmode none)."""
        what = f"set arp_accept and addrgenmode none on {name}"
        inet = attr(IFLA_INET_CONF, attr_u32(IPV4_DEVCONF_ARP_ACCEPT, 1))
        inet6 = attr(IFLA_INET6_ADDR_GEN_MODE, b"\x01")
        spec = attr(socket.AF_INET, inet) + attr(socket.AF_INET6, inet6)
        await self._write(what, RTM_NEWLINK, 0, set_link(name, attr(IFLA_AF_SPEC, spec)))

    async def link_local_off(self, name: str) -> None:
        inet6 = attr(IFLA_INET6_ADDR_GEN_MODE, b"\x01")
        await self._write(f"set addrgenmode none on {name}", RTM_NEWLINK, 0,
                          set_link(name, attr(IFLA_AF_SPEC, attr(socket.AF_INET6, inet6))))

    async def mac(self, name: str, mac: str) -> None:
        await self._write(f"set MAC {mac} on {name}", RTM_NEWLINK, 0,
                          set_link(name, attr(IFLA_ADDRESS, bytes.fromhex(mac.replace(":", "")))))

    async def flood(self, what: str, index: int, dst: str, adding: bool) -> None:
        """The all-zero fdb entry towards `dst` on a VXLAN device (`bridge fdb append`)."""
        body = NDMSG.pack(socket.AF_BRIDGE, index, NUD_PERMANENT, NTF_SELF, 0)
        body += attr(NDA_LLADDR, bytes(6)) + attr(NDA_DST, _ip(dst))
        if adding:
            await self._write(what, RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_APPEND, body)
        else:
            await self._write(what, RTM_DELNEIGH, 0, body)

    async def port_isolated(self, name: str, isolated: bool) -> None:
        # As `ip link set NAME type bridge_slave isolated on|off`: by name, and unlike the
        # AF_BRIDGE RTM_SETLINK of `bridge link set` the kernel also announces it as an
        # ordinary RTM_NEWLINK carrying the port's flags.
        what = f"set bridge port isolation {'on' if isolated else 'off'} on {name}"
        data = attr(IFLA_BRPORT_ISOLATED, bytes([int(isolated)]))
        info = attr(IFLA_LINKINFO, attr_str(IFLA_INFO_SLAVE_KIND, "bridge")
                    + attr(IFLA_INFO_SLAVE_DATA, data))
        await self._write(what, RTM_NEWLINK, 0, set_link(name, info))

    async def stp_and_delay(self, a: SetBridgeOptions) -> None:
        what = (f"set stp {'on' if a.stp else 'off'} and forward delay {a.forward_delay} s "
                f"on bridge {a.bridge}")
        if a.stp and a.forward_delay not in STP_DELAY_RANGE:
            # Checked here: from STP off the kernel would silently raise a delay of 0/1 to 2 s.
            raise InvalidArgument(f"{what}: with STP on the forward delay must be 2..30 s")
        delay = a.forward_delay * USER_HZ
        if a.stp or a.forward_delay in STP_DELAY_RANGE:
            # The kernel applies the delay before the STP state within one request, and this
            # delay is valid under either STP state.
            await self.bridge_options(what, a.bridge, int(a.stp), delay)
            return
        # A delay outside 2..30 s is refused while STP is on: turn STP off first.
        await self.bridge_options(what, a.bridge, stp=0)
        await self.bridge_options(what, a.bridge, delay=delay)

    async def address(self, what: str, index: int, iface: IPInterface, adding: bool) -> None:
        v4 = isinstance(iface, ipaddress.IPv4Interface)
        flags = IFA_F_NODAD if adding and not v4 else 0  # the gateway address must work at once
        family = socket.AF_INET if v4 else socket.AF_INET6
        body = IFADDRMSG.pack(family, iface.network.prefixlen, flags, 0, index)
        if v4:
            body += attr(IFA_LOCAL, iface.ip.packed)
        body += attr(IFA_ADDRESS, iface.ip.packed)
        if adding and v4 and iface.network.prefixlen < 31:
            body += attr(IFA_BROADCAST, iface.network.broadcast_address.packed)
        if adding:
            await self._write(what, RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body)
        else:
            await self._write(what, RTM_DELADDR, 0, body)

    async def route(self, what: str, index: int, r: Route, adding: bool) -> None:
        family = socket.AF_INET if r.dst.version == 4 else socket.AF_INET6
        # Added with proto 0 it would read "unspec": say "static", as ip route does.
        proto = RTPROT_STATIC if adding and r.proto == 0 else r.proto
        body = RTMSG.pack(family, r.dst.prefixlen, 0, 0, MAIN_TABLE, proto, r.scope,
                          RTN_UNICAST, 0)
        body += attr(RTA_DST, r.dst.network_address.packed) + attr_u32(RTA_OIF, index)
        if r.gateway is not None:
            body += attr(RTA_GATEWAY, _ip(r.gateway))
        if r.priority is not None:
            body += attr_u32(RTA_PRIORITY, r.priority)
        body += attr_u32(RTA_TABLE, MAIN_TABLE)
        if adding:
            # replace: moving an uplink's default route onto the bridge must not fail on the
            # old one
            await self._write(what, RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body)
        else:
            await self._write(what, RTM_DELROUTE, 0, body)

    async def delete_link(self, what: str, index: int) -> None:
        await self._write(what, RTM_DELLINK, 0, ifinfo(index))


def kind_of(link: Link) -> str:
    return f"a {link.kind} link" if link.kind else "a physical NIC"


def exists_error(what: str, link: Link) -> KvmnetError:
    if link.kind == "bridge":
        return Conflict(f"{what}: a bridge named {link.name} already exists")
    return Conflict(f"{what}: {link.name} already exists and is {kind_of(link)}, not a bridge")
