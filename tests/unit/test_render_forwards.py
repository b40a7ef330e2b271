"""Port forwards in the nftables renderer (nft itself loads them in integration/test_forwards)."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

from kvmnetd.model.desired import Dhcp, DhcpHost, DhcpHost6, Mode, Network
from kvmnetd.model.forward import Forward
from kvmnetd.plan.forwards import targets
from kvmnetd.plan.nft import fingerprint, render_ruleset
from tests.support.networks import CASES

v4 = ipaddress.IPv4Interface
v6 = ipaddress.IPv6Interface
ip = ipaddress.ip_address

HOSTS = Dhcp(hosts=(DhcpHost(mac="52:54:00:00:00:05", ip=ipaddress.IPv4Address("10.77.1.5"),
                             name="web"),),
             dhcpv6="stateful",
             hosts6=(DhcpHost6(name="web", ip=ipaddress.IPv6Address("fd00:77:1::5")),))
LAB = Network("lab", Mode.NAT, "kv-lab", v4("10.77.1.1/24"), v6("fd00:77:1::1/64"), dhcp=HOSTS,
              port_forwards=(Forward("tcp", 8080, 8080, "web", 80),
                             Forward("udp", 5000, 5010, "10.77.1.6"),
                             Forward("tcp", 2222, 2222, "10.77.1.7", 22, ip("198.51.100.2"))))
OTHER = Network("other", Mode.NAT, "kv-other", v4("10.77.2.1/24"))


def chain(text: str, name: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(f"\tchain {name} {{")
    end = lines.index("\t}", start)
    return [line.strip() for line in lines[start + 2:end]]


def declarations(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines()
            if line.startswith(("\tset ", "\tmap "))]


def test_dnat_from_outside_and_from_the_host_itself() -> None:
    text = render_ruleset([LAB, OTHER])
    tag = 'comment "net:lab"'
    l4 = "meta l4proto { tcp, udp }"
    # Every local address but our gateways (of every network), in each family the
    # target has; no SNAT, so the guest sees who connected.
    assert chain(text, "prerouting") == [
        # A range: a rule of its own, keeping its ports.
        f"fib daddr type local ip daddr != @forward_skip4 udp dport 5000-5010 "
        f"dnat ip to 10.77.1.6 {tag}",
        f"fib daddr type local ip daddr != @forward_skip4 {l4} "
        f"dnat ip to meta l4proto . th dport map @forward0_ip_port {tag}",
        f"fib daddr type local {l4} "
        f"dnat ip to ip daddr . meta l4proto . th dport map @forward0_ip_addr_port {tag}",
        f"fib daddr type local ip6 daddr != @forward_skip6 {l4} "
        f"dnat ip6 to meta l4proto . th dport map @forward0_ip6_port {tag}",
    ]
    # From the host itself: the same, loopback skipped too.
    out = chain(text, "output")
    assert out[0].startswith("fib daddr type local ip daddr != @forward_skip4_out udp ")
    assert out[3].startswith("fib daddr type local ip6 daddr != @forward_skip6_out ")
    assert len(out) == 4
    assert declarations(text) == [
        "set forward_skip4 { type ipv4_addr; elements = { 10.77.1.1, 10.77.2.1 } }",
        "set forward_skip4_out { type ipv4_addr; flags interval; "
        "elements = { 10.77.1.1, 10.77.2.1, 127.0.0.0/8 } }",
        "set forward_skip6 { type ipv6_addr; elements = { fd00:77:1::1 } }",
        "set forward_skip6_out { type ipv6_addr; flags interval; "
        "elements = { fd00:77:1::1, ::1/128 } }",
        "map forward0_ip_port { type inet_proto . inet_service : ipv4_addr . inet_service; "
        "elements = { tcp . 8080 : 10.77.1.5 . 80 } }",
        "map forward0_ip_addr_port { type ipv4_addr . inet_proto . inet_service : "
        "ipv4_addr . inet_service; elements = { 198.51.100.2 . tcp . 2222 : 10.77.1.7 . 22 } }",
        "map forward0_ip6_port { type inet_proto . inet_service : ipv6_addr . inet_service; "
        "elements = { tcp . 8080 : fd00:77:1::5 . 80 } }",
    ]


def test_a_thousand_forwards_are_map_elements_not_rules() -> None:
    many = replace(LAB, port_forwards=tuple(
        Forward("tcp", 10000 + i, 10000 + i, f"10.77.1.{i % 250 + 2}", 80)
        for i in range(1000)))
    text = render_ruleset([many])
    assert len(chain(text, "prerouting")) == 1 and len(chain(text, "output")) == 1
    assert text.count(" : 10.77.1.") == 1000


def test_hairpin_is_masqueraded_and_dnat_flows_pass_before_the_drops() -> None:
    text = render_ruleset([LAB])
    post = chain(text, "postrouting")
    assert post[:2] == [
        'ip saddr 10.77.1.0/24 ip daddr 10.77.1.0/24 ct status dnat masquerade comment "net:lab"',
        'ip6 saddr fd00:77:1::/64 ip6 daddr fd00:77:1::/64 ct status dnat masquerade '
        'comment "net:lab"',
    ]
    fwd = chain(text, "forward")
    accept = 'oifname "kv-lab" ip daddr 10.77.1.0/24 ct status dnat accept comment "net:lab"'
    assert fwd.index(accept) < fwd.index('oifname "kv-lab" drop comment "net:lab"')
    # Outgoing NAT of the network is unchanged.
    assert 'ip saddr 10.77.1.0/24 ip daddr != 10.77.1.0/24 masquerade comment "net:lab"' in post


def test_a_forward_by_host_name_follows_the_hosts_address() -> None:
    moved = replace(LAB, dhcp=replace(HOSTS, hosts=(
        DhcpHost(mac="52:54:00:00:00:05", ip=ipaddress.IPv4Address("10.77.1.50"), name="web"),)))
    assert [str(a) for a in targets(LAB.port_forwards[0], moved)] == ["10.77.1.50",
                                                                     "fd00:77:1::5"]
    assert "tcp . 8080 : 10.77.1.50 . 80" in render_ruleset([moved])
    assert fingerprint([moved]) != fingerprint([LAB])


def test_an_address_target_has_one_family() -> None:
    only = replace(LAB, port_forwards=(Forward("tcp", 80, 80, "fd00:77:1::9"),))
    text = render_ruleset([only])
    assert "tcp . 80 : fd00:77:1::9 }" in text and "dnat ip6 to" in text
    assert "dnat ip " not in text
    assert "ip saddr 10.77.1.0/24 ip daddr 10.77.1.0/24 ct status dnat" not in text


def test_routed_networks_render_forwards_too() -> None:
    routed = replace(LAB, mode=Mode.ROUTED)
    assert "tcp . 8080 : 10.77.1.5 . 80" in render_ruleset([routed])


def test_no_forwards_no_new_chains() -> None:
    for nets in CASES.values():
        text = render_ruleset(nets)
        assert "chain prerouting" not in text and "chain output" not in text
        assert "ct status dnat" not in text and not declarations(text)


def test_forwards_of_a_network_are_removed_with_it() -> None:
    assert "dnat" not in render_ruleset([OTHER])
