"""One network across three simulated hosts, static VXLAN (issue #17)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fabric import Fabric, fabric


@pytest.fixture
def fab(tmp_path: Path) -> Iterator[Fabric]:
    with fabric(tmp_path, 3, "static") as f:
        yield f


def test_fabric_hosts_start_and_lease(fab: Fabric) -> None:
    fab.start()
    g1 = fab.guest(fab.hosts[0])
    g2 = fab.guest(fab.hosts[1])
    assert fab.lease(g1) and fab.lease(g2)
