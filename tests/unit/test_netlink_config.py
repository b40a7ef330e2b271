"""Configuration requests, encoded for the raw channel, read back by the decoder the mirror uses."""

from __future__ import annotations

import ipaddress

import pytest

from kvmnetd.adapters.rtnl import decode as nlp
from kvmnetd.adapters.rtnl.writes import ConfigWriter
from kvmnetd.model.observed import Route


class Sent:
    def __init__(self) -> None:
        self.requests: list[tuple[str, int, int, bytes]] = []

    async def __call__(self, what: str, kind: int, flags: int, body: bytes) -> None:
        self.requests.append((what, kind, flags, body))


def _only(sent: Sent) -> tuple[int, int, bytes]:
    (req,) = sent.requests
    return req[1], req[2], req[3]


async def test_bridge_creation_is_exclusive_and_reads_back() -> None:
    sent = Sent()
    await ConfigWriter(sent).create_bridge("create", "kvbr0", 1400, "52:54:00:12:34:56")
    kind, flags, body = _only(sent)
    assert kind == nlp.RTM_NEWLINK and flags == nlp.NLM_F_CREATE | nlp.NLM_F_EXCL
    link = nlp.decode_link(body, 0, len(body))
    assert link is not None
    assert (link.name, link.kind, link.mtu, link.mac) == ("kvbr0", "bridge", 1400,
                                                         "52:54:00:12:34:56")
    assert (link.stp, link.forward_delay) == (False, 0)


@pytest.mark.parametrize("text", ["10.50.0.1/24", "10.50.0.1/31", "fd00:50::1/64"])
async def test_addresses_read_back(text: str) -> None:
    iface = ipaddress.ip_interface(text)
    for adding in (True, False):
        sent = Sent()
        await ConfigWriter(sent).address("addr", 7, iface, adding)
        kind, flags, body = _only(sent)
        assert kind == (nlp.RTM_NEWADDR if adding else nlp.RTM_DELADDR)
        assert bool(flags & nlp.NLM_F_EXCL) == adding
        assert nlp.decode_addr(body, 0, len(body)) == (7, iface)


@pytest.mark.parametrize("route", [
    Route(dst=ipaddress.ip_network("0.0.0.0/0"), gateway="198.51.100.1", proto=3),
    Route(dst=ipaddress.ip_network("203.0.113.0/24"), scope=253, priority=7),
    Route(dst=ipaddress.ip_network("2001:db8::/32"), gateway="fe80::1", proto=4),
])
async def test_routes_read_back(route: Route) -> None:
    sent = Sent()
    await ConfigWriter(sent).route("route", 9, route, adding=True)
    kind, flags, body = _only(sent)
    assert kind == nlp.RTM_NEWROUTE and flags == nlp.NLM_F_CREATE | nlp.NLM_F_REPLACE
    back = nlp.decode_route(body, 0, len(body))
    # Added without a protocol, a route says "static", as `ip route add` makes it.
    proto = route.proto or nlp.RTPROT_STATIC
    assert back == Route(dst=route.dst, oif=9, gateway=route.gateway, proto=proto,
                         scope=route.scope, priority=route.priority)
