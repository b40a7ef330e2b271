"""Real guests (qemu under TCG) connected by the qemu hooks, by policy and by live moves."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.support.dbus import PrivateBus
from tests.support.guest import (
    Guest,
    console_lease,
    guest_images,
    libvirt_guest_xml,
    wait_for_link,
)
from tests.support.netns import sh
from tests.support.rig import FAR_HOST, HOST_UPLINK_IP, Sandbox, wait_until
from tests.support.toml import attach_toml, daemon_toml, network_toml

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
IFUP = str(REPO / "contrib" / "qemu-ifup")
IFDOWN = str(REPO / "contrib" / "qemu-ifdown")
STATIC_MAC = "52:54:00:65:43:21"

CONFIG = (
    network_toml("nat", "nat", "kvnat0", "10.0.0.254/24", dhcp_range="10.0.0.1-10.0.0.100",
                 hosts=[(STATIC_MAC, "10.0.0.21", "cirros2")])
    + network_toml("isolated", "isolated", "kviso0", "10.0.1.1/24",
                   dhcp_range="10.0.1.10-10.0.1.50")
    + attach_toml("nat", ifname="auto*"))


@pytest.fixture
def images() -> tuple[str, str]:
    return guest_images()


def hook_env(bus: PrivateBus, network: str | None = "nat") -> dict[str, str]:
    env = {"DBUS_SYSTEM_BUS_ADDRESS": bus.address,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    if network:
        env["KVMNET_NETWORK"] = network
    return env


def upstream_sees(g: Guest) -> str | None:
    rc, out = g.run(f"nc -w 3 {FAR_HOST} 9999 </dev/null")
    return out[0].strip() if rc == 0 and out else None


def start(box: Sandbox, bus: PrivateBus) -> None:
    box.write_config(CONFIG)
    box.start_daemon("--bus-address", bus.address)


def test_qemu_ifup_on_nat_lease_gateway_and_upstream(box: Sandbox, bus: PrivateBus,
                                                      images: tuple[str, str]) -> None:
    start(box, bus)
    with Guest.boot("vm1", box.host, "vnet1", "52:54:00:00:00:11", ifup=IFUP, ifdown=IFDOWN,
                    images=images, env=hook_env(bus)) as g:
        lease = g.lease(timeout=30)
        assert lease["ip"].startswith("10.0.0.") and lease["router"] == "10.0.0.254"
        assert g.ping("10.0.0.254") and g.ping(FAR_HOST)
        assert upstream_sees(g) == HOST_UPLINK_IP
        leases = json.loads(box.ctl_out("leases", "nat", "--json"))
        assert "52:54:00:00:00:11" in {x["mac"] for x in leases}


def test_the_articles_experiment_with_live_moves(box: Sandbox, bus: PrivateBus,
                                                 images: tuple[str, str]) -> None:
    start(box, bus)
    env = hook_env(bus)
    with Guest.boot("c1", box.host, "vnet1", "52:54:00:00:00:31", ifup=IFUP, ifdown=IFDOWN,
                    images=images, env=env) as a, \
         Guest.boot("c2", box.host, "vnet2", STATIC_MAC, ifup=IFUP, ifdown=IFDOWN,
                    images=images, env=env) as b:
        ip_a = a.lease(timeout=30)["ip"]
        assert b.lease(timeout=30)["ip"] == "10.0.0.21", "the static host gets exactly its IP"
        assert a.ping("10.0.0.21") and b.ping(ip_a)
        box.ctl_out("port", "move", "vnet1", "isolated")
        box.ctl_out("port", "move", "vnet2", "isolated")
        assert a.ping("10.0.0.21"), "guests moved together still reach each other"
        assert not a.ping(FAR_HOST, timeout=4) and not b.ping(FAR_HOST, timeout=4)
        box.ctl_out("port", "move", "vnet1", "nat")
        box.ctl_out("port", "move", "vnet2", "nat")
        assert a.ping(FAR_HOST) and b.ping(FAR_HOST)


def test_script_no_with_an_auto_attach_rule(box: Sandbox, bus: PrivateBus,
                                            images: tuple[str, str]) -> None:
    start(box, bus)
    with Guest.boot("p1", box.host, "auto1", "52:54:00:00:00:41", images=images) as g:
        lease = g.lease(timeout=30)
        assert lease["ip"].startswith("10.0.0.")
        assert g.ping("10.0.0.254")


FOREIGN = """
table inet foreign {
    chain guard {
        type filter hook forward priority 10; policy accept;
        ip saddr 192.0.2.0/24 counter accept comment "someone else's"
    }
}
"""


def test_downscript_removes_only_that_port(box: Sandbox, bus: PrivateBus,
                                           images: tuple[str, str]) -> None:
    sh("nft", "-f", "-", ns=box.host, input=FOREIGN)
    sh("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "192.0.2.0/24", "-j", "MASQUERADE",
       ns=box.host)
    foreign = sh("nft", "list", "table", "inet", "foreign", ns=box.host).stdout
    start(box, bus)
    env = hook_env(bus)
    with Guest.boot("d1", box.host, "vnet1", "52:54:00:00:00:51", ifup=IFUP, ifdown=IFDOWN,
                    images=images, env=env) as a:
        b = Guest.boot("d2", box.host, "vnet2", "52:54:00:00:00:52", ifup=IFUP, ifdown=IFDOWN,
                       images=images, env=env)
        try:
            ip_b = b.lease(timeout=30)["ip"]
            ip_a = a.lease(timeout=30)["ip"]
            assert a.ping(ip_b)
        finally:
            b.stop()
        assert wait_until(lambda: "vnet2" not in sh("ip", "-o", "link", ns=box.host).stdout)
        ports = json.loads(box.ctl_out("port", "list", "--json"))
        assert [p["ifname"] for p in ports] == ["vnet1"]
        assert a.ping("10.0.0.254") and a.ping(FAR_HOST)
        assert ip_a
    assert sh("nft", "list", "table", "inet", "foreign", ns=box.host).stdout == foreign
    assert "192.0.2.0/24" in sh("iptables-save", "-t", "nat", ns=box.host).stdout
    assert "kvnat0" in sh("ip", "-o", "link", ns=box.host).stdout, "the bridge stays"


def test_hook_fails_clearly_when_the_daemon_is_down(box: Sandbox, bus: PrivateBus) -> None:
    sh("ip", "tuntap", "add", "vnet9", "mode", "tap", ns=box.host)
    r = sh(IFUP, "vnet9", ns=box.host, check=False, env=hook_env(bus))
    assert r.returncode != 0 and "kvmnetd" in r.stderr
    wait_for_link(box.host, "vnet9")


def libvirt_guest(name: str, tap: str, mac: str, console: Path,
                  images: tuple[str, str]) -> str:
    return libvirt_guest_xml(name, f"""<interface type='ethernet'><target dev='{tap}'/>
      <mac address='{mac}'/><model type='virtio'/><rom enabled='no'/></interface>""",
                             console, images)
    for line in console.read_text(errors="replace").splitlines():
        if line.startswith("KVMNET lease ok=1"):
            return dict(f.split("=", 1) for f in line.split()[2:] if "=" in f)
    return None


def port_names(box: Sandbox) -> set[str]:
    return {p["ifname"] for p in json.loads(box.ctl_out("port", "list", "--json"))}


def test_libvirt_domains_follow_their_lifecycle(box: Sandbox, images: tuple[str, str]) -> None:
    from tests.support.libvirtd import private_libvirtd

    with private_libvirtd(ns=box.host) as lv:
        box.write_config(CONFIG + attach_toml("nat", domain="lv-static")
                         + attach_toml("nat", domain="lv-later")
                         + daemon_toml(libvirt_uri=lv.uri))
        box.start_daemon("--no-bus")
        first = box.tmp / "lv-static.log"
        lv.create(libvirt_guest("lv-static", "lvt1", STATIC_MAC, first, images))
        assert wait_until(lambda: "lvt1" in port_names(box), timeout=10)
        lease = wait_until(lambda: console_lease(first), timeout=60)
        assert lease and lease["ip"] == "10.0.0.21", "the static host gets its address by MAC"
        lv.virsh("destroy", "lv-static")
        assert wait_until(lambda: "lvt1" not in port_names(box), timeout=10)
        # libvirtd goes away and comes back: kvmnetd reconnects and follows new domains.
        lv.stop()
        lv.start()
        later = box.tmp / "lv-later.log"
        lv.create(libvirt_guest("lv-later", "lvt2", "52:54:00:00:00:71", later, images))
        assert wait_until(lambda: "lvt2" in port_names(box), timeout=20)
        lease = wait_until(lambda: console_lease(later), timeout=60)
        assert lease and lease["ip"].startswith("10.0.0.")
