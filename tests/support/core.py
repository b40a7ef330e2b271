"""The real Core over one Reconciler and in-memory fakes of our adapters.

Its configuration lives in files under a directory of the test's, as the daemon's does,
so that define --persist, undefine and reload work on real files. The bus tests serve
served_core() on a private bus.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from kvmnetd.app.core import Core
from kvmnetd.config import load as cfg
from kvmnetd.control.server import ControlServer
from kvmnetd.engine.reconciler import Reconciler
from kvmnetd.model.observed import Link
from kvmnetd.model.records import Lease
from tests.support.dbus import NOBODY, PrivateBus
from tests.support.fakes import FakeDhcp, FakeFirewall, FakeNetlink, FakeRates, FakeSysctl
from tests.support.toml import daemon_toml, network_toml

_index = itertools.count(10_000)  # above the indexes FakeNetlink gives new bridges


def tap(name: str, owner: int | None = None, **kw: object) -> Link:
    """A tap as the kernel reports it; owner: the uid it was made for (None: any)."""
    return Link(index=next(_index), name=name, kind="tun", tun_owner=owner, **kw)  # type: ignore[arg-type]


@dataclass
class CoreRig:
    core: Core
    netlink: FakeNetlink
    dhcp: FakeDhcp
    config_file: Path
    networks_dir: Path

    def write_config(self, text: str) -> None:
        """The main file: paths below the directory, then `text` (read at the next reload)."""
        self.config_file.write_text(_main_file(self.config_file, self.networks_dir, text))


async def make_core(directory: Path, config: str, *links: Link) -> CoreRig:
    """A Core as the daemon builds it, after its first pass over the fake host."""
    networks_dir = directory / "networks.d"
    networks_dir.mkdir(exist_ok=True)
    config_file = directory / "kvmnetd.toml"
    config_file.write_text(_main_file(config_file, networks_dir, config))
    nl, dhcp = FakeNetlink(*links), FakeDhcp()
    rec = Reconciler(nl, FakeFirewall(), FakeSysctl(), dhcp, str(directory / "owned.json"),
                     rate=FakeRates(nl))
    core = Core(rec, cfg.load(str(config_file), None), dhcp)
    await core.apply({})
    return CoreRig(core, nl, dhcp, config_file, networks_dir)


def _main_file(config_file: Path, networks_dir: Path, text: str) -> str:
    d = config_file.parent
    return daemon_toml(run_dir=str(d / "run"), state_dir=str(d / "state"),
                       networks_dir=str(networks_dir)) + text


# What the bus tests serve: the real core over fakes, with one network up and one down.
SERVED_CONFIG = (network_toml("default", "nat", "virbr-kt", "192.0.2.1/24",
                              dhcp_range="192.0.2.100-192.0.2.150")
                 + network_toml("lab", "isolated", "br-lab", "198.51.100.1/24", dns=False,
                                autostart=False, allow_users=["nobody"]))
LEASE = Lease("52:54:00:00:00:01", "192.0.2.10", "guest1", "", 1700000000)
# Taps of root's, and two of nobody's (vnet7, vnet8) for the allow list of lab.
TAPS = (*(f"vnet{i}" for i in range(7)), "vnet9", "tap1",
        *(f"r{i}" for i in range(8)), *(f"n{i}" for i in range(8)))


async def served_core(directory: Path) -> CoreRig:
    """The core the bus tests serve, its files in `directory`."""
    directory.mkdir(exist_ok=True)
    rig = await make_core(directory, SERVED_CONFIG, *(tap(t) for t in TAPS),
                          tap("vnet7", owner=NOBODY), tap("vnet8", owner=NOBODY))
    rig.dhcp.lease_table["default"] = [LEASE]
    return rig


@dataclass
class Served:
    rig: CoreRig
    server: ControlServer
    bus: PrivateBus | None
    socket_path: str

    @property
    def core(self) -> Core:
        return self.rig.core

    def ports(self) -> dict[str, str]:
        """Attached ports: ifname -> network."""
        return {p.ifname: p.network for p in self.core.list_ports() if p.state == "attached"}

    def state(self, network: str) -> str:
        return self.core.network(network).state
