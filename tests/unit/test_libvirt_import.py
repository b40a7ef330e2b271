"""import-libvirt: every mapped libvirt network element, and every refusal by name."""

from __future__ import annotations

import tomllib

import pytest

from kvmnetd.cli_libvirt import REFUSED
from kvmnetd.config.libvirt_import import ImportRefused, check, parse_network

FULL = """<network connections='1'>
  <name>lab</name>
  <uuid>2a9a2a4e-2e7b-4b6b-9a5e-1f2b3c4d5e6f</uuid>
  <title>Lab</title>
  <description>the lab network</description>
  <forward mode='nat' dev='eth0'>
    <interface dev='eth0'/>
    <nat><port start='1024' end='65535'/></nat>
  </forward>
  <bridge name='virbr7' stp='on' delay='4'/>
  <mtu size='9000'/>
  <mac address='52:54:00:0a:cd:21'/>
  <domain name='lab.kvm' localOnly='yes'/>
  <dns forwardPlainNames='yes'>
    <forwarder addr='192.0.2.53'/>
    <forwarder addr='2001:db8::53'/>
    <host ip='10.24.10.5'><hostname>web</hostname><hostname>www</hostname></host>
    <host ip='fd00:24::5'><hostname>web6</hostname></host>
  </dns>
  <ip address='10.24.10.1' netmask='255.255.255.0'>
    <tftp root='/srv/tftp'/>
    <dhcp>
      <range start='10.24.10.100' end='10.24.10.199'><lease expiry='12' unit='hours'/></range>
      <range start='10.24.10.200' end='10.24.10.210'/>
      <host mac='52:54:00:AA:00:01' name='web' ip='10.24.10.21'>
        <lease expiry='0'/>
      </host>
      <host mac='52:54:00:aa:00:02' ip='10.24.10.22'/>
      <host name='vm1' ip='10.24.10.23'/>
      <bootp file='pxelinux.0' server='10.24.10.5'/>
    </dhcp>
  </ip>
  <ip family='ipv6' address='fd00:24::1' prefix='64'>
    <dhcp>
      <range start='fd00:24::100' end='fd00:24::1ff'/>
      <host id='0:3:0:1:0:16:3e:11:22:33' name='vm' ip='fd00:24::11'/>
      <host name='vm2' ip='fd00:24::12'><lease expiry='2' unit='hours'/></host>
    </dhcp>
  </ip>
</network>
"""


def imported(xml: str) -> dict[str, object]:
    imp = parse_network(xml)
    check(imp)  # kvmnetd's own loader accepts it
    doc = tomllib.loads(imp.toml())
    return dict(doc["network"][imp.name])


def test_every_mapped_element() -> None:
    imp = parse_network(FULL)
    assert imp.name == "lab"
    assert imported(FULL) == {
        "mode": "nat", "bridge": "virbr7", "ipv4": "10.24.10.1/24", "ipv6": "fd00:24::1/64",
        "uplink": "eth0", "stp": True, "forward_delay": 4, "mtu": 9000,
        "dns": {"domain": "lab.kvm", "forwarders": ["192.0.2.53", "2001:db8::53"],
                "host": [{"ip": "10.24.10.5", "names": ["web", "www"]},
                         {"ip": "fd00:24::5", "names": ["web6"]}]},
        "dhcp": {
            "ranges": ["10.24.10.100-10.24.10.199", "10.24.10.200-10.24.10.210"],
            "ranges6": ["fd00:24::100-fd00:24::1ff"], "dhcpv6": "stateful",
            "lease_time": "12h", "tftp_root": "/srv/tftp", "boot_file": "pxelinux.0",
            "next_server": "10.24.10.5",
            "host": [{"mac": "52:54:00:aa:00:01", "ip": "10.24.10.21", "name": "web",
                      "lease_time": "infinite"},
                     {"mac": "52:54:00:aa:00:02", "ip": "10.24.10.22"},
                     {"ip": "10.24.10.23", "name": "vm1"}],
            "host6": [{"id": "0:3:0:1:0:16:3e:11:22:33", "ip": "fd00:24::11", "name": "vm"},
                      {"ip": "fd00:24::12", "name": "vm2", "lease_time": "2h"}],
        },
    }
    # Nothing dropped silently: what carries no setting is named.
    assert any("<mac address='52:54:00:0a:cd:21'>" in n for n in imp.notes)
    assert any("<title>" in n for n in imp.notes) and any("<port" in n for n in imp.notes)
    assert imp.toml().startswith("# not kept: ")


