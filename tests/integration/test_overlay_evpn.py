"""One network across three simulated hosts with BGP EVPN through FRR (issue #17).

Each host is a namespace on the fabric's underlay with its own kvmnetd and its own
zebra and bgpd (pathspace -N), started here and killed afterwards, also on failure.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fabric import ASN, Fabric, FabricHost, fabric
from tests.support.frr import FrrDaemons, frr_installed
from tests.support.rig import wait_until

pytestmark = pytest.mark.skipif(not frr_installed(),
                                reason="FRR not installed (apt-get install frr frr-pythontools)")


class EvpnFabric:
    def __init__(self, fab: Fabric) -> None:
        self.fab = fab
        self.frr: dict[str, FrrDaemons] = {}

    def start_frr(self, host: FabricHost) -> None:
        d = FrrDaemons(host.ns, self.fab.pathspace(host))
        self.fab.stack.callback(d.cleanup)  # before the host's namespace goes
        d.start()
        self.frr[host.name] = d

    def status(self, host: FabricHost) -> dict[str, Any]:
        frr: dict[str, Any] = host.box.jctl("status")["frr"]
        return frr

    def wait_peers(self, host: FabricHost, peers: set[str], timeout: float = 60) -> bool:
        def ok() -> bool:
            st = self.status(host)
            est = {p for p, s in st.get("peers", {}).items() if s == "Established"}
            return st["state"] == "applied" and est == peers
        return bool(wait_until(ok, timeout, 0.2))


@pytest.fixture
def evpn(tmp_path: Path) -> Iterator[EvpnFabric]:
    holder: list[EvpnFabric] = []
    with fabric(tmp_path, 3, "evpn", before_start=lambda h: holder[0].start_frr(h)) as f:
        holder.append(EvpnFabric(f))
        yield holder[0]


def others(fab: Fabric, host: FabricHost) -> set[str]:
    return {h.underlay_ip for h in fab.hosts if h is not host}


def test_part_applied_and_bgp_sessions_established(evpn: EvpnFabric) -> None:
    fab = evpn.fab
    fab.start()
    for h in fab.hosts:
        assert evpn.wait_peers(h, others(fab, h)), evpn.status(h)
        conf = evpn.frr[h.name].running_config()
        assert f"router bgp {ASN}" in conf
        assert f" bgp router-id {h.underlay_ip}" in conf
        assert "  advertise-all-vni" in conf
    # The EVPN address family carries the sessions.
    summary = evpn.frr["h1"].vtysh("show bgp l2vpn evpn summary")
    assert "192.0.2.12" in summary and "192.0.2.13" in summary


def test_frr_killed_is_reported_and_healed(evpn: EvpnFabric) -> None:
    fab = evpn.fab
    fab.start()
    h2 = fab.host("h2")
    assert evpn.wait_peers(h2, others(fab, h2))
    applies = evpn.status(h2)["applies"]
    d = evpn.frr["h2"]
    d.stop(sig=signal.SIGKILL)
    assert wait_until(lambda: evpn.status(h2)["state"] == "down", 20), evpn.status(h2)
    doctor = h2.box.ctl("doctor", "--json", check=False)
    assert '"frr-down"' in doctor.stdout
    # The other hosts see their neighbour go.
    h1 = fab.host("h1")
    assert wait_until(lambda: evpn.status(h1)["peers"].get(h2.underlay_ip) != "Established",
                      30, 0.2)
    assert '"bgp-peer-down"' in h1.box.ctl("doctor", "--json", check=False).stdout
    d.start()  # bgpd comes back with an empty configuration
    assert evpn.wait_peers(h2, others(fab, h2)), evpn.status(h2)
    assert evpn.status(h2)["applies"] > applies
    assert f"router bgp {ASN}" in d.running_config()
    assert evpn.wait_peers(h1, others(fab, h1))


def test_restart_of_kvmnetd_writes_nothing_to_frr(evpn: EvpnFabric) -> None:
    fab = evpn.fab
    fab.start()
    h1 = fab.host("h1")
    assert evpn.wait_peers(h1, others(fab, h1))
    before = evpn.frr["h1"].running_config()
    h1.box.stop_daemon()
    h1.box.start_daemon("--no-bus")
    assert wait_until(lambda: evpn.status(h1)["state"] == "applied", 20), evpn.status(h1)
    st = evpn.status(h1)
    assert st["applies"] == 0  # it read FRR's configuration, found its part, wrote nothing
    assert evpn.frr["h1"].running_config() == before


def test_removed_host_stops_being_a_neighbour_and_hand_lines_stay(evpn: EvpnFabric) -> None:
    fab = evpn.fab
    fab.start()
    h1, h3 = fab.host("h1"), fab.host("h3")
    assert evpn.wait_peers(h1, others(fab, h1))
    d = evpn.frr["h1"]
    # Written by hand beside kvmnetd's part and inside its instance.
    d.configure("ip prefix-list HAND seq 5 permit 10.0.0.0/8",
                f"router bgp {ASN}", "bgp log-neighbor-changes")
    h1.box.write_config(fab.config(h1, peers=[fab.host("h2")]))
    h1.box.daemon.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    assert evpn.wait_peers(h1, {fab.host("h2").underlay_ip}), evpn.status(h1)
    conf = d.running_config()
    assert h3.underlay_ip not in conf
    assert "ip prefix-list HAND seq 5 permit 10.0.0.0/8" in conf
    assert " bgp log-neighbor-changes" in conf
    assert "192.0.2.12 activate" in conf


def test_status_lists_frr_and_neighbours(evpn: EvpnFabric) -> None:
    fab = evpn.fab
    fab.start()
    h1 = fab.host("h1")
    assert evpn.wait_peers(h1, others(fab, h1))
    out = h1.box.ctl_out("status")
    assert f"frr (pathspace {fab.pathspace(h1)}): applied" in out
    assert "bgp neighbour 192.0.2.12: Established" in out
    assert time.monotonic() > 0
