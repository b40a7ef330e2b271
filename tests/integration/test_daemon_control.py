"""The real daemon driven through its control plane: kvmnetctl, busctl and gdbus."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from tests.support.dbus import PrivateBus
from tests.support.netns import ping, sh
from tests.support.rig import FAR_HOST, HOST_UPLINK_IP, Sandbox, wait_until
from tests.support.toml import daemon_toml, network_toml

pytestmark = pytest.mark.integration

CONFIG = (
    network_toml("nat", "nat", "kvnat0", "10.60.0.1/24", dhcp_range="10.60.0.100-10.60.0.150",
                 hosts=[("52:54:00:65:43:21", "10.60.0.21", "cirros2")], domain="nat.test")
    + network_toml("iso", "isolated", "kviso0", "10.61.0.1/24", dns=False,
                   allow_users=["nobody"]))

EXTRA = network_toml("extra", "routed", "kvext0", "10.62.0.1/24", dns=False, autostart=False)

BUS = "org.kvmnetd.Kvmnetd1"
PATH = "/org/kvmnetd/Kvmnetd1"




def test_every_verb_against_the_real_daemon(box: Sandbox, bus: PrivateBus) -> None:
    box.write_config(CONFIG)
    g1 = box.guest("vm1", mac="52:54:00:65:43:21")
    g2 = box.guest("vm2", mac="52:54:00:00:00:02")
    box.start_daemon("--bus-address", bus.address)

    st = box.jctl("status")
    assert isinstance(st, dict)
    nets = box.jctl("network", "list")
    assert isinstance(nets, list)
    assert {(n["name"], n["mode"], n["bridge"], n["state"]) for n in nets} == {
        ("nat", "nat", "kvnat0", "active"), ("iso", "isolated", "kviso0", "active")}
    show = box.jctl("network", "show", "nat")
    assert isinstance(show, dict) and show["name"] == "nat" and "10.60.0.1/24" in str(show)

    assert box.ctl_out("port", "attach", "vm1", "nat") == "vm1: attached to nat (kvnat0)\n"
    box.ctl("port", "attach", "vm2", "nat", "--quiet")
    assert box.master_of("vm1") == "kvnat0"
    ports = box.jctl("port", "list")
    assert isinstance(ports, list)
    assert {(p["ifname"], p["network"]) for p in ports} == {("vm1", "nat"), ("vm2", "nat")}

    # DHCP through the daemon's own dnsmasq: the static host gets exactly its address.
    lease1, lease2 = box.dhcp(g1), box.dhcp(g2)
    assert lease1["ip"] == "10.60.0.21"
    assert lease2["ip"].startswith("10.60.0.1")
    leases = box.jctl("leases", "nat")
    assert isinstance(leases, list)
    assert {"52:54:00:65:43:21", "52:54:00:00:00:02"} <= {x["mac"] for x in leases}
    assert all({"mac", "ip", "hostname", "expires"} <= set(x) for x in leases)
    assert ping(g1, lease2["ip"]) and ping(g1, FAR_HOST)
    assert box.source_seen_by_upstream(g1) == HOST_UPLINK_IP

    # The article's experiment: move both ports to the isolated network, live.
    box.ctl("port", "move", "vm1", "iso")
    box.ctl("port", "move", "vm2", "iso")
    assert box.master_of("vm1") == "kviso0"
    assert ping(g1, lease2["ip"]), "guests on one isolated network must reach each other"
    assert not ping(g1, FAR_HOST)
    box.ctl("port", "move", "vm1", "nat")
    box.ctl("port", "move", "vm2", "nat")
    assert ping(g1, FAR_HOST)

    box.ctl("port", "detach", "vm2")
    assert box.master_of("vm2") is None

    # define (persistent) / start / stop / undefine; a runtime-only define writes nothing.
    extra = box.tmp / "extra.toml"
    extra.write_text(EXTRA)
    box.ctl("network", "define", str(extra))
    assert (box.networks_dir / "extra.toml").exists()
    box.ctl("network", "start", "extra")
    assert wait_until(lambda: "kvext0" in sh("ip", "-o", "link", ns=box.host).stdout)
    box.ctl("network", "stop", "extra")
    assert wait_until(lambda: "kvext0" not in sh("ip", "-o", "link", ns=box.host).stdout)
    box.ctl("network", "undefine", "extra")
    assert not (box.networks_dir / "extra.toml").exists()
    box.ctl("network", "define", "--runtime", str(extra))
    assert not (box.networks_dir / "extra.toml").exists()
    assert "extra" in {n["name"] for n in box.jctl("network", "list")}
    box.ctl("reload")
    assert box.ctl("version").stdout.strip()

    # Errors: typed, with a message, exit 1; the state is unchanged.
    before = box.jctl("port", "list")
    r = box.ctl("port", "attach", "vm2", "nosuch", check=False)
    assert r.returncode == 1 and "nosuch" in r.stderr
    r = box.ctl("port", "attach", "kviso0", "nat", check=False)
    assert r.returncode == 1 and "bridge" in r.stderr
    r = box.ctl("port", "attach", "uplink0", "iso", check=False)
    assert r.returncode == 1
    assert box.jctl("port", "list") == before


def test_busctl_and_gdbus_drive_the_real_daemon(box: Sandbox, bus: PrivateBus) -> None:
    box.write_config(CONFIG)
    box.guest("vm1")
    box.start_daemon("--bus-address", bus.address)
    env_addr = f"--address={bus.address}"
    r = sh("busctl", env_addr, "call", BUS, PATH, f"{BUS}.Manager", "AttachPort", "ssb",
           "vm1", "iso", "false", ns=box.host)
    assert box.master_of("vm1") == "kviso0"
    r = sh("gdbus", "call", "--address", bus.address, "--dest", BUS, "--object-path", PATH,
           "--method", f"{BUS}.Manager.ListPorts", ns=box.host)
    assert "vm1" in r.stdout and "iso" in r.stdout
    r = sh("busctl", env_addr, "call", BUS, PATH, f"{BUS}.Manager", "MovePort", "ss", "vm1",
           "nosuch", ns=box.host, check=False)
    assert r.returncode != 0 and "no network named 'nosuch'" in r.stderr
    r = sh("gdbus", "call", "--address", bus.address, "--dest", BUS, "--object-path", PATH,
           "--method", f"{BUS}.Manager.MovePort", "vm1", "nosuch", ns=box.host, check=False)
    assert r.returncode != 0 and f"{BUS}.Error.NoSuchNetwork" in r.stderr


def test_unprivileged_caller(box: Sandbox) -> None:
    box.write_config(CONFIG)
    box.guest("vm1")
    sh("ip", "tuntap", "add", "tapn", "mode", "tap", "user", "nobody", ns=box.host)
    sh("ip", "tuntap", "add", "tapr", "mode", "tap", ns=box.host)
    box.start_daemon("--no-bus")
    r = box.ctl("network", "list", user="nobody", check=False)
    assert r.returncode == 0, r.stderr
    r = box.ctl("network", "stop", "nat", user="nobody", check=False)
    assert r.returncode == 1 and "only root and members of group kvmnet" in r.stderr
    r = box.ctl("port", "attach", "tapn", "nat", user="nobody", check=False)
    assert r.returncode == 1, "nobody is not on nat's allow list"
    r = box.ctl("port", "attach", "tapr", "iso", user="nobody", check=False)
    assert r.returncode == 1, "tapr belongs to root"
    box.ctl("port", "attach", "tapn", "iso", user="nobody")
    assert box.master_of("tapn") == "kviso0"


def test_doctor_explains_a_foreign_forward_drop(box: Sandbox) -> None:
    # With coexist on (the default) kvmnetd inserts accepts, and there is nothing to explain.
    box.write_config(CONFIG + daemon_toml(coexist="off"))
    box.start_daemon("--no-bus")
    r = box.ctl("doctor", "--json", check=False)
    before = {f["check"] for f in json.loads(r.stdout)}
    assert "foreign-forward-drop" not in before
    sh("iptables", "-P", "FORWARD", "DROP", ns=box.host)  # what Docker does
    r = box.ctl("doctor", "--json", check=False)
    findings = json.loads(r.stdout)
    drop = [f for f in findings if f["check"] == "foreign-forward-drop"]
    assert r.returncode == 1 and drop and drop[0]["network"] == "nat" and drop[0]["fix"]
    human = box.ctl("doctor", check=False).stdout
    assert "foreign-forward-drop" in human and "fix:" in human


def test_defining_a_network_keeps_the_builtin_default(box: Sandbox) -> None:
    box.networks_dir.mkdir()
    box.start_daemon("--no-bus")  # no config file at all: the built-in default network
    assert [n["name"] for n in box.jctl("network", "list")] == ["default"]
    extra = box.tmp / "extra.toml"
    extra.write_text(EXTRA)
    box.ctl("network", "define", str(extra))
    box.ctl("reload")
    names = {n["name"] for n in box.jctl("network", "list")}
    assert names == {"default", "extra"}
    assert (box.networks_dir / "default.toml").exists()


def test_a_port_of_a_foreign_bridge_needs_force(box: Sandbox) -> None:
    box.write_config(CONFIG)
    box.guest("vm1")
    sh("ip", "link", "add", "docker0", "type", "bridge", ns=box.host)
    sh("ip", "link", "set", "vm1", "master", "docker0", ns=box.host)
    box.start_daemon("--no-bus")
    r = box.ctl("port", "attach", "vm1", "nat", check=False)
    assert r.returncode == 1 and "docker0" in r.stderr and "force" in r.stderr
    assert box.master_of("vm1") == "docker0"
    box.ctl("port", "attach", "vm1", "nat", "--force")
    assert box.master_of("vm1") == "kvnat0"


@pytest.mark.skipif(shutil.which("dhclient") is None, reason="dhclient is not installed")
def test_dhclient_gets_a_lease_from_the_range(box: Sandbox) -> None:
    box.write_config(CONFIG)
    g = box.guest("vm1", mac="52:54:00:00:00:33")
    box.start_daemon("--no-bus")
    box.ctl("port", "attach", "vm1", "nat")
    lf, pf = box.tmp / "dhclient.leases", box.tmp / "dhclient.pid"
    sh("dhclient", "-1", "-4", "-sf", "/bin/true", "-lf", str(lf), "-pf", str(pf), "eth0",
       ns=g, timeout=30)
    sh("dhclient", "-x", "-sf", "/bin/true", "-pf", str(pf), ns=g, check=False)
    fixed = re.search(r"fixed-address ([0-9.]+);", lf.read_text())
    assert fixed and fixed.group(1).startswith("10.60.0.1")
    assert "52:54:00:00:00:33" in {x["mac"] for x in box.jctl("leases", "nat")}


def test_define_a_bridged_network_on_the_uplinks_subnet(box: Sandbox) -> None:
    box.write_config(CONFIG)
    box.start_daemon("--no-bus")
    lan = box.tmp / "lan.toml"
    lan.write_text('[network.lan]\nmode = "bridged"\nbridge = "kvlan0"\nuplink = "uplink0"\n'
                   'ipv4 = "198.51.100.1/24"\n[network.lan.dns]\nenabled = false\n')
    r = box.ctl("network", "define", str(lan), check=False)
    assert r.returncode == 0, r.stderr  # the uplink's own route is not a foreign host route
    assert wait_until(lambda: box.master_of("uplink0") == "kvlan0")
