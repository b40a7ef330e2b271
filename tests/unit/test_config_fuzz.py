"""Property tests: rendering round-trips, and whatever the input, the loader returns a
Config or raises ConfigError."""

from __future__ import annotations

import ipaddress
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmnetd.config import load as cfg
from kvmnetd.config import schema as v
from kvmnetd.config.locate import Locator
from kvmnetd.config.write import render_network_toml
from kvmnetd.model.desired import (
    BootFiles,
    Dhcp,
    DhcpHost,
    DhcpHost6,
    DhcpRange,
    Dns,
    DnsHost,
    Mode,
    Network,
    Settings,
)
from kvmnetd.model.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

SETTINGS = settings(max_examples=300, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
EMPTY = cfg.Config(Settings(), {}, (), ())

LIKELY = [
    "10.0.0.1/24", "10.0.0.254/24", "10.1.0.1/16", "fd00::1/64", "10.0.0.1-10.0.0.100",
    "10.0.0.5-10.0.0.9", "fd00::2-fd00::9", "52:54:00:65:43:21", "52:54:00:*", "nat",
    "isolated", "routed", "bridged", "eth0", "kv-x", "1h", "infinite", "60", "/srv/tftp",
    "pxelinux.0", "stateful", "stateless", "off", "a\nb", "", "vnet*", "10.0.0.21", "9.9.9.9",
    "lab.kvm", "alice", "/run/x", "debug", "json",
]
NAMES = ["nat", "iso", "a", "b", "bad name", "x" * 40, "kv"]


def _quote(s: str) -> str:
    out = "".join(f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F
                  else "\\" + c if c in '"\\' else c for c in s)
    return f'"{out}"'


def _value(x: Any) -> str:
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf") if math.isinf(x) \
            else repr(x)
    if isinstance(x, list):
        return "[" + ", ".join(_value(i) for i in x) + "]"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{_quote(k)} = {_value(i)}" for k, i in x.items()) + "}"
    return _quote(x)


def dump(doc: dict[str, Any], prefix: tuple[str, ...] = ()) -> str:
    """Tables as headers and arrays of tables as [[...]], so the locator is exercised."""
    lines, later = [], []
    for k, x in doc.items():
        path = ".".join(_quote(p) for p in (*prefix, k))
        if isinstance(x, dict):
            later.append(f"[{path}]\n" + dump(x, (*prefix, k)))
        elif isinstance(x, list) and x and all(isinstance(i, dict) for i in x):
            later.extend(f"[[{path}]]\n" + dump(i, (*prefix, k)) for i in x)
        else:
            lines.append(f"{_quote(k)} = {_value(x)}")
    return "\n".join(lines + later) + "\n"


scalar = st.one_of(st.sampled_from(LIKELY), st.text(max_size=12),
                   st.integers(-(2**70), 2**70), st.integers(0, 70000), st.booleans(),
                   st.floats())
value = st.one_of(scalar, st.lists(st.one_of(st.sampled_from(LIKELY), scalar), max_size=3))


