"""[[network.NAME.forward]]: what is accepted, and every refusal with its FILE:LINE: key."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from kvmnetd.config import load as cfg
from kvmnetd.config.write import render_network_toml
from kvmnetd.model.errors import ConfigError
from kvmnetd.model.forward import Forward

# Lines 1-9: a nat network with a static host "web" (v4 and v6), DNS on.
BASE = (
    '[network.lab]\n'
    'ipv4 = "10.77.1.1/24"\n'
    'ipv6 = "fd00:77:1::1/64"\n'
    '[network.lab.dhcp]\n'
    'dhcpv6 = "stateful"\n'
    'ranges6 = ["fd00:77:1::100-fd00:77:1::1ff"]\n'
    '[[network.lab.dhcp.host]]\n'
    'mac = "52:54:00:00:00:05"\nip = "10.77.1.5"\nname = "web"\n'  # lines 8-10
    '[[network.lab.dhcp.host6]]\nname = "web"\nip = "fd00:77:1::5"\n'  # lines 11-13
)
FIRST = 14  # line of the first [[network.lab.forward]] appended to BASE


def fwd(**keys: object) -> str:
    body = "".join(f"{k} = {_toml(v)}\n" for k, v in keys.items())
    return f"[[network.lab.forward]]\n{body}"


def _toml(v: object) -> str:
    return str(v) if isinstance(v, int) else f'"{v}"'


def load(tmp_path: Path, text: str) -> cfg.Config:
    path = tmp_path / "kvmnetd.toml"
    path.write_text(text)
    return cfg.load(str(path), str(tmp_path / "networks.d"))


def issues(tmp_path: Path, text: str) -> list[tuple[str, int, str, str]]:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    return [(Path(i.file).name, i.line, i.key, i.message) for i in err.value.issues]


def test_forwards_are_read_in_order(tmp_path: Path) -> None:
    text = BASE + fwd(proto="tcp", port=8080, to="web", to_port=80) \
        + fwd(proto="udp", port="5000-5010", to="10.77.1.6") \
        + fwd(proto="tcp", port=2222, address="198.51.100.2", to="fd00:77:1::7", to_port=22)
    with pytest.raises(ConfigError):  # v4 listen address, v6 target: refused below
        load(tmp_path, text)
    text = BASE + fwd(proto="tcp", port=8080, to="web", to_port=80) \
        + fwd(proto="udp", port="5000-5010", to="10.77.1.6") \
        + fwd(proto="tcp", port=2222, address="198.51.100.2", to="10.77.1.7", to_port=22)
    net = load(tmp_path, text).networks["lab"]
    assert net.port_forwards == (
        Forward("tcp", 8080, 8080, "web", 80),
        Forward("udp", 5000, 5010, "10.77.1.6"),
        Forward("tcp", 2222, 2222, "10.77.1.7", 22, ipaddress.ip_address("198.51.100.2")),
    )
    assert [f.ports for f in net.port_forwards] == ["8080", "5000-5010", "2222"]


# (forward keys, line offset from FIRST, key, part of the message)
REFUSED = [
    (dict(proto="sctp", port=80, to="web"), 1, "proto", "tcp or udp"),
    (dict(proto="tcp", port=0, to="web"), 2, "port", "outside 1..65535"),
    (dict(proto="tcp", port="90-80", to="web"), 2, "port", "ends before it starts"),
    (dict(proto="tcp", port="http", to="web"), 2, "port", "must be a number"),
    (dict(proto="tcp", port=80, to="db"), 3, "to", "neither an address nor the name"),
    (dict(proto="tcp", port=80, to="10.99.0.5"), 3, "to", "not a guest address"),
    (dict(proto="tcp", port=80, to="10.77.1.1"), 3, "to", "not a guest address"),
    (dict(proto="tcp", port="80-81", to="web", to_port=8080), 4, "to_port", "keeps its ports"),
    (dict(proto="tcp", port=80, to="web", to_port=70000), 4, "to_port", "outside 1..65535"),
    (dict(proto="tcp", port=80, to="10.77.1.5", address="2001:db8::1"), 4, "address",
     "no IPv6 address"),
    (dict(proto="udp", port=53, to="web"), 2, "port", "DNS (dnsmasq)"),
    (dict(proto="tcp", port="50-60", to="web"), 2, "port", "DNS (dnsmasq)"),
    (dict(proto="udp", port=67, to="web"), 2, "port", "DHCP (dnsmasq)"),
    (dict(proto="udp", port=547, to="web"), 2, "port", "DHCPv6 (dnsmasq)"),
    (dict(proto="tcp", to="web"), 0, "network.lab.forward[0]", "port is required"),
]


@pytest.mark.parametrize(("keys", "offset", "key", "part"), REFUSED)
def test_refused_with_file_line_and_key(tmp_path: Path, keys: dict[str, object],
                                        offset: int, key: str, part: str) -> None:
    found = issues(tmp_path, BASE + fwd(**keys))
    full = key if key.startswith("network.") else f"network.lab.forward[0].{key}"
    assert ("kvmnetd.toml", FIRST + offset, full) in [f[:3] for f in found], found
    assert any(part in f[3] for f in found if f[2] == full), found


def test_udp_53_is_free_when_dns_is_off(tmp_path: Path) -> None:
    text = BASE + '[network.lab.dns]\nenabled = false\n' + fwd(proto="udp", port=53, to="web")
    assert load(tmp_path, text).networks["lab"].port_forwards[0].port == 53


def test_overlapping_forwards_are_refused_on_the_later_one(tmp_path: Path) -> None:
    text = BASE + fwd(proto="tcp", port="8000-8010", to="web") \
        + fwd(proto="tcp", port=8005, to="10.77.1.9")
    assert issues(tmp_path, text) == [
        ("kvmnetd.toml", FIRST + 6, "network.lab.forward[1].port",
         "tcp 8005 -> 10.77.1.9 overlaps tcp 8000-8010 -> web of network lab")]


def test_same_port_on_other_protocol_or_other_address_is_fine(tmp_path: Path) -> None:
    text = BASE + fwd(proto="tcp", port=8080, to="web") \
        + fwd(proto="udp", port=8080, to="web") \
        + fwd(proto="tcp", port=9000, to="web", address="198.51.100.2") \
        + fwd(proto="tcp", port=9000, to="web", address="198.51.100.3")
    assert len(load(tmp_path, text).networks["lab"].port_forwards) == 4
    # Without address it listens everywhere, so it overlaps one with an address.
    text += fwd(proto="tcp", port=9000, to="web")
    assert [f[2] for f in issues(tmp_path, text)] == ["network.lab.forward[4].port"]


def test_overlap_across_networks_and_files(tmp_path: Path) -> None:
    d = tmp_path / "networks.d"
    d.mkdir()
    (d / "other.toml").write_text(
        '[network.other]\nipv4 = "10.77.2.1/24"\n[network.other.dns]\nenabled = false\n'
        '[[network.other.forward]]\nproto = "tcp"\nport = 8080\nto = "10.77.2.5"\n')
    found = issues(tmp_path, BASE + fwd(proto="tcp", port=8080, to="web"))
    assert [(f[0], f[1], f[2]) for f in found] == [
        ("other.toml", 7, "network.other.forward[0].port")]
    assert "overlaps tcp 8080 -> web of network lab" in found[0][3]


def test_another_networks_dnsmasq_port_is_refused(tmp_path: Path) -> None:
    text = BASE + ('[network.quiet]\nipv4 = "10.77.2.1/24"\n[network.quiet.dns]\n'
                   'enabled = false\n[[network.quiet.forward]]\nproto = "tcp"\nport = 53\n'
                   'to = "10.77.2.5"\n')
    found = issues(tmp_path, text)
    assert [(f[1], f[2]) for f in found] == [(FIRST + 6, "network.quiet.forward[0].port")]
    assert "DNS (dnsmasq)" in found[0][3]


@pytest.mark.parametrize("mode", ["isolated", "bridged"])
def test_modes_without_a_way_in_are_refused_and_explained(tmp_path: Path, mode: str) -> None:
    head = f'[network.lab]\nmode = "{mode}"\n'
    head += 'uplink = "eth9"\n' if mode == "bridged" else 'ipv4 = "10.77.1.1/24"\n'
    found = issues(tmp_path, head + fwd(proto="tcp", port=80, to="10.77.1.5"))
    assert any(f[1] == 4 and f[2] == "network.lab.forward[0]"
               and "need a nat or routed network" in f[3] for f in found), found


def test_routed_networks_take_forwards(tmp_path: Path) -> None:
    text = BASE.replace("[network.lab]\n", '[network.lab]\nmode = "routed"\n') \
        + fwd(proto="tcp", port=80, to="web")
    assert load(tmp_path, text).networks["lab"].port_forwards


def test_written_network_reads_back_with_its_forwards(tmp_path: Path) -> None:
    text = BASE + fwd(proto="tcp", port=8080, to="web", to_port=80) \
        + fwd(proto="udp", port="5000-5010", to="10.77.1.6", address="198.51.100.2")
    net = load(tmp_path, text).networks["lab"]
    again = load(tmp_path, render_network_toml(net)).networks["lab"]
    assert again.port_forwards == net.port_forwards
