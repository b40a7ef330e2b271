"""The core over in-memory fakes of our adapters: who may do what, and what each request does."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmnetd import logsetup
from kvmnetd.app import access
from kvmnetd.config import load as cfg
from kvmnetd.model.errors import (
    ConfigError,
    Conflict,
    InvalidArgument,
    NoSuchNetwork,
    NoSuchPort,
    PermissionDenied,
)
from kvmnetd.model.observed import Link
from kvmnetd.model.records import ROOT, Caller, CoreEvent
from tests.support.core import CoreRig, make_core, tap
from tests.support.fakes import FakeAuthority
from tests.support.toml import attach_toml, network_toml

ADMIN_GID = 4242
NOBODY = 65534  # user nobody, group nogroup
USER = Caller(uid=NOBODY, gids=(NOBODY,), bus_name=":1.9")
MEMBER = Caller(uid=1001, gids=(1001, ADMIN_GID))
STRANGER = Caller(uid=4321, gids=(4321,))  # no passwd entry, no group of a network

CONFIG = (
    network_toml("default", "nat", "virbr-kt", "192.0.2.1/24",
                 dhcp_range="192.0.2.100-192.0.2.150")
    + network_toml("lab", "isolated", "br-lab", "198.51.100.1/24", dns=False,
                   allow_users=["nobody"])
    + network_toml("grp", "isolated", "br-grp", "203.0.113.1/25", dns=False,
                   allow_groups=["nogroup"])
    + network_toml("cold", "isolated", "br-cold", "203.0.113.129/25", dns=False,
                   autostart=False, allow_users=["nobody"])
    + network_toml("up", "bridged", "br-up", uplink="up0")
    + attach_toml("lab", ifname="pol*"))

FOREIGN = Link(index=90, name="docker0", kind="bridge")


def host() -> list[Link]:
    return [
        tap("vnet0"), tap("vnet1"), tap("mine0", owner=NOBODY), tap("mine1", owner=NOBODY),
        tap("other0", owner=1000), tap("any0", owner=-1), tap("g0", owner=4321),
        Link(index=80, name="eth9", kind=None),
        Link(index=81, name="up0", kind="veth"),
        FOREIGN, tap("dock0", master=FOREIGN.index),
    ]


@pytest.fixture(autouse=True)
def admin_group(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(access, "admin_gid", lambda: ADMIN_GID)
    yield
    logsetup.set_level("info")


@pytest.fixture
async def rig(tmp_path: Path) -> CoreRig:
    return await make_core(tmp_path, CONFIG, *host())


def port_map(rig: CoreRig) -> dict[str, str]:
    return {p.ifname: p.network for p in rig.core.list_ports() if p.state == "attached"}


def master_of(rig: CoreRig, ifname: str) -> str | None:
    obs = rig.netlink.observed
    link = obs.link(ifname)
    assert link is not None
    return obs.name_of(link.master)


# ---- the first pass ------------------------------------------------------------------------

async def test_first_pass_starts_the_autostart_networks(tmp_path: Path) -> None:
    rig = await make_core(tmp_path, CONFIG, *host(), tap("pol0"))
    states = {n.name: n.state for n in rig.core.list_networks()}
    assert states == {"cold": "inactive", "default": "active", "grp": "active",
                      "lab": "active", "up": "active"}
    assert rig.core.network("default").dhcp.state == "running"
    assert rig.netlink.observed.link("virbr-kt") is not None
    assert master_of(rig, "up0") == "br-up"
    assert port_map(rig) == {"pol0": "lab"}  # by the [[attach]] rule
    # Detached by request, a tap stays out; asked for with no network, the rule decides.
    await rig.core.detach_port(ROOT, "pol0")
    assert port_map(rig) == {}
    await rig.core.attach_port(ROOT, "pol0", "")
    assert port_map(rig) == {"pol0": "lab"}


# ---- administration: root, group kvmnet, then polkit ---------------------------------------

async def test_root_and_group_members_administer_without_polkit(rig: CoreRig) -> None:
    polkit = FakeAuthority(False)
    rig.core.authority = polkit
    await rig.core.start_network(ROOT, "cold")
    await rig.core.stop_network(MEMBER, "cold")
    assert rig.core.network("cold").state == "inactive"
    assert polkit.asked == []


async def test_polkit_decides_for_anyone_else(rig: CoreRig) -> None:
    yes = FakeAuthority(True)
    rig.core.authority = yes
    await rig.core.start_network(USER, "cold")
    assert rig.core.network("cold").state == "active"
    assert yes.asked == [(USER, access.MANAGE)]
    rig.core.authority = FakeAuthority(False)
    with pytest.raises(PermissionDenied, match="polkit does not allow uid 65534 to stop"):
        await rig.core.stop_network(USER, "cold")
    assert rig.core.network("cold").state == "active"


@pytest.mark.parametrize("authority", [None, FakeAuthority(None)], ids=["none", "absent"])
async def test_without_polkit_only_root_and_the_group(rig: CoreRig,
                                                      authority: FakeAuthority | None) -> None:
    rig.core.authority = authority
    before = rig.core.describe()
    for call in (rig.core.start_network(USER, "cold"), rig.core.stop_network(USER, "lab"),
                 rig.core.define_network(USER, network_toml("n", "isolated", "br-n",
                                                            "10.9.0.1/24"), True),
                 rig.core.undefine_network(USER, "lab", True), rig.core.reload(USER),
                 rig.core.set_log_level(USER, "debug")):
        with pytest.raises(PermissionDenied, match="only root and members of group kvmnet"):
            await call
    assert rig.core.describe() == before
    assert list(rig.networks_dir.iterdir()) == []


# ---- ports: who may attach what ------------------------------------------------------------

async def test_allow_users_lets_a_user_attach_their_own_tap(rig: CoreRig) -> None:
    await rig.core.attach_port(USER, "mine0", "lab")
    assert port_map(rig) == {"mine0": "lab"} and master_of(rig, "mine0") == "br-lab"
    await rig.core.detach_port(USER, "mine0")
    assert port_map(rig) == {} and master_of(rig, "mine0") is None


async def test_allow_groups_admits_by_group(rig: CoreRig) -> None:
    stranger_in_nogroup = Caller(uid=4321, gids=(NOBODY,))
    with pytest.raises(PermissionDenied, match="may not use network grp"):
        await rig.core.attach_port(STRANGER, "g0", "grp")
    await rig.core.attach_port(stranger_in_nogroup, "g0", "grp")
    assert port_map(rig) == {"g0": "grp"}


@pytest.mark.parametrize("ifname, network, why", [
    ("mine0", "default", "may not use network default"),  # not on its allow list
    ("other0", "lab", "not a tap owned by uid 65534"),  # someone else's tap
    ("any0", "lab", "not a tap owned by uid 65534"),  # a tap anyone may open: root's call
    ("vnet0", "lab", "not a tap owned by uid 65534"),  # no owner known
])
async def test_port_refusals_for_users(rig: CoreRig, ifname: str, network: str,
                                       why: str) -> None:
    with pytest.raises(PermissionDenied, match=why):
        await rig.core.attach_port(USER, ifname, network)
    assert port_map(rig) == {}


async def test_a_user_may_not_detach_or_move_a_port_of_someone_else(rig: CoreRig) -> None:
    await rig.core.attach_port(ROOT, "other0", "lab")
    with pytest.raises(PermissionDenied, match="not a tap owned by uid 65534"):
        await rig.core.detach_port(USER, "other0")
    with pytest.raises(PermissionDenied):
        await rig.core.move_port(USER, "other0", "grp")
    assert port_map(rig) == {"other0": "lab"}


# ---- ports: requests the core refuses, whoever asks ----------------------------------------

@pytest.mark.parametrize("ifname", ["", "a/b", "a b", "a:1", "x" * 16])
async def test_bad_interface_names(rig: CoreRig, ifname: str) -> None:
    with pytest.raises(InvalidArgument, match="not a valid interface name"):
        await rig.core.attach_port(ROOT, ifname, "default")


@pytest.mark.parametrize("ifname, network, error, why", [
    ("vnet0", "nope", NoSuchNetwork, "no network named 'nope'"),
    ("vnet0", "cold", Conflict, "network cold is not started"),
    ("vnet9", "default", NoSuchPort, "no device named vnet9"),
    ("eth9", "default", InvalidArgument, "eth9 is a physical device"),
    ("virbr-kt", "lab", InvalidArgument, "virbr-kt is a bridge device"),
    ("up0", "default", Conflict, "up0 is a host uplink"),
    ("dock0", "default", Conflict, "bridge docker0, which kvmnetd does not manage"),
])
async def test_port_refusals(rig: CoreRig, ifname: str, network: str,
                             error: type[Exception], why: str) -> None:
    before = rig.netlink.writes
    with pytest.raises(error, match=why):
        await rig.core.attach_port(ROOT, ifname, network)
    assert port_map(rig) == {} and rig.netlink.writes == before


async def test_force_takes_a_port_from_a_foreign_bridge(rig: CoreRig) -> None:
    await rig.core.attach_port(ROOT, "dock0", "default", force=True)
    assert master_of(rig, "dock0") == "virbr-kt"


async def test_no_network_named_means_default(rig: CoreRig) -> None:
    await rig.core.attach_port(ROOT, "vnet0", "")
    assert port_map(rig) == {"vnet0": "default"}
    await rig.core.stop_network(ROOT, "default")
    with pytest.raises(InvalidArgument, match="no network chosen for vnet1"):
        await rig.core.attach_port(ROOT, "vnet1", "")


async def test_move_and_detach(rig: CoreRig) -> None:
    with pytest.raises(NoSuchPort, match="vnet0 is not attached to any network"):
        await rig.core.move_port(ROOT, "vnet0", "lab")
    await rig.core.attach_port(ROOT, "vnet0", "default")
    await rig.core.move_port(ROOT, "vnet0", "lab")
    assert port_map(rig) == {"vnet0": "lab"} and master_of(rig, "vnet0") == "br-lab"
    assert rig.core.network("lab").ports == ("vnet0",)
    await rig.core.detach_port(ROOT, "vnet0")
    assert port_map(rig) == {}
    with pytest.raises(NoSuchPort, match="vnet0 is not attached by kvmnetd"):
        await rig.core.detach_port(ROOT, "vnet0")


async def test_a_port_the_kernel_refuses_is_a_conflict(rig: CoreRig) -> None:
    rig.netlink.fail_on.add("vnet1")
    with pytest.raises(Conflict, match="vnet1 could not be attached to virbr-kt"):
        await rig.core.attach_port(ROOT, "vnet1", "default")
    assert rig.core.network("default").state == "active"


async def test_port_events_reach_subscribers(rig: CoreRig) -> None:
    seen: list[CoreEvent] = []
    rig.core.subscribe(seen.append)
    await rig.core.attach_port(ROOT, "vnet0", "default")
    await rig.core.move_port(ROOT, "vnet0", "lab")
    await asyncio.sleep(0)  # events go out after the call has replied
    ports = [(e.kind, e.network, e.ifname) for e in seen if e.kind.startswith("port-")]
    assert ports == [("port-attached", "default", "vnet0"), ("port-detached", "default", "vnet0"),
                     ("port-attached", "lab", "vnet0")]


# ---- define, undefine, start, stop ---------------------------------------------------------

NEW = network_toml("new", "routed", "br-new", "10.9.0.1/24", dns=False)


async def test_define_persist_writes_a_file_the_loader_reads(rig: CoreRig) -> None:
    assert await rig.core.define_network(ROOT, NEW, True) == "new"
    path = rig.networks_dir / "new.toml"
    again = cfg.load(str(rig.config_file), None)
    assert again.networks["new"] == rig.core.networks()["new"]
    assert str(path) in again.files
    assert rig.core.network("new").state == "active"
    with pytest.raises(Conflict, match="network new already exists"):
        await rig.core.define_network(ROOT, NEW, True)
    await rig.core.undefine_network(ROOT, "new", True)
    assert not path.exists() and "new" not in rig.core.networks()
    assert rig.netlink.observed.link("br-new") is None


async def test_define_runtime_leaves_the_disk_alone(rig: CoreRig) -> None:
    await rig.core.define_network(ROOT, NEW, False)
    assert list(rig.networks_dir.iterdir()) == []
    await rig.core.attach_port(ROOT, "vnet0", "new")
    await rig.core.undefine_network(ROOT, "new", False)
    assert "new" not in rig.core.networks() and port_map(rig) == {}
    assert master_of(rig, "vnet0") is None


async def test_undefine_refusals(rig: CoreRig) -> None:
    with pytest.raises(NoSuchNetwork):
        await rig.core.undefine_network(ROOT, "nope", True)
    with pytest.raises(InvalidArgument, match="defined on disk; undefine it with persist"):
        await rig.core.undefine_network(ROOT, "lab", False)
    with pytest.raises(Conflict, match=r"comes from .*kvmnetd\.toml:\d+; remove it there"):
        await rig.core.undefine_network(ROOT, "lab", True)
    assert "lab" in rig.core.networks()


async def test_define_refuses_bad_text_with_its_line(rig: CoreRig) -> None:
    with pytest.raises(ConfigError) as err:
        await rig.core.define_network(ROOT, NEW.replace('mode = "routed"', 'mode = "wat"'), True)
    assert [(i.file, i.line, i.key) for i in err.value.issues] == [
        ("<define>", 2, "network.new.mode")]
    with pytest.raises(ConfigError, match="bridge 'virbr-kt' is already used"):
        await rig.core.define_network(
            ROOT, network_toml("dup", "isolated", "virbr-kt", "10.8.0.1/24"), True)
    assert list(rig.networks_dir.iterdir()) == []


async def test_start_and_stop(rig: CoreRig) -> None:
    with pytest.raises(NoSuchNetwork):
        await rig.core.start_network(ROOT, "nope")
    await rig.core.start_network(ROOT, "cold")
    assert rig.core.network("cold").state == "active"
    assert rig.netlink.observed.link("br-cold") is not None
    await rig.core.stop_network(ROOT, "cold")
    assert rig.core.network("cold").state == "inactive"
    assert rig.netlink.observed.link("br-cold") is None


async def test_a_network_that_cannot_start_says_why(rig: CoreRig) -> None:
    rig.netlink.fail_on.add("br-cold")
    with pytest.raises(Conflict, match=r"network cold could not start: .*refused"):
        await rig.core.start_network(ROOT, "cold")
    assert rig.core.network("default").state == "active"


# ---- reload and log level -------------------------------------------------------------------

async def test_reload_errors_name_file_and_line_and_change_nothing(rig: CoreRig) -> None:
    bad = CONFIG + network_toml("bad", "nat", "br-bad", "10.7.0.300/24")
    rig.write_config(bad)
    before = rig.core.describe()
    with pytest.raises(ConfigError) as err:
        await rig.core.reload(ROOT)
    (issue,) = err.value.issues
    text = rig.config_file.read_text().splitlines()
    assert (issue.file, issue.line, issue.key) == (
        str(rig.config_file), text.index('ipv4 = "10.7.0.300/24"') + 1, "network.bad.ipv4")
    assert rig.core.describe() == before


async def test_reload_applies_the_new_file(rig: CoreRig) -> None:
    await rig.core.attach_port(ROOT, "vnet0", "lab")
    rig.write_config(CONFIG.replace('allow_users = ["nobody"]\n', "", 1)
                     + network_toml("more", "isolated", "br-more", "10.6.0.1/24"))
    await rig.core.reload(ROOT)
    assert rig.core.network("more").state == "active"
    assert port_map(rig) == {"vnet0": "lab"}  # a port survives a reload of its network
    with pytest.raises(PermissionDenied, match="may not use network lab"):
        await rig.core.attach_port(USER, "mine1", "lab")


async def test_log_level(rig: CoreRig) -> None:
    await rig.core.set_log_level(ROOT, "debug")
    assert logsetup._threshold[0] == logging.DEBUG
    with pytest.raises(InvalidArgument, match="log level 'loud' must be one of"):
        await rig.core.set_log_level(ROOT, "loud")
    assert logsetup._threshold[0] == logging.DEBUG


async def test_port_stats_of_every_port_and_of_one(rig: CoreRig) -> None:
    await rig.core.attach_port(ROOT, "vnet0", "default")
    await rig.core.attach_port(ROOT, "vnet1", "lab")
    counters = {"vnet0": (1, 2, 3, 4, 5), "vnet1": (10, 20, 30, 40, 0)}
    rig.core.read_counters = counters.get
    rows = rig.core.port_stats()
    assert [(r.ifname, r.network, r.rx_bytes, r.tx_bytes, r.drops, r.spoof_drops)
            for r in rows] == [("vnet0", "default", 1, 2, 5, 0), ("vnet1", "lab", 10, 20, 0, 0)]
    assert [r.ifname for r in rig.core.port_stats("vnet1")] == ["vnet1"]
    with pytest.raises(NoSuchPort, match="mine0 is not a port of any network"):
        rig.core.port_stats("mine0")
    del counters["vnet1"]  # its device went away
    assert [r.ifname for r in rig.core.port_stats()] == ["vnet0"]
    with pytest.raises(NoSuchPort, match="vnet1: no such device"):
        rig.core.port_stats("vnet1")
