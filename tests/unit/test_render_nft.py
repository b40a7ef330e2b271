"""Golden files for the nftables renderer (nft's own check of them: integration/test_nftables)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from kvmnetd.model.desired import Dhcp, Dns, Mode, Network
from kvmnetd.plan.nft import fingerprint, render_ruleset
from tests.support.networks import BRIDGED, CASES, ISOLATED, MIXED, NAT, PXE

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
v4 = ipaddress.IPv4Interface
v6 = ipaddress.IPv6Interface


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    text = render_ruleset(CASES[case])
    path = GOLDEN / f"{case}.nft"
    if os.environ.get("KVMNETD_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text()


SERVICES = {
    "dhcp": "udp dport 67 accept",
    "dhcpv6": "udp dport 547 accept",
    "dns-udp": "udp dport 53 accept",
    "dns-tcp": "tcp dport 53 accept",
    "tftp": "udp dport 69 accept",
    "ra": "icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } accept",
}


@pytest.mark.parametrize("mode", [Mode.NAT, Mode.ROUTED, Mode.ISOLATED])
def test_services_a_network_turns_on_are_open_on_every_mode(mode: Mode) -> None:
    net = Network("svc", mode, "kvbr9", v4("10.77.9.1/24"), v6("fd00:77:9::1/64"),
                  dhcp=Dhcp(tftp_root="/srv/tftp", dhcpv6="stateless"))
    rules = [line.strip() for line in render_ruleset([net]).splitlines()]
    for what, rule in SERVICES.items():
        assert f'iifname "kvbr9" {rule} comment "net:svc"' in rules, (mode, what)
    # Off in the config, closed on the host's side too.
    quiet = Network("svc", mode, "kvbr9", v4("10.77.9.1/24"), dns=Dns(enabled=False))
    text = render_ruleset([quiet])
    for what in ("dhcp", "dhcpv6", "dns-udp", "dns-tcp", "tftp"):
        assert SERVICES[what] not in text, (mode, what)


def test_isolated_without_host_access_drops_everything_else() -> None:
    rules = [line.strip() for line in render_ruleset([PXE]).splitlines()
             if '"net:pxe"' in line and line.strip().startswith('iifname "kvbr3" ')]
    # The drop is last; only service ports and replies are accepted before it.
    assert rules[-1] == 'iifname "kvbr3" drop comment "net:pxe"'
    accepts = [r for r in rules[:-1] if "oifname" not in r]
    assert accepts and all(r.endswith('accept comment "net:pxe"') for r in accepts)
    assert any("ct state established,related" in r for r in accepts)


def test_order_of_input_does_not_matter() -> None:
    assert render_ruleset(MIXED) == render_ruleset(list(reversed(MIXED)))
    assert fingerprint(MIXED) == fingerprint(list(reversed(MIXED)))


def test_fingerprint_is_in_the_comment_and_tracks_content() -> None:
    fp = fingerprint([NAT])
    assert f'comment "kvmnetd {fp}"' in render_ruleset([NAT])
    assert fp != fingerprint([ISOLATED])
    assert fp != fingerprint([NAT], table="other")
    assert len(fp) == 16


def test_replaces_only_our_table() -> None:
    lines = render_ruleset([NAT], table="mine").splitlines()
    assert lines[:3] == ["add table inet mine", "delete table inet mine", "table inet mine {"]
    assert not any("flush" in line or "ruleset" in line for line in lines)


def test_empty_list_gives_an_empty_table() -> None:
    text = render_ruleset([])
    assert "chain" not in text
    assert render_ruleset([BRIDGED]).count("chain") == 0


def test_isolated_keeps_guests_together() -> None:
    text = render_ruleset([ISOLATED])
    assert 'iifname "kvbr1" drop' not in text.split("chain input")[0]
    assert 'iifname "kvbr1" oifname != "kvbr1" drop' in text
    assert 'iifname "kvbr1" drop comment' in text.split("chain input")[1]
    opened = render_ruleset([Network("iso", Mode.ISOLATED, "kvbr1", host_access=True)])
    assert 'iifname "kvbr1" drop' not in opened


def test_every_rule_names_its_network() -> None:
    for line in render_ruleset(MIXED).splitlines():
        if line.startswith("\t\t") and not line.strip().startswith("type "):
            assert 'comment "net:' in line, line


@pytest.mark.parametrize("bad", ['x"y', "a\nb", ""])
def test_refuses_names_that_would_break_quoting(bad: str) -> None:
    with pytest.raises(ValueError):
        render_ruleset([Network("n", Mode.ROUTED, bad, v4("10.77.9.1/24"))])
    with pytest.raises(ValueError):
        render_ruleset([], table="bad table")
