"""isolate_ports with the real daemon: guests reach the gateway and upstream, not each other;
the kernel's flag is healed when changed by hand and cleared when no longer wanted."""

from __future__ import annotations

import json
import signal

import pytest

from tests.support.netns import ping, sh
from tests.support.rig import FAR_HOST, Sandbox, wait_until
from tests.support.toml import attach_toml, network_toml

pytestmark = pytest.mark.integration


def config(isolate: bool = True, with_open: bool = True) -> str:
    text = network_toml("priv", "nat", "kvpriv0", "10.60.0.1/24", dns=False,
                        isolate_ports=isolate) + attach_toml("priv", ifname="pp*")
    if with_open:
        text += (network_toml("open", "nat", "kvopen0", "10.61.0.1/24", dns=False)
                 + attach_toml("open", ifname="po*"))
    return text


def isolated(box: Sandbox, ifname: str) -> bool | None:
    """The kernel's bridge port isolation of `ifname` (None: not a bridge port)."""
    info = json.loads(sh("ip", "-d", "-j", "link", "show", "dev", ifname, ns=box.host).stdout)
    data = info[0].get("linkinfo", {}).get("info_slave_data")
    return bool(data["isolated"]) if data is not None else None


def reload(box: Sandbox, text: str) -> None:
    box.write_config(text)
    assert box.daemon is not None
    box.daemon.send_signal(signal.SIGHUP)


def test_isolated_ports_reach_gateway_and_upstream_but_not_each_other(box: Sandbox) -> None:
    box.write_config(config())
    g1 = box.guest("pp1", "10.60.0.11/24", "10.60.0.1")
    g2 = box.guest("pp2", "10.60.0.12/24", "10.60.0.1")
    o1 = box.guest("po1", "10.61.0.11/24", "10.61.0.1")
    o2 = box.guest("po2", "10.61.0.12/24", "10.61.0.1")
    box.start_daemon("--no-bus")
    assert wait_until(lambda: isolated(box, "pp1") and isolated(box, "pp2"))
    assert box.master_of("pp1") == "kvpriv0"
    assert ping(g1, "10.60.0.1") and ping(g2, "10.60.0.1")
    assert ping(g1, FAR_HOST) and ping(g2, FAR_HOST)
    assert not ping(g1, "10.60.0.12") and not ping(g2, "10.60.0.11")
    # The network without it: its ports stay plain and its guests see each other.
    assert wait_until(lambda: box.master_of("po2") == "kvopen0")
    assert isolated(box, "po1") is False and isolated(box, "po2") is False
    assert ping(o1, "10.61.0.12") and ping(o2, "10.61.0.11")


def test_isolation_turned_off_by_hand_is_healed(box: Sandbox) -> None:
    box.write_config(config(with_open=False))
    g1 = box.guest("pp1", "10.60.0.11/24", "10.60.0.1")
    box.guest("pp2", "10.60.0.12/24", "10.60.0.1")
    box.start_daemon("--no-bus")
    assert wait_until(lambda: isolated(box, "pp1") and isolated(box, "pp2"))
    for port in ("pp1", "pp2"):
        sh("bridge", "link", "set", "dev", port, "isolated", "off", ns=box.host)
    # AF_BRIDGE RTM_SETLINK, as `bridge` sends it, announces itself only to the bridge family.
    assert wait_until(lambda: isolated(box, "pp1") and isolated(box, "pp2"))
    sh("ip", "link", "set", "dev", "pp1", "type", "bridge_slave", "isolated", "off", ns=box.host)
    assert wait_until(lambda: isolated(box, "pp1"))
    assert not ping(g1, "10.60.0.12")
    assert "reconcile.applied" in box.log.read_text()


def test_isolation_cleared_when_turned_off_and_ports_released_with_the_network(
        box: Sandbox) -> None:
    box.write_config(config(with_open=False))
    g1 = box.guest("pp1", "10.60.0.11/24", "10.60.0.1")
    box.guest("pp2", "10.60.0.12/24", "10.60.0.1")
    box.start_daemon("--no-bus")
    assert wait_until(lambda: isolated(box, "pp1") and isolated(box, "pp2"))
    reload(box, config(isolate=False, with_open=False))
    assert wait_until(lambda: isolated(box, "pp1") is False and isolated(box, "pp2") is False)
    assert ping(g1, "10.60.0.12")
    # Isolated again, then the network goes: its ports leave the bridge with it.
    reload(box, config(with_open=False))
    assert wait_until(lambda: isolated(box, "pp1") and isolated(box, "pp2"))
    reload(box, network_toml("other", "nat", "kvoth0", "10.62.0.1/24", dns=False))
    assert wait_until(lambda: box.master_of("pp1") is None and box.master_of("pp2") is None)
    assert isolated(box, "pp1") is None


def test_port_moved_to_a_network_without_isolation_loses_it(box: Sandbox) -> None:
    box.write_config(config())
    g1 = box.guest("pp1", "10.60.0.11/24", "10.60.0.1")
    box.start_daemon("--no-bus")
    assert wait_until(lambda: isolated(box, "pp1"))
    o1 = box.guest("po1", "10.61.0.11/24", "10.61.0.1")
    assert wait_until(lambda: box.master_of("po1") == "kvopen0")
    # Move pp1 to the open network: the attach rule for pp* now points there.
    text = config().replace('network = "priv"\nifname = "pp*"', 'network = "open"\nifname = "pp*"')
    assert text != config()
    reload(box, text)
    assert wait_until(lambda: box.master_of("pp1") == "kvopen0")
    assert isolated(box, "pp1") is False
    sh("ip", "addr", "flush", "dev", "eth0", ns=g1)
    sh("ip", "addr", "add", "10.61.0.21/24", "dev", "eth0", ns=g1)
    assert ping(g1, "10.61.0.11") and ping(o1, "10.61.0.21")