@pytest.mark.parametrize(("forward", "mode"), [
    ("<forward mode='route'/>", "routed"),
    ("<forward mode='none'/>", "isolated"),
    ("", "isolated"),
    ("<forward/>", "nat"),
])
def test_forward_modes(forward: str, mode: str) -> None:
    xml = (f"<network><name>n</name>{forward}<bridge name='kvn0' stp='off'/>"
           "<ip address='10.9.0.1' prefix='24'><dhcp/></ip><dns enable='no'/></network>")
    net = imported(xml)
    assert net["mode"] == mode and net["stp"] is False
    assert net["dhcp"] == {"ranges": []}  # a <dhcp> without ranges: static hosts only
    assert net["dns"] == {"enabled": False}


@pytest.mark.parametrize(("port", "want"), [("<port isolated='yes'/>", True),
                                            ("<port isolated='no'/>", False)])
def test_isolated_ports(port: str, want: bool) -> None:
    assert imported(NET.format("", "", port))["isolate_ports"] is want


def test_lease_in_minutes_by_default_and_stp_floor() -> None:
    xml = ("<network><name>n</name><bridge name='kvn0' delay='0'/>"
           "<ip address='10.9.0.1' prefix='24'><dhcp><range start='10.9.0.10' end='10.9.0.20'>"
           "<lease expiry='90'/></range></dhcp></ip></network>")
    net = imported(xml)
    assert net["dhcp"] == {"ranges": ["10.9.0.10-10.9.0.20"], "lease_time": "90m"}
    assert net["stp"] is True and "forward_delay" not in net  # libvirt's STP default


NET = "<network><name>n</name>{}<ip address='10.9.0.1' prefix='24'>{}</ip>{}</network>"