def table(keys: tuple[str, ...], **extra: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    optional: dict[str, st.SearchStrategy[Any]] = {k: value for k in keys}
    optional.update(extra)
    noise = st.dictionaries(st.text(min_size=1, max_size=6), value, max_size=1)
    return st.builds(lambda a, b: {**b, **a}, st.fixed_dictionaries({}, optional=optional),
                     noise)


host = table(v.HOST_KEYS)
dhcp = table(v.DHCP_KEYS, host=st.lists(host, max_size=3))
network = table(v.NETWORK_KEYS, dhcp=dhcp, dns=table(v.DNS_KEYS))
document = st.fixed_dictionaries({}, optional={
    "daemon": table(cfg.DAEMON_KEYS),
    "network": st.dictionaries(st.sampled_from(NAMES), network, max_size=3),
    "attach": st.lists(table(v.ATTACH_KEYS), max_size=2),
})


# Mostly valid networks, so the render/parse round trip is exercised often.
def _opt(**kw: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=kw)


_octet = st.integers(1, 99)
plausible_host = _opt(
    ip=st.builds("10.0.0.{}".format, _octet), name=st.sampled_from(["web", "db.lab.kvm", "a-1"]),
    lease_time=st.sampled_from(["2m", "infinite", "3600"]),
).flatmap(lambda d: st.builds(lambda m: {**d, "mac": f"52:54:00:00:00:{m:02X}"},
                              st.integers(0, 255)))
plausible = st.builds(
    lambda base, extra: {**base, **extra},
    st.fixed_dictionaries({"ipv4": st.just("10.0.0.254/24")}, optional={
        "mode": st.sampled_from(["nat", "routed", "isolated"]),
        "ipv6": st.just("fd00:1::1/64"),
        "bridge": st.sampled_from(["kvbr1", "kv-x"]),
        "autostart": st.booleans(),
        "mtu": st.integers(1280, 9000),
        "allow_users": st.lists(st.sampled_from(["alice", "bob", "_svc"]), max_size=2),
        "allow_groups": st.lists(st.sampled_from(["kvm", "libvirt"]), max_size=2),
        "dnsmasq": _opt(options=st.lists(st.sampled_from(
            ["log-dhcp", "dhcp-option=42,10.0.0.254", "dhcp-script=/bin/sh", "x"]), max_size=2)),
        "dns": _opt(enabled=st.booleans(), domain=st.sampled_from(["lab", "lab.kvm"]),
                    forwarders=st.lists(st.sampled_from(["9.9.9.9", "2620:FE::FE"]))),
        "dhcp": _opt(
            ranges=st.lists(st.sampled_from(["10.0.0.1-10.0.0.100"]), max_size=1),
            lease_time=st.sampled_from(["1h", "infinite", "300"]), router=st.booleans(),
            ping_check=st.booleans(), tftp_root=st.just("/srv/tftp"),
            boot_file=st.just("pxelinux.0"), next_server=st.just("10.0.0.5"), ra=st.booleans(),
            boot=_opt(bios=st.just("undionly.kpxe"), ipxe=st.just("http://10.0.0.254/b.ipxe")),
            host=st.lists(plausible_host, max_size=3,
                          unique_by=(lambda h: h["mac"].lower(), lambda h: h.get("ip")))),
    }),
    st.one_of(st.just({}), st.fixed_dictionaries({"stp": st.just(True),
                                                  "forward_delay": st.integers(2, 30)}),
              st.fixed_dictionaries({"forward_delay": st.integers(0, 30)})),
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def check_load(workdir: Path, text: str) -> cfg.Config | None:
    path = workdir / "kvmnetd.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass", newline="")
    try:
        return cfg.load(str(path), str(workdir / "networks.d"))
    except ConfigError as e:
        nlines = text.count("\n") + 1
        for issue in e.issues:
            assert 1 <= issue.line <= nlines, issue
            assert "\n" not in str(issue)
        return None


@SETTINGS
@given(st.text())
def test_arbitrary_text(workdir: Path, text: str) -> None:
    check_load(workdir, text)
    try:
        cfg.parse_network_text(text, "<define>", EMPTY)
    except ConfigError:
        pass


@SETTINGS
@given(document)
def test_toml_documents(workdir: Path, doc: dict[str, Any]) -> None:
    text = dump(doc)
    Locator(text)
    conf = check_load(workdir, text)
    if conf is None:
        return
    # Whatever was accepted renders back to the same networks.
    for net in conf.networks.values():
        assert cfg.parse_network_text(render_network_toml(net), "x", conf) == net


@SETTINGS
@given(st.one_of(network, plausible))
def test_single_network(net: dict[str, Any]) -> None:
    text = dump({"network": {"n": net}})
    try:
        parsed = cfg.parse_network_text(text, "<define>", EMPTY)
    except ConfigError as e:
        assert all(i.file == "<define>" and i.line >= 1 for i in e.issues)
        return
    assert cfg.parse_network_text(render_network_toml(parsed), "x", EMPTY) == parsed


ROUND_TRIP = [
    cfg.default_network(),
    Network(name="full", mode=Mode.ROUTED, bridge="br-full",
            ipv4=ipaddress.IPv4Interface("10.5.0.1/16"),
            ipv6=ipaddress.IPv6Interface("fd00:5::1/64"), uplink="eth1", stp=True,
            forward_delay=4, mtu=9000, autostart=False, allow_users=("alice", "bob"),
            allow_groups=("kvm",),
            dhcp=Dhcp(ranges=(), lease_time="infinite", router=True, ping_check=True,
                      tftp_root="/srv/tftp", boot_file="pxelinux.0",
                      next_server=ipaddress.IPv4Address("10.5.0.9"), ra=False,
                      boot=BootFiles(bios="undionly.kpxe", efi_arm64="a/b.efi",
                                     ipxe="http://10.5.0.9/x.ipxe?a=1&b=2"),
                      dhcpv6="stateful",
                      ranges6=(DhcpRange(ipaddress.ip_address("fd00:5::10"),
                                         ipaddress.ip_address("fd00:5::ff")),),
                      hosts=(DhcpHost("52:54:00:00:00:01", ipaddress.IPv4Address("10.5.1.1"),
                                      "web.lab.kvm", "12h"),
                             DhcpHost("52:54:00:00:00:02"))),
            dns=Dns(enabled=False, domain="lab.kvm", forwarders=("9.9.9.9", "2620:fe::fe")),
            dnsmasq_options=("dhcp-option=option:ntp-server,10.5.0.1", "log-dhcp",
                             'txt-record=t.lab,"a \\"quoted\\" text"')),
    Network(name="iso", mode=Mode.ISOLATED, bridge="kv-iso",
            ipv6=ipaddress.IPv6Interface("fd00:6::1/64"), host_access=True),
    Network(name="lan", mode=Mode.BRIDGED, bridge="br0", uplink="eth0"),
    Network(name="hosts", mode=Mode.NAT, bridge="kv-hosts",
            ipv4=ipaddress.IPv4Interface("10.7.0.1/24"),
            ipv6=ipaddress.IPv6Interface("fd00:7::1/64"),
            dhcp=Dhcp(ranges=(DhcpRange(ipaddress.ip_address("10.7.0.10"),
                                        ipaddress.ip_address("10.7.0.99")),),
                      hosts=(DhcpHost(ip=ipaddress.IPv4Address("10.7.0.5"), name="vm1"),),
                      dhcpv6="stateful",
                      ranges6=(DhcpRange(ipaddress.ip_address("fd00:7::10"),
                                         ipaddress.ip_address("fd00:7::ff")),),
                      hosts6=(DhcpHost6(id="00:03:00:01:52:54:00:11:22:33",
                                        ip=ipaddress.IPv6Address("fd00:7::11"), name="vm",
                                        lease_time="2h"),
                              DhcpHost6(ip=ipaddress.IPv6Address("fd00:7::12"),
                                        name="vm2"))),
            dns=Dns(domain="lab.kvm",
                    hosts=(DnsHost(ipaddress.ip_address("10.7.0.5"), ("web", "www")),
                           DnsHost(ipaddress.ip_address("fd00:7::5"), ("web6",))))),
]


@pytest.mark.parametrize("net", ROUND_TRIP, ids=lambda n: n.name)
def test_render_round_trip(tmp_path: Path, net: Network) -> None:
    text = render_network_toml(net)
    d = tmp_path / "networks.d"
    d.mkdir()
    (d / f"{net.name}.toml").write_text(text)
    assert cfg.load(str(tmp_path / "none.toml"), str(d)).networks == {net.name: net}
    assert cfg.parse_network_text(text, "x", EMPTY) == net


def test_render_example_round_trip(tmp_path: Path) -> None:
    conf = cfg.load(str(REPO / "contrib" / "kvmnetd.example.toml"), None)
    for net in conf.networks.values():
        assert cfg.parse_network_text(render_network_toml(net), "x", conf) == net
