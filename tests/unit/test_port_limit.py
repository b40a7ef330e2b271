"""LimitPort over the core and fakes: who may, what it refuses, what it keeps on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmnetd.app.core import Core
from kvmnetd.config import load as cfg
from kvmnetd.model.errors import InvalidArgument, NoSuchPort, PermissionDenied
from kvmnetd.model.records import ROOT, Caller
from tests.support.core import CoreRig, make_core, tap
from tests.support.fakes import FakeRates
from tests.support.toml import network_toml

NOBODY = 65534
OWNER = Caller(uid=NOBODY, gids=(NOBODY,))
CONFIG = (network_toml("lab", "isolated", "br-lab", "198.51.100.1/24", dns=False,
                       allow_users=["nobody"], port_rate="100mbit")
          + network_toml("fast", "isolated", "br-fast", "203.0.113.1/24", dns=False))


@pytest.fixture
async def rig(tmp_path: Path) -> CoreRig:
    rig = await make_core(tmp_path, CONFIG, tap("vnet0", owner=NOBODY), tap("vnet1"))
    await rig.core.attach_port(ROOT, "vnet0", "lab")
    return rig


def rate_of(rig: CoreRig, ifname: str) -> str:
    return next(p.rate for p in rig.core.list_ports() if p.ifname == ifname)


def saved(tmp_path: Path) -> object:
    return json.loads((tmp_path / "state" / "port-limits.json").read_text())


async def test_override_none_default_and_file(rig: CoreRig, tmp_path: Path) -> None:
    tc = rig.core.rec.rate
    assert isinstance(tc, FakeRates)
    assert rate_of(rig, "vnet0") == "100mbit" and tc.qdiscs["vnet0"] == (12_500_000, True)
    await rig.core.limit_port(ROOT, "vnet0", "20mbit")
    assert rate_of(rig, "vnet0") == "20mbit" and tc.qdiscs["vnet0"] == (2_500_000, True)
    assert saved(tmp_path) == {"vnet0": 2_500_000}
    await rig.core.limit_port(ROOT, "vnet0", "NONE")
    assert rate_of(rig, "vnet0") == "none" and "vnet0" not in tc.qdiscs
    assert saved(tmp_path) == {"vnet0": 0}
    # Moved to a network without a default: the override goes along.
    await rig.core.limit_port(ROOT, "vnet0", "20mbit")
    await rig.core.move_port(ROOT, "vnet0", "fast")
    assert rate_of(rig, "vnet0") == "20mbit"
    await rig.core.limit_port(ROOT, "vnet0", "default")
    assert rate_of(rig, "vnet0") == "none" and "vnet0" not in tc.qdiscs
    assert saved(tmp_path) == {}


async def test_refusals_change_nothing(rig: CoreRig, tmp_path: Path) -> None:
    # The tap's owner may use the network, but not lift its own cap.
    with pytest.raises(PermissionDenied):
        await rig.core.limit_port(OWNER, "vnet0", "none")
    with pytest.raises(NoSuchPort, match="vnet1 is not a port"):
        await rig.core.limit_port(ROOT, "vnet1", "20mbit")
    for bad in ("fast", "20", "3bit", ""):
        with pytest.raises(InvalidArgument, match="'none' or 'default'"):
            await rig.core.limit_port(ROOT, "vnet0", bad)
    assert rate_of(rig, "vnet0") == "100mbit"
    assert not (tmp_path / "state" / "port-limits.json").exists()


async def test_overrides_are_read_back_and_end_with_their_device(rig: CoreRig,
                                                                 tmp_path: Path) -> None:
    await rig.core.limit_port(ROOT, "vnet0", "20mbit")
    # A new core over the same state dir (a restart) starts with the override.
    again = Core(rig.core.rec, cfg.load(str(rig.config_file), None), rig.dhcp)
    assert again.port_limits == {"vnet0": 2_500_000}
    del rig.netlink.observed.links[rig.netlink.observed.link("vnet0").index]  # type: ignore[union-attr]
    again.forget_gone_limits()
    assert again.port_limits == {} and saved(tmp_path) == {}
