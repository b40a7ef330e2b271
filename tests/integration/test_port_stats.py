"""Port counters with the real daemon: a known transfer each way, seen from the guest's side,
and the Prometheus file read back with prometheus-client's own parser."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.netns import sh
from tests.support.rig import FAR_HOST, PY, Sandbox, wait_until
from tests.support.toml import attach_toml, daemon_toml, network_toml

pytestmark = pytest.mark.integration

PORT = 9997
SIZE = 1000  # UDP payload: 1042 bytes on the wire (Ethernet 14 + IPv4 20 + UDP 8)
FRAME = SIZE + 42
SENT, RECEIVED = 300, 200
# ARP, IPv6 router solicitations and the like may cross the port meanwhile.
NOISE_BYTES, NOISE_PACKETS = 4000, 30

# Upstream: on "go", answer with RECEIVED datagrams to whoever asked; ignore the rest.
SINK = f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{FAR_HOST}", {PORT}))
while True:
    data, peer = s.recvfrom(4096)
    if data == b"go":
        for _ in range({RECEIVED}):
            s.sendto(b"y" * {SIZE}, peer)
"""

# The guest: SENT datagrams out, then "go", then count what comes back.
GUEST = f"""
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
for _ in range({SENT}):
    s.sendto(b"x" * {SIZE}, ("{FAR_HOST}", {PORT}))
time.sleep(0.2)
s.sendto(b"go", ("{FAR_HOST}", {PORT}))
s.settimeout(5)
n = 0
while n < {RECEIVED}:
    s.recv(4096)
    n += 1
print(n)
"""

KEYS = ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets", "drops", "spoof_drops")


def stats(box: Sandbox, *ifname: str) -> dict[str, dict[str, Any]]:
    return {r["ifname"]: r for r in box.jctl("port", "stats", *ifname)}


def from_file(path: Path) -> dict[str, dict[str, Any]]:
    """ifname -> {network, key: value} from the Prometheus text file."""
    out: dict[str, dict[str, Any]] = {}
    for family in text_string_to_metric_families(path.read_text()):
        assert family.type == "counter"
        key = family.name.removeprefix("kvmnetd_port_")
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            row = out.setdefault(sample.labels["ifname"],
                                 {"ifname": sample.labels["ifname"],
                                  "network": sample.labels["network"]})
            row[key] = int(sample.value)
    return out


def test_counters_match_a_known_transfer_and_the_prometheus_file(box: Sandbox) -> None:
    metrics = box.tmp / "textfile" / "kvmnetd.prom"
    metrics.parent.mkdir()
    box.write_config(daemon_toml(metrics_file=str(metrics))
                     + network_toml("cnt", "nat", "kvcnt0", "10.70.0.1/24", dns=False)
                     + attach_toml("cnt", ifname="pc*"))
    g1 = box.guest("pc1", "10.70.0.11/24", "10.70.0.1")
    sink = subprocess.Popen(["ip", "netns", "exec", box.upstream, PY, "-c", SINK])
    try:
        box.start_daemon("--no-bus")
        assert wait_until(lambda: box.master_of("pc1") == "kvcnt0")
        assert wait_until(lambda: "pc1" in from_file(metrics) if metrics.exists() else False,
                          timeout=15)
        before = stats(box)["pc1"]
        assert before["network"] == "cnt" and before["spoof_drops"] == 0
        out = sh(PY, "-c", GUEST, ns=g1).stdout.strip()
        assert out == str(RECEIVED)
        after = stats(box, "pc1")["pc1"]
        sent = after["tx_bytes"] - before["tx_bytes"]
        got = after["rx_bytes"] - before["rx_bytes"]
        # tx is what the guest sent: SENT frames plus "go" (44 bytes), and a little noise.
        assert SENT * FRAME + 44 <= sent <= SENT * FRAME + 44 + NOISE_BYTES, sent
        assert SENT + 1 <= after["tx_packets"] - before["tx_packets"] <= SENT + 1 + NOISE_PACKETS
        assert RECEIVED * FRAME <= got <= RECEIVED * FRAME + NOISE_BYTES, got
        assert RECEIVED <= after["rx_packets"] - before["rx_packets"] <= RECEIVED + NOISE_PACKETS
        # The file catches up within a few seconds and says what PortStats says.
        def same() -> bool:
            now = stats(box)["pc1"]
            row = from_file(metrics).get("pc1")
            return row is not None and row == {k: now[k] for k in ("ifname", "network", *KEYS)}
        assert wait_until(same, timeout=20, interval=0.5)
        assert from_file(metrics)["pc1"]["tx_bytes"] >= after["tx_bytes"]
    finally:
        sink.kill()
        sink.wait(5)


def test_port_stats_verb_and_its_refusals(box: Sandbox) -> None:
    box.write_config(network_toml("cnt", "nat", "kvcnt0", "10.70.0.1/24", dns=False)
                     + attach_toml("cnt", ifname="pc*"))
    box.guest("pc1", "10.70.0.11/24", "10.70.0.1")
    box.start_daemon("--no-bus")
    assert wait_until(lambda: box.master_of("pc1") == "kvcnt0")
    human = box.ctl_out("port", "stats")
    assert human.split("\n", 1)[0].lower().split()[:4] == [
        "ifname", "network", "rx_bytes", "tx_bytes"]
    assert "pc1" in human
    bad = box.ctl("port", "stats", "nosuch0", check=False)
    assert bad.returncode != 0 and "nosuch0 is not a port of any network" in bad.stderr
    # Without metrics_file nothing is written anywhere.
    assert not list(box.tmp.rglob("*.prom"))


def test_metrics_file_set_by_a_reload_and_emptied_when_the_last_port_goes(
        box: Sandbox) -> None:
    metrics = box.tmp / "kvmnetd.prom"
    net = (network_toml("cnt", "nat", "kvcnt0", "10.70.0.1/24", dns=False)
           + attach_toml("cnt", ifname="pc*"))
    box.write_config(net)
    box.guest("pc1", "10.70.0.11/24", "10.70.0.1")
    box.start_daemon("--no-bus")
    assert wait_until(lambda: box.master_of("pc1") == "kvcnt0")
    assert not metrics.exists()
    box.write_config(daemon_toml(metrics_file=str(metrics)) + net)
    assert box.ctl("reload").returncode == 0
    assert wait_until(lambda: metrics.exists() and "pc1" in from_file(metrics), timeout=10)
    sh("ip", "link", "del", "pc1", ns=box.host)
    assert wait_until(lambda: from_file(metrics) == {}, timeout=15)
