"""dnsmasq renderer: golden files, digests, refusal of hostile values, lease parsing."""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from kvmnetd.adapters.dnsmasq.conflicts import names_interface
from kvmnetd.adapters.dnsmasq.leases import parse_leases
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
from kvmnetd.model.errors import InvalidArgument
from kvmnetd.plan.dnsmasq import config_digest, dnsmasq_paths, render_config, render_hosts

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "dnsmasq"
v4 = ipaddress.IPv4Interface
v6 = ipaddress.IPv6Interface
a4 = ipaddress.IPv4Address
a6 = ipaddress.IPv6Address
PATHS = dnsmasq_paths(Settings(), "x")

R4 = DhcpRange(a4("10.77.1.100"), a4("10.77.1.199"))
HOSTS = (DhcpHost("52:54:00:65:43:21", a4("10.77.1.10"), "web", "infinite"),
         DhcpHost("52:54:00:00:00:02", name="db"))
NAT = Network("default", Mode.NAT, "kvbr0", v4("10.77.1.1/24"),
              dhcp=Dhcp(ranges=(R4,), hosts=HOSTS),
              dns=Dns(domain="kvm.test", forwarders=("192.0.2.53", "2001:db8::53#5353")))
ISOLATED = Network("iso", Mode.ISOLATED, "kvbr1", v4("10.77.2.1/24"),
                   dhcp=Dhcp(ranges=(DhcpRange(a4("10.77.2.10"), a4("10.77.2.20")),),
                             lease_time="30m", ping_check=True))
PXE = Network("pxe", Mode.NAT, "kvbr2", v4("10.77.3.1/24"),
              dhcp=Dhcp(ranges=(DhcpRange(a4("10.77.3.10"), a4("10.77.3.20")),),
                        tftp_root="/srv/tftp", boot_file="pxelinux.0",
                        next_server=a4("10.77.3.1")))
IPV6 = Network("six", Mode.ROUTED, "kvbr3", v4("10.77.4.1/24"), v6("fd77::1/64"),
               dhcp=Dhcp(ranges=(DhcpRange(a4("10.77.4.10"), a4("10.77.4.20")),),
                         dhcpv6="stateless"))
DNS_OFF = Network("nodns", Mode.NAT, "kvbr4", v4("10.77.5.1/24"),
                  dhcp=Dhcp(ranges=(DhcpRange(a4("10.77.5.10"), a4("10.77.5.20")),)),
                  dns=Dns(enabled=False))
# A PXE lab: a boot file per client architecture, iPXE chain-loading its script.
PXE_ARCH = Network("lab", Mode.ISOLATED, "kvbr5", v4("10.77.6.1/24"),
                   dhcp=Dhcp(ranges=(DhcpRange(a4("10.77.6.10"), a4("10.77.6.20")),),
                             tftp_root="/srv/tftp", boot_file="pxelinux.0",
                             boot=BootFiles(bios="undionly.kpxe", efi_x86_64="ipxe.efi",
                                            efi_arm64="ipxe-arm64.efi",
                                            ipxe="http://10.77.6.1/boot.ipxe")))
EXTRA = replace(DNS_OFF, name="extra", dnsmasq_options=(
    "dhcp-option=option:ntp-server,10.77.5.1", "log-dhcp",
    "dhcp-option=tag:ipxe,option:domain-search,lab.test"))
# libvirt's static hosts: DNS names, a DHCP host by name, DHCPv6 hosts by DUID and by name.
HOSTS_NET = Network(
    "hosts", Mode.NAT, "kvbr6", v4("10.77.7.1/24"), v6("fd77:7::1/64"),
    dhcp=Dhcp(ranges=(DhcpRange(a4("10.77.7.10"), a4("10.77.7.20")),),
              hosts=(DhcpHost(ip=a4("10.77.7.5"), name="vm1", lease_time="2h"),),
              dhcpv6="stateful",
              ranges6=(DhcpRange(a6("fd77:7::10"), a6("fd77:7::ff")),),
              hosts6=(DhcpHost6(id="0:3:0:1:0:16:3e:11:22:33", ip=a6("fd77:7::11"), name="vm"),
                      DhcpHost6(ip=a6("fd77:7::12"), name="vm2", lease_time="infinite"))),
    dns=Dns(domain="lab.test",
            hosts=(DnsHost(a4("10.77.7.50"), ("web", "www", "db.other.test")),
                   DnsHost(a6("fd77:7::50"), ("web",)))))