REFUSALS = [
    (NET.format("", "", "<ip family='ipv4' address='10.24.10.1' prefix='24'/>"),
     "<ip family='ipv4' address='10.24.10.1'>: a second IPv4 subnet is not supported"),
    (NET.format("", "", "<ip family='ipv6' address='fd00::1'/><ip family='ipv6' "
                "address='fd01::1'/>"), "<ip family='ipv6' address='fd01::1'>: a second IPv6"),
    (NET.format("<forward mode='open'/>", "", ""), "<forward mode='open'>: forward mode 'open'"),
    (NET.format("<forward mode='bridge'/>", "", ""), "forward mode 'bridge' is not supported"),
    (NET.format("<forward mode='passthrough'/>", "", ""), "forward mode 'passthrough'"),
    (NET.format("<forward mode='hostdev'/>", "", ""), "forward mode 'hostdev'"),
    (NET.format("<forward mode='private'/>", "", ""), "forward mode 'private'"),
    (NET.format("<forward mode='vepa'/>", "", ""), "forward mode 'vepa'"),
    (NET.format("<forward><nat><port start='2000' end='3000'/></nat></forward>", "", ""),
     "<port start='2000' end='3000'>: a NAT port range is not supported"),
    (NET.format("<forward><nat><address start='192.0.2.1' end='192.0.2.9'/></nat></forward>",
                "", ""), "<address start='192.0.2.1' end='192.0.2.9'>: a NAT address range"),
    (NET.format("<forward><nat ipv6='yes'/></forward>", "", ""), "NAT of IPv6"),
    (NET.format("<forward dev='eth0'><interface dev='eth1'/></forward>", "", ""),
     "<interface dev='eth1'>: a pool of forward interfaces"),
    (NET.format("<forward><pf dev='eth0'/></forward>", "", ""), "<pf dev='eth0'>: not supported"),
    (NET.format("", "", "<dns><srv service='ldap' protocol='tcp'/></dns>"),
     "<srv service='ldap' protocol='tcp'>: SRV records are not supported"),
    (NET.format("", "", "<dns><txt name='x' value='y'/></dns>"), "TXT records"),
    (NET.format("", "", "<dns><host ip='10.9.0.7'/></dns>"),
     "<host ip='10.9.0.7'>: a DNS host without a <hostname>"),
    (NET.format("", "", "<dns><host ip='10.9.0.x'><hostname>h</hostname></host></dns>"),
     "<host ip='10.9.0.x'>: ip='10.9.0.x' is not an IP address"),
    (NET.format("", "", "<dns><host ip='10.9.0.7'><hostname>-h</hostname></host></dns>"),
     "network.n.dns.host[0].names[0]"),  # kvmnetd's loader: the host-name rule
    (NET.format("", "", "<dns><host ip='10.9.0.7'><alias>h</alias></host></dns>"),
     "<alias>: not supported inside <host ip='10.9.0.7'>"),
    (NET.format("", "", "<dns><forwarder domain='ex.org' addr='192.0.2.1'/></dns>"),
     "a forwarder for one domain"),
    (NET.format("", "", "<dns forwardPlainNames='no'/>"), "forwardPlainNames='no'"),
    (NET.format("", "", "<domain name='x' localOnly='no'/>"), "localOnly='no'"),
    (NET.format("", "", "<domain name='x' register='yes'/>"), "register='yes'"),
    (NET.format("", "<dhcp><host id='0:3:0:1:0:16:3e:11:22:33' ip='10.9.0.9'/></dhcp>", ""),
     "a DHCP host by client id is not supported under IPv4"),
    (NET.format("", "<dhcp><host name='web'/></dhcp>", ""),
     "<host name='web'>: a DHCP host needs mac, or name and ip"),
    (NET.format("", "<dhcp><host name='web' ip='10.9.0.9'/><host name='web' ip='10.9.0.8'/>"
                "</dhcp>", ""), "name web is already used by host[0]"),
    (NET.format("", "", "<ip family='ipv6' address='fd00::1' prefix='64'><dhcp>"
                "<range start='fd00::10' end='fd00::20'/>"
                "<host mac='52:54:00:00:00:01' ip='fd00::9'/></dhcp></ip>"),
     "a DHCPv6 host by MAC is not supported"),
    (NET.format("", "", "<ip family='ipv6' address='fd00::1' prefix='64'><dhcp>"
                "<range start='fd00::10' end='fd00::20'/><host id='0:1:0:1:2'/></dhcp></ip>"),
     "<host id='0:1:0:1:2'>: a DHCPv6 host without ip"),
    (NET.format("", "", "<ip family='ipv6' address='fd00::1' prefix='64'><dhcp>"
                "<range start='fd00::10' end='fd00::20'/><host ip='fd00::9'/></dhcp></ip>"),
     "<host ip='fd00::9'>: a DHCPv6 host needs id or name"),
    (NET.format("", "", "<ip family='ipv6' address='fd00::1' prefix='64'><dhcp>"
                "<range start='fd00::10' end='fd00::20'/><host id='0:1:x' ip='fd00::9'/>"
                "</dhcp></ip>"), "network.n.dhcp.host6[0].id"),  # the loader: not a DUID
    (NET.format("", "", "<ip family='ipv6' address='fd00::1' prefix='64'><dhcp>"
                "<range start='fd00::10' end='fd00::20'/><host id='0:1:0:1' ip='fd01::9'/>"
                "</dhcp></ip>"), "outside the network's subnet fd00::/64"),
    (NET.format("", "<tftp root='/srv'/>", ""), "<tftp root='/srv'>: TFTP without DHCP"),
    (NET.format("", "<dhcp><range start='10.9.0.10' end='10.9.0.20'><lease expiry='1' "
                "unit='minutes'/></range></dhcp>", ""), "a lease time under 120 s"),
    (NET.format("", "<dhcp><range start='10.9.0.10' end='10.9.0.20'><lease expiry='1' "
                "unit='hours'/></range><range start='10.9.0.30' end='10.9.0.40'><lease "
                "expiry='2' unit='hours'/></range></dhcp>", ""), "a lease time other than"),
    (NET.format("", "<dhcp><range start='10.9.0.10' end='10.9.0.20'><lease expiry='1' "
                "unit='days'/></range></dhcp>", ""), "unit 'days'"),
    (NET.format("", "", "<route address='192.0.2.0' prefix='24' gateway='10.9.0.2'/>"),
     "<route address='192.0.2.0' prefix='24'>: static routes are not supported"),
    (NET.format("", "", "<portgroup name='x'/>"), "<portgroup name='x'>: port groups"),
    (NET.format("", "", "<bandwidth/>"), "<bandwidth>: bandwidth limits"),
    (NET.format("", "", "<vlan/>"), "<vlan>: VLAN tags"),
    (NET.format("", "", "<virtualport type='openvswitch'/>"), "virtual ports"),
    (NET.format("", "", "<port isolated='yes' trust='no'/>"), "attribute 'trust'"),
    (NET.format("", "", "<bridge name='b0' zone='trusted'/>"), "a firewalld zone"),
    (NET.format("", "", "<bridge name='b0' macTableManager='libvirt'/>"), "macTableManager"),
    (NET.format("", "", "<bridge name='b0' foo='1'/>"), "<bridge name='b0' foo='1'>: "
     "attribute 'foo' is not supported"),
    (NET.format("", "<unknown/>", ""), "<unknown>: not supported inside <ip"),
    (NET.format("", "", "<mtu size='big'/>"), "size='big' is not a whole number"),
    (NET.format("", "", "<mtu size='50'/>"), "(import)"),  # kvmnetd's loader: MTU range
    (NET.format("", "", "<metadata><kvmnet:network xmlns:kvmnet='https://kvmnetd.org/xmlns/1'>"
                "n</kvmnet:network></metadata>"), "kvmnetd's own already"),
    ("<network xmlns:dnsmasq='http://libvirt.org/schemas/network/dnsmasq/1.0'><name>n</name>"
     "<dnsmasq:options><dnsmasq:option value='x'/></dnsmasq:options></network>",
     "<dnsmasq:options>: dnsmasq options are not supported"),
    ("<network ipv6='yes'><name>n</name></network>", "guest-to-guest IPv6"),
    ("<network trustGuestRxFilters='yes'><name>n</name></network>", "trustGuestRxFilters"),
    ("<network><name>n</name><bridge name='b0'/></network>",
     "a network without an IP address is not supported"),
    ("<network><name>a.b</name></network>", "is not a kvmnetd network name"),
    ("<network><name>n</name><name>m</name></network>", "<name>: given twice"),
    ("<domain/>", "not a libvirt network"),
    ("<!DOCTYPE network [<!ENTITY x 'y'>]><network/>", "DOCTYPE or ENTITY"),
    ("<network>", "not well-formed"),
]


