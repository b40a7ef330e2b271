"""[daemon.overlay] and [network.NAME.overlay]: values, checks, FILE:LINE: key."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from kvmnetd.config import load as cfg
from kvmnetd.config.write import render_network_toml
from kvmnetd.model.errors import ConfigError
from kvmnetd.model.overlay import anycast_mac, split_range

HOST = ('[daemon.overlay]\nlocal = "192.0.2.11"\npeers = ["192.0.2.12", "192.0.2.13"]\n'
        'asn = 65000\nneighbors = ["192.0.2.12", "192.0.2.13"]\n')  # five lines
NET = '[network.nat]\nipv4 = "10.0.0.254/24"\n[network.nat.overlay]\nvni = 100\n'  # 4 lines


def load(tmp_path: Path, text: str) -> cfg.Config:
    path = tmp_path / "kvmnetd.toml"
    path.write_text(text)
    return cfg.load(str(path), str(tmp_path / "networks.d"))


def issues(tmp_path: Path, text: str) -> list[tuple[int, str, str]]:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text)
    return [(i.line, i.key, i.message) for i in err.value.issues]


def test_values(tmp_path: Path) -> None:
    c = load(tmp_path, HOST + 'frr_pathspace = "h1"\nbfd = true\n' + NET + 'mode = "static"\n')
    host = c.settings.overlay
    assert host is not None
    assert host.local == ipaddress.IPv4Address("192.0.2.11")
    assert [str(p) for p in host.peers] == ["192.0.2.12", "192.0.2.13"]
    assert (host.asn, host.frr_pathspace, host.bfd, host.dstport) == (65000, "h1", True, 4789)
    net = c.networks["nat"]
    assert net.overlay is not None
    assert (net.overlay.vni, net.overlay.mode, net.overlay.vxlan) == (100, "static", "kvx100")
    assert net.overlay.mac == anycast_mac(100) == "02:6b:76:00:00:64"
    # The guests' MTU follows from the underlay when the network leaves it unset.
    assert net.mtu == 1450


def test_fabric_order_is_the_same_on_every_host(tmp_path: Path) -> None:
    a = load(tmp_path, HOST).settings.overlay
    b = load(tmp_path, '[daemon.overlay]\nlocal = "192.0.2.13"\n'
                       'peers = ["192.0.2.11", "192.0.2.12"]\n').settings.overlay
    assert a is not None and b is not None
    assert a.fabric("static") == b.fabric("static")
    assert a.position("static") == (0, 3) and b.position("static") == (2, 3)


def test_split_range_is_disjoint_and_covers_all() -> None:
    shares = [split_range(10, 109, i, 3) for i in range(3)]
    assert shares == [(10, 42), (43, 75), (76, 109)]
    assert split_range(10, 11, 0, 3) is None


def test_explicit_gateway_mac_and_mtu(tmp_path: Path) -> None:
    net_text = NET.replace('[network.nat.overlay]', 'mtu = 8950\n[network.nat.overlay]')
    c = load(tmp_path, HOST + 'underlay_mtu = 9000\n' + net_text
             + 'mode = "evpn"\ngateway_mac = "02:00:00:00:00:01"\n')
    net = c.networks["nat"]
    assert net.mtu == 8950 and net.overlay is not None and net.overlay.mac == "02:00:00:00:00:01"


def test_round_trip_through_the_writer(tmp_path: Path) -> None:
    c = load(tmp_path, HOST + NET + 'mode = "static"\ndhcp_split = "all"\n')
    net = c.networks["nat"]
    again = cfg.parse_network_text(render_network_toml(net), "x.toml", c)
    assert again == net


@pytest.mark.parametrize(("text", "line", "key", "message"), [
    (NET + 'mode = "static"\n', 3, "network.nat.overlay", "needs [daemon.overlay]"),
    (HOST + NET + 'mode = "vxlan"\n', 10, "network.nat.overlay.mode", "static, evpn"),
    (HOST + NET, 8, "network.nat.overlay", "mode is required"),
    (HOST + NET.replace("vni = 100", 'mode = "static"'), 8, "network.nat.overlay",
     "vni is required"),
    (HOST + NET.replace("100", "16777216") + 'mode = "static"\n', 9,
     "network.nat.overlay.vni", "outside 1..16777215"),
    (HOST + NET.replace("100", "0") + 'mode = "static"\n', 9,
     "network.nat.overlay.vni", "outside 1..16777215"),
    ('[daemon.overlay]\nlocal = "192.0.2.11"\n' + NET + 'mode = "static"\n', 7,
     "network.nat.overlay.mode", "static mode needs peers"),
    ('[daemon.overlay]\nlocal = "192.0.2.11"\npeers = ["192.0.2.12"]\n' + NET
     + 'mode = "evpn"\n', 8, "network.nat.overlay.mode", "evpn mode needs asn and neighbors"),
    ('[daemon.overlay]\nlocal = "192.0.2.11"\npeers = ["192.0.2.11"]\n', 3,
     "daemon.overlay.peers[0]", "this host's own address"),
    ('[daemon.overlay]\nlocal = "192.0.2.11"\npeers = ["192.0.2.12", "192.0.2.12"]\n', 3,
     "daemon.overlay.peers[1]", "listed twice"),
    ('[daemon.overlay]\npeers = ["192.0.2.12"]\n', 1, "daemon.overlay", "local is required"),
    ('[daemon.overlay]\nlocal = "fd00::1"\n', 2, "daemon.overlay.local", "not an IPv4"),
    ('[daemon.overlay]\nlocal = "192.0.2.11"\nasn = 0\n', 3, "daemon.overlay.asn",
     "outside 1..4294967295"),
    ('[daemon.overlay]\nlocal = "192.0.2.11"\nfrr_pathspace = "a/b"\n', 3,
     "daemon.overlay.frr_pathspace", "pathspace"),
    ('[daemon.overlay]\nlocal = "192.0.2.11"\npeer = []\n', 3, "daemon.overlay.peer",
     "'peers'"),
    (HOST + NET + 'mode = "static"\ngateway_mac = "01:00:5e:00:00:01"\n', 11,
     "network.nat.overlay.gateway_mac", "multicast"),
    (HOST + NET.replace('[network.nat.overlay]', 'mtu = 1500\n[network.nat.overlay]')
     + 'mode = "static"\n', 8, "network.nat.mtu", "use at most 1450"),
    (HOST + 'underlay_mtu = 1300\n' + NET.replace('[network.nat.overlay]',
                                                  'ipv6 = "fd00::1/64"\n[network.nat.overlay]')
     + 'mode = "static"\n', 10, "network.nat.overlay", "IPv6 needs an MTU of at least 1280"),
    (HOST + '[network.lan]\nmode = "bridged"\nuplink = "eth0"\n[network.lan.overlay]\n'
     'vni = 5\nmode = "static"\n', 9, "network.lan.overlay", "bridged network"),
])
def test_each_issue(tmp_path: Path, text: str, line: int, key: str, message: str) -> None:
    found = issues(tmp_path, text)
    assert len(found) == 1, found
    assert found[0][:2] == (line, key), found
    assert message in found[0][2], found


def test_vni_unique_across_files(tmp_path: Path) -> None:
    d = tmp_path / "networks.d"
    d.mkdir()
    (d / "b.toml").write_text('[network.b]\nipv4 = "10.1.0.1/24"\n[network.b.overlay]\n'
                              'vni = 100\nmode = "static"\n')
    found = issues(tmp_path, HOST + NET + 'mode = "static"\n')
    assert len(found) == 1, found
    line, key, message = found[0]
    assert (line, key) == (4, "network.b.overlay.vni")
    assert "VNI 100 is already used by network 'nat'" in message