CASES = {"nat": NAT, "isolated": ISOLATED, "pxe": PXE, "ipv6": IPV6, "dns-off": DNS_OFF,
         "pxe-arch": PXE_ARCH, "extra-options": EXTRA, "hosts": HOSTS_NET}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    net = CASES[case]
    text = render_config(net, dnsmasq_paths(Settings(), net.name))
    path = GOLDEN / f"{case}.conf"
    if os.environ.get("KVMNETD_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text()


def test_required_lines_everywhere() -> None:
    for net in CASES.values():
        lines = render_config(net, dnsmasq_paths(Settings(), net.name)).splitlines()
        for must in ("conf-file=", "strict-order", "bind-interfaces", f"interface={net.bridge}",
                     "except-interface=lo", f"listen-address={net.ipv4.ip if net.ipv4 else ''}",
                     f"pid-file=/run/kvmnetd/{net.name}.pid", "user=kvmnetd-dnsmasq",
                     f"dhcp-leasefile=/var/lib/kvmnetd/{net.name}.leases",
                     f"dhcp-hostsfile=/run/kvmnetd/{net.name}.hosts",
                     "dhcp-authoritative", "dhcp-no-override"):
            assert must in lines, (net.name, must)


def test_mode_decides_default_route_unless_told() -> None:
    assert "dhcp-option=3" in render_config(ISOLATED, PATHS).splitlines()
    assert "dhcp-option=3" not in render_config(NAT, PATHS).splitlines()
    routed_iso = replace(ISOLATED, dhcp=replace(ISOLATED.dhcp or Dhcp(), router=True))
    assert "dhcp-option=3" not in render_config(routed_iso, PATHS).splitlines()
    no_router = replace(NAT, dhcp=replace(NAT.dhcp or Dhcp(), router=False))
    assert "dhcp-option=3" in render_config(no_router, PATHS).splitlines()


def test_dns_off_and_ping() -> None:
    lines = render_config(DNS_OFF, PATHS).splitlines()
    assert "port=0" in lines and "dhcp-option=6" in lines and "no-ping" in lines
    assert "no-ping" not in render_config(ISOLATED, PATHS).splitlines()
    nat = render_config(NAT, PATHS).splitlines()
    assert "no-resolv" in nat and "server=192.0.2.53" in nat and "expand-hosts" in nat
    assert "local=/kvm.test/" in nat and "domain=kvm.test" in nat
    assert "no-resolv" not in render_config(ISOLATED, PATHS)


def test_ipv6_modes() -> None:
    dhcp = IPV6.dhcp or Dhcp()
    ra_only = render_config(replace(IPV6, dhcp=replace(dhcp, dhcpv6="off")), PATHS)
    assert "enable-ra" in ra_only and "dhcp-range=::,constructor:kvbr3,ra-only" in ra_only
    assert "listen-address=fd77::1" in ra_only
    stateful = replace(dhcp, dhcpv6="stateful",
                       ranges6=(DhcpRange(a6("fd77::100"), a6("fd77::1ff")),))
    text = render_config(replace(IPV6, dhcp=stateful), PATHS)
    assert "dhcp-range=fd77::100,fd77::1ff,64,1h" in text
    with pytest.raises(InvalidArgument):
        render_config(replace(IPV6, dhcp=replace(dhcp, dhcpv6="stateful")), PATHS)
    nora = render_config(replace(IPV6, dhcp=replace(dhcp, dhcpv6="off", ra=False)), PATHS)
    assert "enable-ra" not in nora and "::" not in nora.replace("fd77::1", "")


def test_boot_file_per_client_architecture() -> None:
    lines = render_config(PXE_ARCH, PATHS).splitlines()
    boots = [x for x in lines if x.startswith("dhcp-boot=")]
    assert boots == ["dhcp-boot=tag:ipxe,http://10.77.6.1/boot.ipxe",
                     "dhcp-boot=tag:bios,tag:!ipxe,undionly.kpxe",
                     "dhcp-boot=tag:efi-x86_64,tag:!ipxe,ipxe.efi",
                     "dhcp-boot=tag:efi-arm64,tag:!ipxe,ipxe-arm64.efi",
                     "dhcp-boot=pxelinux.0"]
    for arch, tag in ((0, "bios"), (7, "efi-x86_64"), (9, "efi-x86_64"), (11, "efi-arm64")):
        assert f"dhcp-match=set:{tag},option:client-arch,{arch}" in lines
    # Without an iPXE file, iPXE clients are served by their architecture like any other.
    only_bios = replace(PXE_ARCH, dhcp=replace(PXE_ARCH.dhcp or Dhcp(), boot_file=None,
                                               boot=BootFiles(bios="undionly.kpxe")))
    text = render_config(only_bios, PATHS)
    assert "ipxe" not in text and "dhcp-boot=tag:bios,undionly.kpxe" in text.splitlines()


def test_extra_options_come_last_and_are_checked_again() -> None:
    lines = render_config(EXTRA, PATHS).splitlines()
    assert lines[-3:] == list(EXTRA.dnsmasq_options)
    assert lines[-4] == "# extra options from [network.extra.dnsmasq]"
    assert "extra options" not in render_config(DNS_OFF, PATHS)
    for bad in ("dhcp-script=/bin/sh", "conf-file=/etc/shadow", "log-dhcp\ndhcp-script=/x",
                "addn-hosts=/etc/passwd", "--log-dhcp", "dhcp-range=10.0.0.1,10.0.0.2"):
        with pytest.raises(InvalidArgument):
            render_config(replace(EXTRA, dnsmasq_options=(bad,)), PATHS)


def test_hosts_file() -> None:
    assert render_hosts(NAT) == "52:54:00:65:43:21,10.77.1.10,web,infinite\n52:54:00:00:00:02,db\n"
    assert render_hosts(ISOLATED) == ""
    # dnsmasq's own forms: a name alone matches the name the client sends; id: a DUID,
    # written with two digits per octet; IPv6 addresses in brackets.
    assert render_hosts(HOSTS_NET) == ("10.77.7.5,vm1,2h\n"
                                       "id:00:03:00:01:00:16:3e:11:22:33,[fd77:7::11],vm\n"
                                       "[fd77:7::12],vm2,infinite\n")


def test_dns_hosts_answer_in_the_domain_too() -> None:
    lines = render_config(HOSTS_NET, PATHS).splitlines()
    assert "host-record=web,www,db.other.test,web.lab.test,www.lab.test,10.77.7.50" in lines
    assert "host-record=web,web.lab.test,fd77:7::50" in lines
    bare = replace(HOSTS_NET, dns=replace(HOSTS_NET.dns, domain=None))
    assert "host-record=web,www,db.other.test,10.77.7.50" in render_config(bare, PATHS)


def test_hosts_need_an_identity() -> None:
    dhcp = HOSTS_NET.dhcp or Dhcp()
    for net in (replace(HOSTS_NET, dhcp=replace(dhcp, hosts=(DhcpHost(name="vm1"),))),
                replace(HOSTS_NET, dhcp=replace(dhcp, hosts6=(DhcpHost6(ip=a6("fd77:7::11")),))),
                replace(HOSTS_NET, dhcp=replace(dhcp, hosts6=(DhcpHost6(id="00:01"),)))):
        with pytest.raises(InvalidArgument):
            render_hosts(net)


def test_digests_split_hosts_from_the_rest() -> None:
    restart, reload = config_digest(NAT)
    more = replace(NAT, dhcp=replace(NAT.dhcp or Dhcp(), hosts=HOSTS[:1]))
    assert config_digest(more)[0] == restart and config_digest(more)[1] != reload
    other_range = replace(NAT, dhcp=replace(NAT.dhcp or Dhcp(),
                                            ranges=(DhcpRange(a4("10.77.1.50"), R4.end),)))
    assert config_digest(other_range)[0] != restart
    assert config_digest(replace(NAT, mtu=9000)) == (restart, reload)
    assert config_digest(NAT, dnsmasq_paths(replace(Settings(), dnsmasq_user="dnsmasq"),
                                            NAT.name))[0] != restart


HOSTILE = ["a\ndhcp-script=/bin/sh", "-x", "a\0b", "a\rb", "a\tb", "a,b", "a b", "\x1b[0m"]


@pytest.mark.parametrize("bad", HOSTILE)
def test_refuses_hostile_host_names(bad: str) -> None:
    net = replace(NAT, dhcp=replace(NAT.dhcp or Dhcp(),
                                    hosts=(DhcpHost("52:54:00:00:00:09", name=bad),)))
    with pytest.raises(InvalidArgument):
        render_hosts(net)
    with pytest.raises(InvalidArgument):
        config_digest(net)


@pytest.mark.parametrize("bad", HOSTILE)
def test_refuses_hostile_values_in_the_config(bad: str) -> None:
    dhcp = NAT.dhcp or Dhcp()
    variants = [
        replace(NAT, bridge=bad),
        replace(NAT, name=bad),
        replace(NAT, dns=Dns(domain=bad)),
        replace(NAT, dns=Dns(forwarders=(bad,))),
        replace(NAT, dhcp=replace(dhcp, lease_time=bad)),
        replace(NAT, dhcp=replace(dhcp, tftp_root=bad if bad[0] == "-" else "/srv/" + bad)),
        replace(NAT, dhcp=replace(dhcp, boot_file=bad)),
        replace(NAT, dhcp=replace(dhcp, hosts=(DhcpHost(bad),))),
        replace(NAT, dhcp=replace(dhcp, hosts=(DhcpHost("52:54:00:00:00:09",
                                                        lease_time=bad),))),
        replace(NAT, dhcp=replace(dhcp, hosts=(DhcpHost(ip=a4("10.77.1.5"), name=bad),))),
        replace(NAT, dhcp=replace(dhcp, hosts6=(DhcpHost6(id=bad, ip=a6("fd77::5")),))),
        replace(NAT, dhcp=replace(dhcp, hosts6=(DhcpHost6(ip=a6("fd77::5"), name=bad),))),
        replace(NAT, dns=Dns(hosts=(DnsHost(a4("10.77.1.5"), (bad,)),))),
        replace(NAT, dns=Dns(hosts=(DnsHost(a4("10.77.1.5"), ()),))),
    ]
    for net in variants:
        with pytest.raises(InvalidArgument):
            render_config(net, PATHS)
            render_hosts(net)
    with pytest.raises(InvalidArgument):
        render_config(NAT, replace(PATHS, user=bad))
    with pytest.raises(InvalidArgument):
        render_config(NAT, replace(PATHS, pid="/run/" + bad if bad[0] != "-" else bad))


def test_lease_parsing() -> None:
    text = ("1795616353 52:54:00:65:43:21 10.77.1.10 web 01:52:54:00:65:43:21\n"
            "0 52:54:00:00:00:02 10.77.1.11 * *\n"
            "duid 00:01:00:01:2c:aa:bb:cc:52:54:00:00:00:03\n"
            "1795616400 1234 fd77::100 six 00:01:00:01:2c:aa\n"
            "garbage\n")
    leases = parse_leases(text)
    assert [(x.mac, x.ip, x.hostname, x.client_id, x.expires) for x in leases] == [
        ("52:54:00:65:43:21", "10.77.1.10", "web", "01:52:54:00:65:43:21", 1795616353),
        ("52:54:00:00:00:02", "10.77.1.11", "", "", 0),
        ("", "fd77::100", "six", "00:01:00:01:2c:aa", 1795616400),
    ]


def test_names_interface() -> None:
    assert names_interface(["dnsmasq", "--interface=br0"], "br0")
    assert names_interface(["dnsmasq", "-i", "eth1,br0"], "br0")
    assert names_interface(["dnsmasq", "-ibr0"], "br0")
    assert not names_interface(["dnsmasq", "--interface=br01"], "br0")


@pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="needs dnsmasq")
@pytest.mark.parametrize("case", sorted(CASES))
def test_dnsmasq_accepts_rendered_config(case: str) -> None:
    net = CASES[case]
    with tempfile.TemporaryDirectory() as d:
        settings = Settings(run_dir=d, state_dir=d)
        conf = Path(d) / "x.conf"
        # The hosts file as dhcp-host lines: --test checks their syntax too.
        hosts = "".join(f"dhcp-host={line}\n" for line in render_hosts(net).splitlines())
        conf.write_text(render_config(net, dnsmasq_paths(settings, net.name)) + hosts)
        r = subprocess.run(["dnsmasq", f"--conf-file={conf}", "--test"],
                           capture_output=True, text=True, check=False)
        assert r.returncode == 0, r.stderr
