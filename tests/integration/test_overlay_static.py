"""One network across three simulated hosts, static VXLAN (issue #17).

Each host runs its own kvmnetd in its own namespace; the hosts share an underlay bridge
(tests/support/fabric.py). Guests are namespaces with a long-running udhcpc.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.fabric import Fabric, fabric
from tests.support.netns import ping, sh
from tests.support.rig import wait_until


@pytest.fixture
def fab() -> Iterator[Fabric]:
    with fabric(3, "static") as f:
        yield f


def test_move_keeps_address_and_renewal_is_acked(fab: Fabric) -> None:
    fab.start()
    h1, h2, h3 = fab.hosts
    g = fab.guest(h1)
    other = fab.guest(h3)
    ip = fab.lease(g)
    assert ip and fab.lease(other)
    assert ping(other.ns, ip, count=2)
    fab.move(g, h2)
    assert wait_until(lambda: ping(other.ns, ip), 10)
    hosts = h2.box.run_dir / "ov.hosts"
    assert wait_until(lambda: hosts.exists() and ip in hosts.read_text(), 10)
    import time
    time.sleep(0.5)
    event = fab.renew(g)
    print(event, g.events())
    print(sh("cat", str(h2.box.run_dir / "ov.hosts")).stdout)
    assert event is not None and event.startswith("renew "), g.events()
    assert f"ip={ip}" in event
