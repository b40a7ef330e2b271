"""Self-healing: the real daemon in a sandbox; one fault each, the time until it is undone.

Each test breaks one thing kvmnetd owns by hand, polls until it is right again and
prints `HEAL <fault> <seconds>` (run with -s to see them; docs/reliability.md
records them). Netlink faults heal from events; nftables faults heal from the
nft monitor, or without it from the periodic verification (1 s). The bound is
generous so a loaded CI machine does not flake.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.netns import ping, sh
from tests.support.rig import FAR_HOST, HOST_UPLINK_IP, Sandbox, wait_until
from tests.support.toml import attach_toml, network_toml

pytestmark = pytest.mark.integration

BOUND = 3.0
GW = "10.50.0.1/24"
CONFIG = (network_toml("nat", "nat", "kvnat0", "10.50.0.1/24",
                       dhcp_range="10.50.0.100-10.50.0.150", dns=False)
          + attach_toml("nat", ifname="pn*"))


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Sandbox]:
    with Sandbox(tmp_path) as b:
        yield b






def table_ok(box: Sandbox) -> bool:
    r = sh("nft", "list", "table", "inet", "kvmnetd", ns=box.host, check=False)
    return r.returncode == 0 and "masquerade" in r.stdout and 'comment "kvmnetd ' in r.stdout


def bridge_ok(box: Sandbox) -> bool:
    out = sh("ip", "-o", "addr", "show", "dev", "kvnat0", ns=box.host, check=False).stdout
    link = sh("ip", "-o", "link", "show", "kvnat0", ns=box.host, check=False).stdout
    return (GW in out and ",UP" in link and box.master_of("pn1") == "kvnat0"
            and box.master_of("pn2") == "kvnat0")


def dnsmasq_pid(box: Sandbox) -> int | None:
    try:
        pid = int((box.run_dir / "nat.pid").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid


def started(box: Sandbox) -> tuple[str, str]:
    box.write_config(CONFIG)
    g1 = box.guest("pn1", "10.50.0.11/24", "10.50.0.1")
    g2 = box.guest("pn2", "10.50.0.12/24", "10.50.0.1")
    box.start_daemon("--no-bus")
    assert wait_until(lambda: bridge_ok(box) and table_ok(box) and dnsmasq_pid(box), 10)
    assert box.source_seen_by_upstream(g1) == HOST_UPLINK_IP
    return g1, g2


def heal(name: str, fault: Callable[[], object], healed: Callable[[], object]) -> float:
    fault()
    t0 = time.monotonic()
    ok = wait_until(healed, timeout=BOUND + 2, interval=0.01)
    took = time.monotonic() - t0
    print(f"HEAL {name} {took:.3f}")
    assert ok, f"{name}: not healed after {took:.2f} s"
    assert took < BOUND, f"{name}: healed only after {took:.2f} s"
    return took


def test_table_deleted_comes_back(box: Sandbox) -> None:
    g1, _ = started(box)
    heal("table-deleted",
         lambda: sh("nft", "delete", "table", "inet", "kvmnetd", ns=box.host),
         lambda: table_ok(box))
    assert box.source_seen_by_upstream(g1) == HOST_UPLINK_IP


def test_flushed_ruleset_comes_back(box: Sandbox) -> None:
    g1, _ = started(box)
    heal("ruleset-flushed",
         lambda: sh("nft", "flush", "ruleset", ns=box.host),
         lambda: table_ok(box))
    assert box.source_seen_by_upstream(g1) == HOST_UPLINK_IP


def test_deleted_bridge_is_recreated_with_address_and_ports(box: Sandbox) -> None:
    g1, g2 = started(box)
    heal("bridge-deleted",
         lambda: sh("ip", "link", "del", "kvnat0", ns=box.host),
         lambda: bridge_ok(box))
    assert wait_until(lambda: ping(g1, "10.50.0.12"), 3)
    assert ping(g2, "10.50.0.1")
    assert box.source_seen_by_upstream(g1) == HOST_UPLINK_IP
    # dnsmasq serves the new bridge too (it may have been restarted for it).
    assert wait_until(lambda: dnsmasq_pid(box), 3)
    lease = box.dhcp(g2)
    assert lease.get("ip", "").startswith("10.50.0.1"), lease


def test_removed_address_is_added_again(box: Sandbox) -> None:
    g1, _ = started(box)
    heal("address-removed",
         lambda: sh("ip", "addr", "del", GW, "dev", "kvnat0", ns=box.host),
         lambda: bridge_ok(box))
    assert wait_until(lambda: ping(g1, "10.50.0.1"), 3)
    assert wait_until(lambda: box.source_seen_by_upstream(g1) == HOST_UPLINK_IP, 3)


def test_port_detached_by_hand_is_attached_again(box: Sandbox) -> None:
    g1, _ = started(box)
    heal("port-detached",
         lambda: sh("ip", "link", "set", "pn1", "nomaster", ns=box.host),
         lambda: box.master_of("pn1") == "kvnat0")
    assert wait_until(lambda: ping(g1, "10.50.0.12"), 3)


def test_killed_dnsmasq_is_restarted(box: Sandbox) -> None:
    _, g2 = started(box)
    old = dnsmasq_pid(box)
    assert old is not None

    def new_pid() -> bool:
        pid = dnsmasq_pid(box)
        return pid is not None and pid != old

    heal("dnsmasq-killed", lambda: os.kill(old, signal.SIGKILL), new_pid)
    lease = box.dhcp(g2)
    assert lease.get("ip", "").startswith("10.50.0.1"), lease


def test_healing_a_fault_does_not_disturb_the_rest(box: Sandbox) -> None:
    """The table comes back without touching links or dnsmasq."""
    g1, _ = started(box)
    pid = dnsmasq_pid(box)
    links = box.link_table()
    sh("nft", "delete", "table", "inet", "kvmnetd", ns=box.host)
    assert wait_until(lambda: table_ok(box), BOUND)
    assert dnsmasq_pid(box) == pid
    assert box.link_table() == links
    assert ping(g1, FAR_HOST)
