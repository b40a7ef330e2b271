"""Per-port rate limits with the real daemon, tc and kernel: what a guest gets each way,
an override at run time through a restart and a move, healing, and removal."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from kvmnetd.adapters.rate.tc import TcRates
from kvmnetd.model.rate import SetPortRate
from tests.support.netns import entered, netns, sh
from tests.support.rig import FAR_HOST, PY, Sandbox, wait_until
from tests.support.toml import attach_toml, network_toml

pytestmark = pytest.mark.integration

PORT = 9996
SIZE = 4_000_000  # 1.6 s at 20 Mbit/s: a rate check with wide tolerance, not a timing test
RATE = 20e6
LIMIT = 2_500_000  # 20mbit in bytes/s, as tc stores it

# Upstream: "u" = take what comes until EOF and answer the rate seen (bits/s);
# "d" = send SIZE bytes.
SERVER = f"""
import socket, threading, time
def serve(c):
    with c:
        op = c.recv(1)
        if op == b"u":
            n, t0 = 0, None
            while data := c.recv(1 << 16):
                t0 = t0 or time.monotonic()
                n += len(data)
            c.sendall(str(n * 8 / (time.monotonic() - t0)).encode())
        else:
            block = b"y" * 65536
            for _ in range({SIZE} // 65536):
                c.sendall(block)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{FAR_HOST}", {PORT}))
s.listen(8)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],)).start()
"""

# The guest: "up" sends SIZE bytes and prints the rate the far end saw; "down" prints the
# rate it received at.
CLIENT = f"""
import socket, sys, time
s = socket.create_connection(("{FAR_HOST}", {PORT}), timeout=30)
if sys.argv[1] == "up":
    s.sendall(b"u")
    block = b"x" * 65536
    for _ in range({SIZE} // 65536):
        s.sendall(block)
    s.shutdown(socket.SHUT_WR)
    print(s.recv(100).decode())
else:
    s.sendall(b"d")
    n, t0 = 0, None
    while data := s.recv(1 << 16):
        t0 = t0 or time.monotonic()
        n += len(data)
    print(n * 8 / (time.monotonic() - t0))
"""


@pytest.fixture
def far_server(box: Sandbox) -> Iterator[None]:
    server = subprocess.Popen(["ip", "netns", "exec", box.upstream, PY, "-c", SERVER])
    try:
        yield
    finally:
        server.kill()
        server.wait(5)


def speed(guest: str, direction: str) -> float:
    """bits/s of one bounded transfer between the guest and the far host."""
    return float(sh(PY, "-c", CLIENT, direction, ns=guest, timeout=60).stdout.strip())


def qdiscs(box: Sandbox, dev: str) -> tuple[int | None, bool]:
    """(the root tbf's rate in bytes/s, has an ingress qdisc) of a host device."""
    r = sh("tc", "-j", "qdisc", "show", "dev", dev, ns=box.host, check=False)
    if r.returncode != 0:
        return None, False
    got: list[dict[str, Any]] = json.loads(r.stdout or "[]")
    rate = next((q["options"]["rate"] for q in got if q["kind"] == "tbf" and q.get("root")),
                None)
    return rate, any(q["kind"] == "ingress" for q in got)


def limited(box: Sandbox, port: str, rate: int) -> bool:
    """Both directions at `rate`: the port's tbf, its ingress redirect and its ifb's tbf."""
    return qdiscs(box, port) == (rate, True) and qdiscs(box, f"kr-{port}")[0] == rate


def unlimited(box: Sandbox, port: str) -> bool:
    return qdiscs(box, port) == (None, False) and not exists(box, f"kr-{port}")


def exists(box: Sandbox, dev: str) -> bool:
    return sh("ip", "link", "show", dev, ns=box.host, check=False).returncode == 0


def heals(box: Sandbox) -> int:
    return box.log.read_text().count("SetPortRate(ifname=rl1, rate=2500000")


def rates(box: Sandbox) -> dict[str, str]:
    return {p["ifname"]: p["rate"] for p in box.jctl("port", "list")}


def test_a_guest_gets_its_rate_each_way_and_full_speed_without(
        box: Sandbox, far_server: None) -> None:
    box.write_config(network_toml("rl", "nat", "kvrl0", "10.71.0.1/24", dns=False,
                                  port_rate="20mbit")
                     + attach_toml("rl", ifname="rl*"))
    g1 = box.guest("rl1", "10.71.0.11/24", "10.71.0.1")
    g2 = box.guest("rl2", "10.71.0.12/24", "10.71.0.1")
    box.start_daemon("--no-bus")
    assert wait_until(lambda: limited(box, "rl1", LIMIT) and limited(box, "rl2", LIMIT),
                      timeout=15)
    assert rates(box) == {"rl1": "20mbit", "rl2": "20mbit"}
    # "none" lifts the network's default for that port alone.
    assert box.ctl_out("port", "limit", "rl2", "none").strip() == "rl2: no limit"
    assert wait_until(lambda: unlimited(box, "rl2"), timeout=10)
    assert rates(box) == {"rl1": "20mbit", "rl2": "none"}

    up, down = speed(g1, "up"), speed(g1, "down")
    print(f"20mbit: from the guest {up / 1e6:.1f}, to the guest {down / 1e6:.1f} Mbit/s")
    assert 0.75 * RATE <= up <= 1.25 * RATE, f"from the guest: {up / 1e6:.1f} Mbit/s"
    assert 0.75 * RATE <= down <= 1.25 * RATE, f"to the guest: {down / 1e6:.1f} Mbit/s"
    free_up, free_down = speed(g2, "up"), speed(g2, "down")
    assert free_up > 3 * RATE and free_down > 3 * RATE, (free_up, free_down)


def test_override_survives_a_restart_and_a_move(box: Sandbox) -> None:
    box.write_config(network_toml("ra", "nat", "kvra0", "10.72.0.1/24", dns=False)
                     + network_toml("rb", "nat", "kvrb0", "10.73.0.1/24", dns=False,
                                    port_rate="100mbit")
                     + attach_toml("ra", ifname="rl*"))
    box.guest("rl1")
    box.start_daemon("--no-bus")
    assert wait_until(lambda: box.master_of("rl1") == "kvra0", timeout=10)
    assert unlimited(box, "rl1") and rates(box) == {"rl1": "none"}
    bad = box.ctl("port", "limit", "rl1", "20 furlongs", check=False)
    assert bad.returncode != 0 and "unknown rate unit 'furlongs'" in bad.stderr
    bad = box.ctl("port", "limit", "nosuch0", "20mbit", check=False)
    assert bad.returncode != 0 and "nosuch0 is not a port of any network" in bad.stderr

    assert box.ctl_out("port", "limit", "rl1", "20mbit").strip() == "rl1: limit 20mbit each way"
    assert limited(box, "rl1", LIMIT)  # in place when the call returns
    saved = json.loads((box.state_dir / "port-limits.json").read_text())
    assert saved == {"rl1": LIMIT}

    writes = box.log.read_text().count("SetPortRate(")
    box.stop_daemon()
    box.start_daemon("--no-bus")
    assert rates(box) == {"rl1": "20mbit"} and limited(box, "rl1", LIMIT)
    # A restart over limits that are right rewrites none of them.
    assert box.log.read_text().count("SetPortRate(") == writes
    # Moved to a network whose default is 100mbit: the port's own limit goes with it.
    box.ctl("port", "move", "rl1", "rb")
    assert box.master_of("rl1") == "kvrb0"
    assert wait_until(lambda: limited(box, "rl1", LIMIT), timeout=10)
    assert rates(box) == {"rl1": "20mbit"}
    # "default": the network's port_rate again.
    box.ctl("port", "limit", "rl1", "default")
    assert wait_until(lambda: limited(box, "rl1", 12_500_000), timeout=10)
    assert rates(box) == {"rl1": "100mbit"}
    assert json.loads((box.state_dir / "port-limits.json").read_text()) == {}


def test_limit_healed_and_removed_with_its_port_and_network(box: Sandbox) -> None:
    net = network_toml("rl", "nat", "kvrl0", "10.71.0.1/24", dns=False, port_rate="20mbit")
    box.write_config(net + attach_toml("rl", ifname="rl*"))
    box.guest("rl1")
    box.guest("rl2")
    box.start_daemon("--no-bus")
    assert wait_until(lambda: limited(box, "rl1", LIMIT) and limited(box, "rl2", LIMIT),
                      timeout=15)
    for damage in (["tc", "qdisc", "del", "dev", "rl1", "root"],
                   ["tc", "qdisc", "del", "dev", "rl1", "ingress"],
                   ["tc", "filter", "del", "dev", "rl1", "ingress"],
                   ["tc", "qdisc", "del", "dev", "kr-rl1", "root"],
                   ["ip", "link", "del", "kr-rl1"]):
        before = heals(box)
        sh(*damage, ns=box.host)
        # Healed, often before a look could see it gone: the log tells it was rewritten.
        assert wait_until(lambda n=before: heals(box) > n and limited(box, "rl1", LIMIT),
                          timeout=10), damage
    # The port goes (its guest stopped): its ifb goes with it.
    sh("ip", "link", "del", "rl1", ns=box.host)
    assert wait_until(lambda: not exists(box, "kr-rl1"), timeout=10)
    # The network goes: its ports keep their devices but lose the limit and the ifb.
    box.write_config("")
    box.ctl("reload")
    assert wait_until(lambda: unlimited(box, "rl2"), timeout=10)
    owned = json.loads((box.run_dir / "owned.json").read_text())
    assert owned.get("limits", {}) == {}


def test_tc_adapter_batches_ports_and_names_the_one_refused() -> None:
    with netns("tc") as ns:
        for port in ("ta1", "ta2"):
            sh("ip", "link", "add", port, "type", "veth", "peer", "name", f"x{port}", ns=ns)
        tc = TcRates()
        acts = [SetPortRate("n", "ta1", LIMIT, "kr-ta1"),
                SetPortRate("n", "nosuch0", LIMIT, "kr-nosuch0"),
                SetPortRate("n", "ta2", LIMIT * 2, "kr-ta2")]
        with entered(ns):
            errors = asyncio.run(tc.apply_many(acts))
            seen = asyncio.run(tc.observe())
        assert [e is None for e in errors] == [True, False, True]
        assert "tc refused the rate limit of nosuch0: qdisc replace dev nosuch0" in str(
            errors[1]) and "Cannot find device" in str(errors[1]), str(errors[1])
        assert seen["ta1"] == (LIMIT, True) and seen["kr-ta1"] == (LIMIT, False)
        assert seen["ta2"] == (LIMIT * 2, True)
        # A port refused leaves nothing behind, not even its ifb.
        assert sh("ip", "link", "show", "kr-nosuch0", ns=ns, check=False).returncode != 0
        with entered(ns):
            errors = asyncio.run(tc.apply_many([SetPortRate("n", "ta1", None, "kr-ta1")]))
            seen = asyncio.run(tc.observe())
        assert errors == [None] and "ta1" not in seen and "kr-ta1" not in seen
        assert sh("ip", "link", "show", "kr-ta1", ns=ns, check=False).returncode != 0