@pytest.mark.parametrize(("xml", "message"), REFUSALS)
def test_refused_by_name(xml: str, message: str) -> None:
    with pytest.raises(ImportRefused) as exc:
        check(parse_network(xml))
    assert message in str(exc.value)


def test_cli_exit_codes(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    from kvmnetd.cli import main

    d = Path(str(tmp_path))
    (d / "bad.xml").write_text(REFUSALS[0][0])
    with pytest.raises(SystemExit) as exited:
        main(["network", "import-libvirt", str(d / "bad.xml")])
    assert exited.value.code == REFUSED
    err = capsys.readouterr().err
    assert err.strip() == ("import-libvirt: <ip family='ipv4' address='10.24.10.1'>: a second "
                           "IPv4 subnet is not supported")
    (d / "ok.xml").write_text(FULL)
    assert main(["network", "import-libvirt", str(d / "ok.xml")]) == 0
    out = capsys.readouterr()
    assert tomllib.loads(out.out)["network"]["lab"]["mode"] == "nat"
    assert "not kept" in out.err


def test_libvirt_leases_as_dnsmasq_lines() -> None:
    from kvmnetd.config.libvirt_import import dnsmasq_leases

    records = [
        {"type": 0, "expirytime": 2000, "mac": "52:54:00:AA:00:01", "ipaddr": "10.0.0.5",
         "hostname": "web", "clientid": "01:52:54:00:aa:00:01"},
        {"type": 0, "expirytime": 0, "mac": "52:54:00:aa:00:02", "ipaddr": "10.0.0.6",
         "hostname": None, "clientid": None},
        {"type": 0, "expirytime": 500, "mac": "52:54:00:aa:00:03", "ipaddr": "10.0.0.7"},
        {"type": 1, "expirytime": 2000, "mac": "52:54:00:aa:00:04", "ipaddr": "fd00::7"},
        {"type": 0, "expirytime": 2000, "mac": "52:54:00:aa:00:05", "ipaddr": "10.0.0.8",
         "hostname": "a b"},
    ]
    text, v6 = dnsmasq_leases(records, now=1000)
    assert text == ("2000 52:54:00:aa:00:01 10.0.0.5 web 01:52:54:00:aa:00:01\n"
                    "0 52:54:00:aa:00:02 10.0.0.6 * *\n")
    assert v6 == 1  # expired and malformed ones are simply not leases any more


def test_static_hosts_load_as_kvmnetd_hosts() -> None:
    import ipaddress

    from kvmnetd.config import load as cfg
    from kvmnetd.model.desired import DhcpHost, DhcpHost6, DnsHost, Settings

    empty = cfg.Config(settings=Settings(), networks={}, rules=(), files=())
    net = cfg.parse_network_text(parse_network(FULL).toml(), "(import)", empty)
    assert net.dns.hosts == (
        DnsHost(ipaddress.ip_address("10.24.10.5"), ("web", "www")),
        DnsHost(ipaddress.ip_address("fd00:24::5"), ("web6",)))
    assert net.dhcp is not None
    assert DhcpHost(ip=ipaddress.IPv4Address("10.24.10.23"), name="vm1") in net.dhcp.hosts
    # libvirt's one-digit DUID groups, as dnsmasq wants them: two digits each.
    assert net.dhcp.hosts6 == (
        DhcpHost6(id="00:03:00:01:00:16:3e:11:22:33",
                  ip=ipaddress.IPv6Address("fd00:24::11"), name="vm"),
        DhcpHost6(ip=ipaddress.IPv6Address("fd00:24::12"), name="vm2", lease_time="2h"))
