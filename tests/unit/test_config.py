"""Config loader: every validation rule, with the exact line it is reported on."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from kvmnetd.config import load as cfg
from kvmnetd.config import overlay
from kvmnetd.config import schema as v
from kvmnetd.config.forwards import FORWARD_KEYS
from kvmnetd.config.locate import Locator, format_path
from kvmnetd.model.desired import Dhcp, DhcpHost, DhcpRange, Mode, Network
from kvmnetd.model.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
NAT = '[network.nat]\nipv4 = "10.0.0.254/24"\n'  # two lines, reused as a prefix
# six lines: stateful DHCPv6 on fd00::/64
V6S = NAT + ('ipv6 = "fd00::1/64"\n[network.nat.dhcp]\ndhcpv6 = "stateful"\n'
             'ranges6 = ["fd00::a-fd00::f"]\n')


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "kvmnetd.toml"
    path.write_text(text)
    return str(path)


def load(tmp_path: Path, text: str, **kw: object) -> cfg.Config:
    return cfg.load(write(tmp_path, text), str(tmp_path / "networks.d"), **kw)  # type: ignore[arg-type]


def issues(tmp_path: Path, text: str, **kw: object) -> list[tuple[int, str, str]]:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, text, **kw)
    return [(i.line, i.key, i.message) for i in err.value.issues]


def one_issue(tmp_path: Path, text: str, **kw: object) -> tuple[int, str, str]:
    found = issues(tmp_path, text, **kw)
    assert len(found) == 1, found
    return found[0]


# (text, line, key, part of the message)
CASES = [
    # names and interfaces
    ('[network."bad name"]\nipv4 = "10.0.0.1/24"\n', 1, 'network."bad name"', "network name"),
    ('[network.' + "n" * 33 + ']\nbridge = "b"\nipv4 = "10.0.0.1/24"\n', 1,
     "network." + "n" * 33, "1 to 32"),
    ('[network.averylongname]\nipv4 = "10.0.0.1/24"\n', 1, "network.averylongname",
     "set bridge"),
    (NAT + 'bridge = "a/b"\n', 3, "network.nat.bridge", "may not contain '/'"),
    (NAT + 'bridge = "br:0"\n', 3, "network.nat.bridge", "may not contain ':'"),
    (NAT + 'bridge = "br 0"\n', 3, "network.nat.bridge", "may not contain ' '"),
    (NAT + 'bridge = ".."\n', 3, "network.nat.bridge", "not a valid interface name"),
    (NAT + 'bridge = ""\n', 3, "network.nat.bridge", "1 to 15 bytes"),
    (NAT + 'bridge = "abcdefghijklmnop"\n', 3, "network.nat.bridge", "not 16"),
    (NAT + 'uplink = "eth0/1"\n', 3, "network.nat.uplink", "may not contain '/'"),
    (NAT + 'uplink = "kv-nat"\n', 3, "network.nat.uplink", "own bridge"),
    # mode and addresses
    (NAT + 'mode = "nta"\n', 3, "network.nat.mode", "did you mean 'nat'"),
    ('[network.nat]\nmode = "routed"\n', 1, "network.nat", "needs ipv4 or ipv6"),
    ('[network.nat]\nmode = "isolated"\n', 1, "network.nat", "needs ipv4 or ipv6"),
    ('[network.lan]\nmode = "bridged"\n', 1, "network.lan", "needs uplink"),
    ('[network.lan]\nmode = "bridged"\nuplink = "eth0"\n[network.lan.dhcp]\n', 4,
     "network.lan.dhcp", "physical LAN"),
    ('[network.iso]\nmode = "isolated"\nipv4 = "10.0.0.1/24"\nuplink = "eth0"\n', 4,
     "network.iso.uplink", "no uplink"),
    (NAT + "host_access = true\n", 3, "network.nat.host_access", "isolated"),
    ('[network.nat]\nipv4 = "10.0.0.1"\n', 2, "network.nat.ipv4", "prefix length"),
    ('[network.nat]\nipv4 = "10.0.0.300/24"\n', 2, "network.nat.ipv4", "not an IPv4"),
    ('[network.nat]\nipv4 = "10.0.0.0/24"\n', 2, "network.nat.ipv4", "network or broadcast"),
    ('[network.nat]\nipv4 = "10.0.0.255/24"\n', 2, "network.nat.ipv4", "network or broadcast"),
    ('[network.nat]\nipv4 = "10.0.0.1/32"\n', 2, "network.nat.ipv4", "no room"),
    ('[network.nat]\nipv4 = "224.0.0.1/24"\n', 2, "network.nat.ipv4", "unicast"),
    ('[network.nat]\nipv6 = "fd00::/64"\n', 2, "network.nat.ipv6", "anycast"),
    ('[network.nat]\nipv6 = "fd00::1"\n', 2, "network.nat.ipv6", "prefix length"),
    ('[network.nat]\nipv4 = "fd00::1/64"\n', 2, "network.nat.ipv4", "not an IPv4"),
    # bridge options
    (NAT + "stp = true\nforward_delay = 0\n", 4, "network.nat.forward_delay",
     "refuses a forward delay under 2 s; use 2..30 or set stp = false"),
    (NAT + "stp = true\nforward_delay = 31\n", 4, "network.nat.forward_delay", "stp = false"),
    (NAT + "forward_delay = 31\n", 3, "network.nat.forward_delay", "outside 0..30"),
    (NAT + "forward_delay = -1\n", 3, "network.nat.forward_delay", "outside 0..30"),
    (NAT + "mtu = 67\n", 3, "network.nat.mtu", "outside 68..65535"),
    (NAT + "mtu = 65536\n", 3, "network.nat.mtu", "outside 68..65535"),
    (NAT + 'ipv6 = "fd00::1/64"\nmtu = 1000\n', 4, "network.nat.mtu", "1280"),
    (NAT + 'stp = "yes"\n', 3, "network.nat.stp", "expected true or false, got a string"),
    (NAT + "isolate_ports = 1\n", 3, "network.nat.isolate_ports", "expected true or false"),
    (NAT + "mtu = 1500.0\n", 3, "network.nat.mtu", "expected an integer"),
    (NAT + "mtu = true\n", 3, "network.nat.mtu", "expected an integer"),
    (NAT + 'allow_users = ["Alice"]\n', 3, "network.nat.allow_users[0]", "plain user"),
    (NAT + 'allow_groups = ["kvm", "a;b"]\n', 3, "network.nat.allow_groups[1]", "plain"),
    (NAT + 'allow_users = "alice"\n', 3, "network.nat.allow_users", "expected an array"),
    # DHCP ranges and options
    (NAT + '[network.nat.dhcp]\nranges = ["10.0.1.1-10.0.1.9"]\n', 4,
     "network.nat.dhcp.ranges[0]", "outside the network's subnet 10.0.0.0/24"),
    (NAT + '[network.nat.dhcp]\nranges = ["10.0.0.9-10.0.0.1"]\n', 4,
     "network.nat.dhcp.ranges[0]", "starts after it ends"),
    (NAT + '[network.nat.dhcp]\nranges = ["10.0.0.200-10.0.0.254"]\n', 4,
     "network.nat.dhcp.ranges[0]", "gateway"),
    (NAT + '[network.nat.dhcp]\nranges = ["10.0.0.1-10.0.0.255"]\n', 4,
     "network.nat.dhcp.ranges[0]", "broadcast"),
    (NAT + '[network.nat.dhcp]\nranges = ["10.0.0.1-10.0.0.9", "10.0.0.5-10.0.0.20"]\n', 4,
     "network.nat.dhcp.ranges[1]", "overlaps 10.0.0.1-10.0.0.9"),
    (NAT + '[network.nat.dhcp]\nranges = ["10.0.0.1"]\n', 4, "network.nat.dhcp.ranges[0]",
     "FIRST-LAST"),
    (NAT + '[network.nat.dhcp]\nranges = ["fd00::1-fd00::9"]\n', 4,
     "network.nat.dhcp.ranges[0]", "use ranges6"),
    ('[network.nat]\nipv6 = "fd00::1/64"\n[network.nat.dhcp]\nranges = ["10.0.0.1-10.0.0.2"]\n',
     4, "network.nat.dhcp.ranges[0]", "ipv4 of the network is unset"),
    (NAT + '[network.nat.dhcp]\nlease_time = "1x"\n', 4, "network.nat.dhcp.lease_time",
     "s/m/h/d/w"),
    (NAT + '[network.nat.dhcp]\nlease_time = "60"\n', 4, "network.nat.dhcp.lease_time",
     "shorter than 120 s"),
    (NAT + '[network.nat.dhcp]\nlease_time = "1m"\n', 4, "network.nat.dhcp.lease_time",
     "shorter"),
    (NAT + '[network.nat.dhcp]\ntftp_root = "srv/tftp"\n', 4, "network.nat.dhcp.tftp_root",
     "absolute path"),
    (NAT + '[network.nat.dhcp]\ntftp_root = "/srv/tftp,eth0"\n', 4,
     "network.nat.dhcp.tftp_root", "','"),
    (NAT + '[network.nat.dhcp]\ntftp_root = "/srv/\\u0000x"\n', 4,
     "network.nat.dhcp.tftp_root", "control character"),
    (NAT + '[network.nat.dhcp]\nboot_file = "pxe linux.0"\n', 4,
     "network.nat.dhcp.boot_file", "spaces"),
    (NAT + '[network.nat.dhcp]\nboot_file = "a,b"\n', 4, "network.nat.dhcp.boot_file", "','"),
    (NAT + '[network.nat.dhcp]\nnext_server = "fd00::1"\n', 4,
     "network.nat.dhcp.next_server", "not an IPv4"),
    (NAT + '[network.nat.dhcp]\ndhcpv6 = "full"\n', 4, "network.nat.dhcp.dhcpv6",
     "off, stateless, stateful"),
    (NAT + '[network.nat.dhcp]\ndhcpv6 = "stateless"\n', 4, "network.nat.dhcp.dhcpv6",
     "needs ipv6"),
    (NAT + 'ipv6 = "fd00::1/64"\n[network.nat.dhcp]\ndhcpv6 = "stateful"\n', 5,
     "network.nat.dhcp.dhcpv6", "needs ranges6"),
    (NAT + 'ipv6 = "fd00::1/64"\n[network.nat.dhcp]\nranges6 = ["fd00::a-fd00::f"]\n', 5,
     "network.nat.dhcp.ranges6", "stateful"),
    (NAT + 'ipv6 = "fd00::1/64"\n[network.nat.dhcp]\ndhcpv6 = "stateful"\n'
     'ranges6 = ["fd00::-fd00::f"]\n', 6, "network.nat.dhcp.ranges6[0]", "anycast"),
    # static hosts
    (NAT + '[[network.nat.dhcp.host]]\nmac = "52:54:00:00:00"\n', 4,
     "network.nat.dhcp.host[0].mac", "not a MAC"),
    (NAT + '[[network.nat.dhcp.host]]\nip = "10.0.0.5"\n', 3, "network.nat.dhcp.host[0]",
     "needs mac, or name and ip"),
    (NAT + '[[network.nat.dhcp.host]]\nname = "vm1"\n', 3, "network.nat.dhcp.host[0]",
     "needs mac, or name and ip"),
    (NAT + '[[network.nat.dhcp.host]]\nname = "vm1"\nip = "10.0.0.5"\n'
     '[[network.nat.dhcp.host]]\nname = "vm1"\nip = "10.0.0.6"\n', 7,
     "network.nat.dhcp.host[1].name", "name vm1 is already used by host[0]"),
    (NAT + '[[network.nat.dhcp.host]]\nname = "1h"\nip = "10.0.0.5"\n', 4,
     "network.nat.dhcp.host[0].name", "lease time"),
    (NAT + '[[network.nat.dhcp.host]]\nmac = "52:54:00:00:00:01"\nip = "10.0.9.5"\n', 5,
     "network.nat.dhcp.host[0].ip", "outside"),
    (NAT + '[[network.nat.dhcp.host]]\nmac = "52:54:00:00:00:01"\nip = "10.0.0.254"\n', 5,
     "network.nat.dhcp.host[0].ip", "is the gateway"),
    (NAT + '[[network.nat.dhcp.host]]\nmac = "52:54:00:00:00:01"\n'
     '[[network.nat.dhcp.host]]\nmac = "52:54:00:00:00:01"\n', 6,
     "network.nat.dhcp.host[1].mac", "already used by host[0]"),
    (NAT + '[[network.nat.dhcp.host]]\nmac = "52:54:00:00:00:01"\nip = "10.0.0.5"\n'
     '[[network.nat.dhcp.host]]\nmac = "52:54:00:00:00:02"\nip = "10.0.0.5"\n', 8,
     "network.nat.dhcp.host[1].ip", "already used by host[0]"),
    (NAT + '[[network.nat.dhcp.host]]\nmac = "52:54:00:00:00:01"\nname = "-web"\n', 5,
     "network.nat.dhcp.host[0].name", "not valid"),
    (NAT + '[[network.nat.dhcp.host]]\nmac = "52:54:00:00:00:01"\nname = "' + "a" * 64 + '"\n',
     5, "network.nat.dhcp.host[0].name", "63"),
    (NAT + '[[network.nat.dhcp.host]]\nmac = "52:54:00:00:00:01"\nname = "a_b"\n', 5,
     "network.nat.dhcp.host[0].name", "not valid"),
    (NAT + '[[network.nat.dhcp.host]]\nmac = "52:54:00:00:00:01"\nlease_time = "5s"\n', 5,
     "network.nat.dhcp.host[0].lease_time", "shorter"),
    # DHCPv6 hosts
    (V6S + '[[network.nat.dhcp.host6]]\nip = "fd00::11"\n', 7, "network.nat.dhcp.host6[0]",
     "needs id"),
    (V6S + '[[network.nat.dhcp.host6]]\nid = "0:3:0:1"\n', 7, "network.nat.dhcp.host6[0]",
     "needs ip"),
    (V6S + '[[network.nat.dhcp.host6]]\nid = "0:3:0:1:x"\nip = "fd00::11"\n', 8,
     "network.nat.dhcp.host6[0].id", "not a DUID"),
    (V6S + '[[network.nat.dhcp.host6]]\nid = "0:3:0:1"\nip = "fd01::11"\n', 9,
     "network.nat.dhcp.host6[0].ip", "outside"),
    (V6S + '[[network.nat.dhcp.host6]]\nid = "0:3:0:1"\nip = "10.0.0.5"\n', 9,
     "network.nat.dhcp.host6[0].ip", "not an IPv6"),
    (V6S + '[[network.nat.dhcp.host6]]\nid = "0:3:0:1"\nip = "fd00::11"\n'
     '[[network.nat.dhcp.host6]]\nid = "00:03:00:01"\nip = "fd00::12"\n', 11,
     "network.nat.dhcp.host6[1].id", "already used by host6[0]"),
    (V6S + '[[network.nat.dhcp.host6]]\nname = "vm"\nip = "fd00::11"\n'
     '[[network.nat.dhcp.host6]]\nname = "vm2"\nip = "fd00::11"\n', 12,
     "network.nat.dhcp.host6[1].ip", "already used by host6[0]"),
    (NAT + 'ipv6 = "fd00::1/64"\n[network.nat.dhcp]\n[[network.nat.dhcp.host6]]\n'
     'name = "vm"\nip = "fd00::11"\n', 5, "network.nat.dhcp.host6", "stateful"),
    # DNS hosts
    (NAT + '[[network.nat.dns.host]]\nip = "10.0.0.5"\n', 3, "network.nat.dns.host[0]",
     "names is required"),
    (NAT + '[[network.nat.dns.host]]\nnames = ["web"]\n', 3, "network.nat.dns.host[0]",
     "ip is required"),
    (NAT + '[[network.nat.dns.host]]\nip = "10.0.0.5"\nnames = []\n', 5,
     "network.nat.dns.host[0].names", "at least one"),
    (NAT + '[[network.nat.dns.host]]\nip = "10.0.0.x"\nnames = ["web"]\n', 4,
     "network.nat.dns.host[0].ip", "not an IP address"),
    (NAT + '[[network.nat.dns.host]]\nip = "10.0.0.5"\nnames = ["web", "-x"]\n', 5,
     "network.nat.dns.host[0].names[1]", "not valid"),
    (NAT + '[network.nat.dns]\nenabled = false\n[[network.nat.dns.host]]\nip = "10.0.0.5"\n'
     'names = ["web"]\n', 5, "network.nat.dns.host", "need DNS"),
    ('[network.six]\nipv6 = "fd00::1/64"\n[[network.six.dns.host]]\nip = "fd00::5"\n'
     'names = ["web"]\n', 3, "network.six.dns", "only with ipv4 or a dhcp table"),
    # boot files per architecture
    (NAT + '[network.nat.dhcp.boot]\nefi_x64 = "x.efi"\n', 4, "network.nat.dhcp.boot.efi_x64",
     "did you mean 'efi_x86_64'?"),
    (NAT + '[network.nat.dhcp.boot]\nbios = "a b"\n', 4, "network.nat.dhcp.boot.bios", "spaces"),
    (NAT + '[network.nat.dhcp.boot]\nipxe = "#x"\n', 4, "network.nat.dhcp.boot.ipxe",
     "must start with"),
    (NAT + '[network.nat.dhcp]\nboot = "x"\n', 4, "network.nat.dhcp.boot", "a table"),
    # extra dnsmasq options
    (NAT + '[network.nat.dnsmasq]\noptions = ["log-dhcp", "dhcp-script=/bin/sh"]\n', 4,
     "network.nat.dnsmasq.options[1]", "'dhcp-script' is refused: it runs a program"),
    (NAT + '[network.nat.dnsmasq]\noptions = ["conf-file=/etc/x"]\n', 4,
     "network.nat.dnsmasq.options[0]", "reads or writes files"),
    (NAT + '[network.nat.dnsmasq]\noptions = ["nftset=/a/4#inet#t#s"]\n', 4,
     "network.nat.dnsmasq.options[0]", "firewall"),
    (NAT + '[network.nat.dnsmasq]\noptions = ["dhcp-range=10.0.0.1,10.0.0.9"]\n', 4,
     "network.nat.dnsmasq.options[0]", "use ranges and ranges6"),
    (NAT + '[network.nat.dnsmasq]\noptions = ["dhcp-optoin=3"]\n', 4,
     "network.nat.dnsmasq.options[0]",
     "not on the allow list of extra dnsmasq options (did you mean 'dhcp-option'?)"),
    (NAT + '[network.nat.dnsmasq]\noptions = ["log-dhcp\\ndhcp-script=/x"]\n', 4,
     "network.nat.dnsmasq.options[0]", "control character"),
    (NAT + '[network.nat.dnsmasq]\noptions = ["--log-dhcp"]\n', 4,
     "network.nat.dnsmasq.options[0]", "without leading dashes"),
    (NAT + '[network.nat.dnsmasq]\noptions = [" log-dhcp"]\n', 4,
     "network.nat.dnsmasq.options[0]", "not 'name' or 'name=value'"),
    (NAT + '[network.nat.dnsmasq]\noptions = "log-dhcp"\n', 4,
     "network.nat.dnsmasq.options", "an array"),
    (NAT + '[network.nat.dnsmasq]\noption = ["log-dhcp"]\n', 4,
     "network.nat.dnsmasq.option", "did you mean 'options'?"),
    (NAT + '[network.nat.dns]\nenabled = false\n[network.nat.dnsmasq]\noptions = []\n', 5,
     "network.nat.dnsmasq", "no dnsmasq runs"),
    # DNS
    (NAT + '[network.nat.dns]\ndomain = "bad domain"\n', 4, "network.nat.dns.domain",
     "not valid"),
    (NAT + '[network.nat.dns]\nforwarders = ["9.9.9.9", "dns.example"]\n', 4,
     "network.nat.dns.forwarders[1]", "not an IP address"),
    (NAT + '[network.nat.dns]\nforwarders = ["fe80::1%eth0"]\n', 4,
     "network.nat.dns.forwarders[0]", "scoped"),
    (NAT + "[network.nat.dns]\nenabled = 1\n", 4, "network.nat.dns.enabled", "true or false"),
    # attach rules
    (NAT + '[[attach]]\nnetwork = "nta"\nifname = "vnet*"\n', 4, "attach[0].network",
     "no network named 'nta' (did you mean 'nat'?)"),
    (NAT + '[[attach]]\nnetwork = "nat"\n', 3, "attach[0]", "at least one of"),
    (NAT + '[[attach]]\nifname = "vnet*"\n', 3, "attach[0]", "network is required"),
    (NAT + '[[attach]]\nnetwork = "nat"\nmac = "zz:*"\n', 5, "attach[0].mac", "MAC pattern"),
    (NAT + '[[attach]]\nnetwork = "nat"\nifname = "a b"\n', 5, "attach[0].ifname", "spaces"),
    (NAT + '[[attach]]\nnetwork = "nat"\ndomain = "web\\n1"\n', 5, "attach[0].domain",
     "control character"),
    # unknown keys, with a suggestion
    (NAT + 'brige = "x"\n', 3, "network.nat.brige", "unknown key (did you mean 'bridge'?)"),
    (NAT + "[network.nat.dhcp]\nrange = []\n", 4, "network.nat.dhcp.range",
     "did you mean 'ranges'?"),
    (NAT + '[network.nat.dns]\ndomian = "x"\n', 4, "network.nat.dns.domian", "'domain'"),
    (NAT + "[networks.x]\n", 3, "networks", "did you mean 'network'?"),
    ("[daemon]\nlog_levle = 'info'\n", 2, "daemon.log_levle", "'log_level'"),
    (NAT + "[network.nat.dhcp.extra]\n", 3, "network.nat.dhcp.extra", "unknown key"),
    # daemon
    ("[daemon]\nrun_dir = 'run'\n", 2, "daemon.run_dir", "absolute path"),
    ("[daemon]\nlog_level = 'loud'\n", 2, "daemon.log_level", "debug, info"),
    ("[daemon]\nlog_format = 'xml'\n", 2, "daemon.log_format", "kv, json, journal"),
    ("[daemon]\nfirewall_table = 'a-b'\n", 2, "daemon.firewall_table", "table name"),
    ("[daemon]\ndnsmasq_path = 'bin/dnsmasq'\n", 2, "daemon.dnsmasq_path", "absolute path"),
    ("[daemon]\ndnsmasq_user = 'Root'\n", 2, "daemon.dnsmasq_user", "plain user"),
    ("[daemon]\nteardown_on_stop = 'yes'\n", 2, "daemon.teardown_on_stop", "true or false"),
    ('[daemon]\nstate_dir = "/var/lib/x\\ny"\n', 2, "daemon.state_dir", "control character"),
    # syntax
    (NAT + "mtu = \n", 3, "(syntax)", "Invalid value"),
    (NAT + "[network.nat]\n", 3, "(syntax)", "twice"),
]


@pytest.mark.parametrize(("text", "line", "key", "message"), CASES,
                         ids=[f"{i}-{c[2]}" for i, c in enumerate(CASES)])
def test_each_issue(tmp_path: Path, text: str, line: int, key: str, message: str) -> None:
    got = one_issue(tmp_path, text)
    assert got[:2] == (line, key), got
    assert message in got[2], got


def test_issue_string_format(tmp_path: Path) -> None:
    path = write(tmp_path, NAT + "mtu = 10\n")
    with pytest.raises(ConfigError) as err:
        cfg.load(path, str(tmp_path / "none"))
    assert str(err.value) == f"{path}:3: network.nat.mtu: 10 is outside 68..65535"


def test_hostile_hostname_refused(tmp_path: Path) -> None:
    text = NAT + '[[network.nat.dhcp.host]]\nmac = "52:54:00:00:00:01"\n' \
                 'name = "a\\ndhcp-script=/bin/sh"\n'
    line, key, msg = one_issue(tmp_path, text)
    assert (line, key) == (5, "network.nat.dhcp.host[0].name")
    assert msg == "'a\\ndhcp-script=/bin/sh' contains a control character (newline, NUL, ...); " \
                  "refused"
    assert "\n" not in msg


@pytest.mark.parametrize("value", ["a\nb", "a\x00b", "a\x1bb", "a\x7fb", "a\u2028b", "a\x85b"])
def test_control_characters_refused_everywhere(tmp_path: Path, value: str) -> None:
    esc = value.encode("unicode_escape").decode().replace("\\x", "\\u00")
    for key in ("bridge", "uplink"):
        assert "control character" in one_issue(tmp_path, NAT + f'{key} = "{esc}"\n')[2]
    assert "control character" in one_issue(
        tmp_path, NAT + f'[network.nat.dns]\nforwarders = ["{esc}"]\n')[2]
    assert "control character" in one_issue(tmp_path, f'[daemon]\nlibvirt_uri = "{esc}"\n')[2]


def test_all_issues_reported_at_once(tmp_path: Path) -> None:
    text = NAT + "mtu = 1\nstp = 3\n[network.nat.dhcp]\nlease_time = 'x'\n" \
                 '[[attach]]\nnetwork = "gone"\nmac = "52:*"\n'
    keys = [k for _, k, _ in issues(tmp_path, text)]
    assert keys == ["network.nat.mtu", "network.nat.stp", "network.nat.dhcp.lease_time",
                    "attach[0].network"]


def test_cross_network_conflicts(tmp_path: Path) -> None:
    text = (NAT +                                            # 1-2
            '[network.lab]\nipv4 = "10.0.0.1/16"\n'         # 3-4: overlaps nat
            'bridge = "kv-nat"\n'                           # 5: nat's bridge
            '[network.lan]\nmode = "bridged"\nuplink = "eth0"\n'  # 6-8
            '[network.lan2]\nmode = "bridged"\nuplink = "eth0"\n'  # 9-11: uplink again
            '[network.r]\nmode = "routed"\nipv4 = "10.2.0.1/24"\nuplink = "kv-nat"\n'  # 12-15
            )
    got = issues(tmp_path, text)
    assert [(line, key) for line, key, _ in got] == [
        (4, "network.lab.ipv4"), (5, "network.lab.bridge"),
        (11, "network.lan2.uplink"), (15, "network.r.uplink"), (15, "network.r.uplink")]
    assert f"overlaps 10.0.0.0/24 of network 'nat' ({tmp_path}/kvmnetd.toml:1)" in got[0][2]
    assert "bridge 'kv-nat' is already used by network 'nat'" in got[1][2]
    assert "uplink 'eth0' is already used by network 'lan'" in got[2][2]
    assert "'kv-nat' is the bridge of network 'nat'" in got[3][2]
    assert "'kv-nat' is the bridge of network 'lab'" in got[4][2]


def test_bridge_named_like_an_uplink(tmp_path: Path) -> None:
    text = '[network.lan]\nmode = "bridged"\nuplink = "eth0"\n' + NAT + 'bridge = "eth0"\n'
    assert one_issue(tmp_path, text)[:2] == (6, "network.nat.bridge")


def test_host_route_overlap_is_not_a_config_error(tmp_path: Path) -> None:
    # A VPN or LAN route over one network's subnet is that network's trouble at run
    # time (the planner degrades it); the file itself stays valid.
    routes = [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("10.0.0.0/16")]
    conf = load(tmp_path, NAT, host_routes=routes)
    assert "nat" in conf.networks


def test_networks_dir_files(tmp_path: Path) -> None:
    d = tmp_path / "networks.d"
    d.mkdir()
    (d / "b.toml").write_text('[network.b]\nipv4 = "10.2.0.1/24"\n')
    (d / "a.toml").write_text('[network.a]\nipv4 = "10.1.0.1/24"\n[daemon]\n')
    (d / ".hidden.toml").write_text("garbage [")
    (d / "notes.txt").write_text("garbage [")
    (d / "c.toml").write_text('\n[network.nat]\nipv4 = "10.3.0.1/24"\n')
    with pytest.raises(ConfigError) as err:
        load(tmp_path, NAT)
    got = [str(i) for i in err.value.issues]
    assert got == [
        f"{d}/a.toml:3: daemon: [daemon] settings belong in the main configuration file",
        f"{d}/c.toml:2: network.nat: network 'nat' is already defined ({tmp_path}/kvmnetd.toml:1)",
    ]
    (d / "a.toml").write_text('[network.a]\nipv4 = "10.1.0.1/24"\n[[attach]]\n'
                              'network = "b"\nifname = "vnet*"\n')
    (d / "c.toml").unlink()
    conf = load(tmp_path, NAT)
    assert sorted(conf.networks) == ["a", "b", "nat"]
    assert conf.files == (f"{tmp_path}/kvmnetd.toml", f"{d}/a.toml", f"{d}/b.toml")
    assert conf.networks["b"].source is not None
    assert conf.networks["b"].source.file == f"{d}/b.toml"
    assert conf.rules[0].network == "b"
    assert conf.rules[0].source is not None and conf.rules[0].source.line == 3


def test_syntax_error_in_networks_dir_file(tmp_path: Path) -> None:
    d = tmp_path / "networks.d"
    d.mkdir()
    (d / "x.toml").write_text('[network.x]\nipv4 = "10.1.0.1/24"\nmtu = 15OO\n')
    with pytest.raises(ConfigError) as err:
        load(tmp_path, NAT)
    (issue,) = err.value.issues
    assert (issue.file, issue.line, issue.key) == (f"{d}/x.toml", 3, "(syntax)")
    assert "(at line" not in issue.message


def test_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "kvmnetd.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError) as err:
        cfg.load(str(tmp_path / "kvmnetd.toml"), str(tmp_path / "nd"))
    assert [i.key for i in err.value.issues] == ["(file)"]


def test_values_are_model_objects(tmp_path: Path) -> None:
    text = NAT + ('ipv6 = "fd00:10::1/64"\nstp = true\nmtu = 9000\nallow_users = ["alice"]\n'
                  '[network.nat.dhcp]\nranges = ["10.0.0.1 - 10.0.0.100"]\nrouter = false\n'
                  '[[network.nat.dhcp.host]]\nmac = "52-54-00-AB-CD-EF"\nip = "10.0.0.21"\n'
                  '[network.nat.dns]\nforwarders = ["2001:DB8::1"]\n')
    net = load(tmp_path, text).networks["nat"]
    assert net.ipv4 == ipaddress.IPv4Interface("10.0.0.254/24")
    assert net.ipv6 == ipaddress.IPv6Interface("fd00:10::1/64")
    assert (net.stp, net.forward_delay, net.mtu) == (True, 2, 9000)
    assert net.allow_users == ("alice",)
    assert net.dhcp is not None
    assert net.dhcp.ranges == (DhcpRange(ipaddress.ip_address("10.0.0.1"),
                                         ipaddress.ip_address("10.0.0.100")),)
    assert net.dhcp.router is False
    assert net.dhcp.hosts == (DhcpHost("52:54:00:ab:cd:ef", ipaddress.IPv4Address("10.0.0.21")),)
    assert net.dns.forwarders == ("2001:db8::1",)


def test_defaults_of_a_minimal_network(tmp_path: Path) -> None:
    net = load(tmp_path, NAT + "[network.nat.dhcp]\n").networks["nat"]
    assert net == Network(
        name="nat", mode=Mode.NAT, bridge="kv-nat",
        ipv4=ipaddress.IPv4Interface("10.0.0.254/24"),
        dhcp=Dhcp(ranges=(DhcpRange(ipaddress.ip_address("10.0.0.1"),
                                    ipaddress.ip_address("10.0.0.253")),)))
    net = load(tmp_path, '[network.n]\nipv4 = "10.0.0.9/24"\n[network.n.dhcp]\n').networks["n"]
    assert net.dhcp is not None
    assert [(str(r.start), str(r.end)) for r in net.dhcp.ranges] == [
        ("10.0.0.1", "10.0.0.8"), ("10.0.0.10", "10.0.0.254")]
    assert net.source is not None and net.source.line == 1


def test_lease_times_accepted(tmp_path: Path) -> None:
    for value in ("120", "2m", "1h", "3d", "1w", "infinite"):
        net = load(tmp_path, NAT + f'[network.nat.dhcp]\nlease_time = "{value}"\n')
        assert net.networks["nat"].dhcp is not None


def test_daemon_settings_and_overrides(tmp_path: Path) -> None:
    text = ('[daemon]\nrun_dir = "/run/x"\nlibvirt_uri = ""\nteardown_on_stop = true\n'
            f'networks_dir = "{tmp_path}/nd"\n' + NAT)
    conf = cfg.load(write(tmp_path, text), None,
                    overrides={"run_dir": "/run/y", "log_level": "debug"})
    s = conf.settings
    assert (s.run_dir, s.libvirt_uri, s.teardown_on_stop, s.log_level) == \
        ("/run/y", None, True, "debug")
    assert s.networks_dir == f"{tmp_path}/nd"
    assert s.config_file == f"{tmp_path}/kvmnetd.toml"
    conf = cfg.load(write(tmp_path, text), str(tmp_path / "other"),
                    overrides={"networks_dir": "/ignored"})
    assert conf.settings.networks_dir == str(tmp_path / "other")
    with pytest.raises(ConfigError) as err:
        cfg.load(write(tmp_path, text), None,
                 overrides={"run_dri": "/x", "state_dir": "rel", "teardown_on_stop": "maybe"})
    assert [str(i) for i in err.value.issues] == [
        "(command line):0: run_dri: unknown setting (did you mean 'run_dir'?)",
        "(command line):0: state_dir: 'rel' must be an absolute path",
        "(command line):0: teardown_on_stop: 'maybe' is not a boolean (true/false)",
    ]


def test_default_network_when_no_files(tmp_path: Path) -> None:
    conf = cfg.load(str(tmp_path / "missing.toml"), str(tmp_path / "missing.d"))
    assert conf.files == ()
    assert list(conf.networks) == ["default"]
    net = conf.networks["default"]
    assert (net.mode, net.bridge, net.ipv4) == (
        Mode.NAT, "kvbr0", ipaddress.IPv4Interface("10.80.0.1/24"))
    assert net.dhcp == Dhcp(ranges=(DhcpRange(ipaddress.ip_address("10.80.0.2"),
                                              ipaddress.ip_address("10.80.0.254")),))
    assert net.dns.domain is None
    # An existing but empty file means "no networks", not the default.
    assert load(tmp_path, "").networks == {}


def test_default_network_keeps_the_subnet_it_is_given(tmp_path: Path) -> None:
    kept = ipaddress.IPv4Network("10.80.7.0/24")
    conf = cfg.load(str(tmp_path / "missing.toml"), str(tmp_path / "missing.d"),
                    host_routes=[ipaddress.ip_network("10.80.0.0/16")], default_subnet=kept)
    assert conf.networks["default"].ipv4 == ipaddress.IPv4Interface("10.80.7.1/24")
    # Only the built-in default: a declared network is never moved.
    assert load(tmp_path, NAT, default_subnet=kept).networks["nat"].ipv4 == \
        ipaddress.IPv4Interface("10.0.0.254/24")


def test_default_candidates_avoid_other_tools_ranges() -> None:
    avoided = [ipaddress.IPv4Network(net) for net, _ in cfg.AVOIDED]
    cands = list(cfg.default_candidates())
    assert cands[:3] == [ipaddress.IPv4Network(f"10.80.{i}.0/24") for i in range(3)]
    assert cands[2047] == ipaddress.IPv4Network("10.87.255.0/24")
    assert cands[2048] == ipaddress.IPv4Network("172.16.0.0/24")
    assert len(cands) == len(set(cands)) == 2048 + 256
    for cand in cands:
        assert cand.prefixlen == 24 and cand.is_private
        assert not any(cand.overlaps(a) for a in avoided), cand
    # What the table in the docs names, at least.
    for must in ("10.88.0.0/16", "172.17.0.0/16", "192.168.0.0/16"):
        assert ipaddress.IPv4Network(must) in avoided
    for inside in ("10.89.5.0/24", "10.255.255.0/24", "172.31.0.0/24", "192.168.122.0/24",
                   "192.168.121.0/24", "192.168.1.0/24", "10.0.3.0/24"):
        assert any(ipaddress.IPv4Network(inside).subnet_of(a) for a in avoided), inside


def test_default_network_avoids_routes() -> None:
    r = ipaddress.ip_network
    # A Podman host: its network changes nothing, the first candidate is not near it.
    net = cfg.default_network([r("0.0.0.0/0"), r("10.88.0.0/16"), r("fd00::/8")])
    assert net.ipv4 == ipaddress.IPv4Interface("10.80.0.1/24")
    net = cfg.default_network([r("10.80.0.0/23"), r("10.80.3.0/24")])
    assert net.ipv4 == ipaddress.IPv4Interface("10.80.2.1/24")
    net = cfg.default_network([r("10.0.0.0/8"), r("172.16.0.0/23")])
    assert net.ipv4 == ipaddress.IPv4Interface("172.16.2.1/24")
    with pytest.raises(ConfigError):
        cfg.default_network([r("10.0.0.0/8"), r("172.16.0.0/12")])


PXE_LAB = '''
[network.lab]
mode = "isolated"
ipv4 = "10.0.9.1/24"
[network.lab.dhcp]
tftp_root = "/srv/tftp"
boot_file = "pxelinux.0"
[network.lab.dhcp.boot]
bios = "undionly.kpxe"
efi_x86_64 = "ipxe.efi"
ipxe = "http://10.0.9.1/boot.ipxe"
[network.lab.dnsmasq]
options = ["dhcp-option=option:ntp-server,10.0.9.1", "log-dhcp"]
'''


def test_boot_files_and_extra_options_are_read_and_round_trip(tmp_path: Path) -> None:
    from kvmnetd.config.write import render_network_toml
    from kvmnetd.model.desired import BootFiles

    conf = load(tmp_path, PXE_LAB)
    net = conf.networks["lab"]
    assert net.dhcp is not None and net.dhcp.boot == BootFiles(
        bios="undionly.kpxe", efi_x86_64="ipxe.efi", ipxe="http://10.0.9.1/boot.ipxe")
    assert net.dnsmasq_options == ("dhcp-option=option:ntp-server,10.0.9.1", "log-dhcp")
    assert cfg.parse_network_text(render_network_toml(net), "x", conf) == net


def test_isolate_ports_is_read_defaults_off_and_round_trips(tmp_path: Path) -> None:
    from kvmnetd.config.write import render_network_toml

    conf = load(tmp_path, NAT + "isolate_ports = true\n[network.b]\nipv4 = \"10.0.1.1/24\"\n")
    net = conf.networks["nat"]
    assert net.isolate_ports is True and conf.networks["b"].isolate_ports is False
    assert cfg.parse_network_text(render_network_toml(net), "x", conf) == net


def test_example_file_validates() -> None:
    example = REPO / "contrib" / "kvmnetd.example.toml"
    conf = cfg.load(str(example), "/nonexistent/networks.d")
    assert sorted(conf.networks) == ["isolated", "nat"]
    nat, iso = conf.networks["nat"], conf.networks["isolated"]
    assert nat.mode == Mode.NAT and iso.mode == Mode.ISOLATED
    assert nat.ipv4 == ipaddress.IPv4Interface("10.0.0.254/24")
    assert nat.dhcp is not None
    assert [(str(r.start), str(r.end)) for r in nat.dhcp.ranges] == [("10.0.0.1", "10.0.0.100")]
    assert nat.dhcp.hosts == (
        DhcpHost("52:54:00:65:43:21", ipaddress.IPv4Address("10.0.0.21"), "cirros2"),)
    # The commented bridged network is valid once uncommented.
    text = example.read_text()
    bridged = re.findall(r"^# (\[network\.bridged\]\n(?:# .*\n)+)", text, re.M)
    assert bridged
    body = re.sub(r"^# ", "", bridged[0], flags=re.M)
    assert cfg.parse_network_text(body, "x", conf).uplink == "eth0"


def test_parse_network_text(tmp_path: Path) -> None:
    conf = load(tmp_path, NAT)
    net = cfg.parse_network_text('[network.b]\nipv4 = "10.1.0.1/24"\n', "<define>", conf)
    assert net.source is not None and net.source.file == "<define>"
    # Redefining a network is not a conflict with its old self.
    cfg.parse_network_text('[network.nat]\nipv4 = "10.0.0.1/24"\n', "<define>", conf)
    cases = [
        ('[network.b]\nipv4 = "10.0.0.1/16"\n', 2, "network.b.ipv4", "of network 'nat'"),
        ('[network.b]\nipv4 = "10.1.0.1/24"\nbridge = "kv-nat"\n', 3, "network.b.bridge",
         "already used"),
        ("", 1, "network", "exactly one"),
        ('[network.a]\nipv4 = "10.1.0.1/24"\n[network.b]\nipv4 = "10.2.0.1/24"\n', 1,
         "network", "exactly one"),
        ('[daemon]\n[network.b]\nipv4 = "10.1.0.1/24"\n', 1, "daemon", "only a single"),
        ('[network.b]\nipv4 = "10.1.0.1/24"\n[[network.b.dhcp.host]]\nmac = "52:54:00:00:00:01"'
         '\nname = "x\\ndhcp-script=/bin/sh"\n', 5, "network.b.dhcp.host[0].name", "control"),
        ('[network.b\n', 1, "(syntax)", ""),
        ("network = 3\n", 1, "network", "exactly one"),
        ("network.b = 3\n", 1, "network.b", "expected a table"),
    ]
    for text, line, key, msg in cases:
        with pytest.raises(ConfigError) as err:
            cfg.parse_network_text(text, "<define>", conf)
        first = err.value.issues[0]
        assert (first.file, first.line, first.key) == ("<define>", line, key), text
        assert msg in first.message


def test_locator() -> None:
    text = ('top = 1\n[network.nat]  # c\n"we.ird" = """\nmode = 3\n[fake]\n"""\n'
            'dns.forwarders = [\n  "a", # ]\n  "b",\n]\n'
            "[[a]]\n[[a.b]]\nx = 1\n[[a]]\n[[a.b]]\n x = 'y'\n[ \"q\\n\" . r ]\nz = 1")
    loc = Locator(text)
    expect = {("top",): 1, ("network", "nat"): 2, ("network", "nat", "we.ird"): 3,
              ("network", "nat", "mode"): 2, ("fake",): 1,
              ("network", "nat", "dns", "forwarders", 1): 7, ("a", 0): 11, ("a", 0, "b", 0): 12,
              ("a", 0, "b", 0, "x"): 13, ("a", 1): 14, ("a", 1, "b", 0, "x"): 16,
              ("q\n", "r", "z"): 18, ("a", 2): 11}
    assert {k: loc.line(k) for k in expect} == expect
    assert format_path(("q\n", "r", 3, "z")) == '"q\\n".r[3].z'


def test_docs_name_every_key() -> None:
    doc = (REPO / "docs" / "config.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_0-9]+)` \|", doc, re.M))
    accepted = {*v.NETWORK_KEYS, *v.DHCP_KEYS, *v.HOST_KEYS, *v.HOST6_KEYS, *v.DNS_KEYS,
                *v.DNS_HOST_KEYS, *v.ATTACH_KEYS, *v.BOOT_KEYS, *v.DNSMASQ_KEYS,
                *cfg.DAEMON_KEYS, *FORWARD_KEYS, *overlay.HOST_KEYS, *overlay.NETWORK_KEYS} - {
        # tables, with their own sections
        "dhcp", "dns", "host", "host6", "boot", "dnsmasq", "forward", "overlay"}
    assert accepted - documented == set()
    assert documented - accepted == set()
    for section in ("[daemon]", "[network.NAME]", "[network.NAME.dhcp]",
                    "[[network.NAME.dhcp.host]]", "[network.NAME.dhcp.boot]",
                    "[[network.NAME.dhcp.host6]]", "[[network.NAME.dns.host]]",
                    "[network.NAME.dns]", "[network.NAME.dnsmasq]", "[[attach]]",
                    "[[network.NAME.forward]]", "[daemon.overlay]",
                    "[network.NAME.overlay]"):
        assert f"`{section}`" in doc


@pytest.mark.parametrize("table", ["_x", "9t", "a-b", "x" * 33, "", "kvmnetd", "K_9", "x" * 32])
def test_one_rule_for_the_firewall_table_name(tmp_path: Path, table: str) -> None:
    # What --check-config accepts, the renderer and the nft adapter accept too, and
    # what they would refuse is a FILE:LINE error instead of a traceback at start.
    from kvmnetd.adapters.nftables import NftablesAdapter
    from kvmnetd.plan.nft import render_ruleset

    text = f'[daemon]\nfirewall_table = "{table}"\n'
    try:
        load(tmp_path, text)
    except ConfigError as e:
        assert e.issues[0].line == 2 and e.issues[0].key == "daemon.firewall_table"
        with pytest.raises(ValueError):
            render_ruleset([], table)
        with pytest.raises(ValueError):
            NftablesAdapter(table)
        return
    render_ruleset([], table)
    NftablesAdapter(table)
