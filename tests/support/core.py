"""The real Core over one Reconciler and in-memory fakes of our adapters.

Its configuration lives in files under a directory of the test's, as the daemon's does,
so that define --persist, undefine and reload work on real files.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from kvmnetd import config as cfg
from kvmnetd.core import Core
from kvmnetd.observed import Link
from kvmnetd.reconciler import Reconciler
from tests.support.fakes import FakeDhcp, FakeFirewall, FakeNetlink, FakeSysctl
from tests.support.toml import daemon_toml

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
    rec = Reconciler(nl, FakeFirewall(), FakeSysctl(), dhcp, str(directory / "owned.json"))
    core = Core(rec, cfg.load(str(config_file), None), dhcp)
    await core.apply({})
    return CoreRig(core, nl, dhcp, config_file, networks_dir)


def _main_file(config_file: Path, networks_dir: Path, text: str) -> str:
    d = config_file.parent
    return daemon_toml(run_dir=str(d / "run"), state_dir=str(d / "state"),
                       networks_dir=str(networks_dir)) + text
