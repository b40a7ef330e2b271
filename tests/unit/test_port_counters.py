"""Port counters: the guest's side read from a statistics tree, and the Prometheus file."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from kvmnetd.adapters.counters import read_port_counters
from kvmnetd.model.records import PortCounters
from kvmnetd.plan.metrics import METRICS, render_metrics


def stats_tree(root: Path, ifname: str, **values: int) -> None:
    d = root / ifname / "statistics"
    d.mkdir(parents=True)
    for name in ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets", "rx_dropped",
                 "tx_dropped"):
        (d / name).write_text(f"{values.get(name, 0)}\n")


def test_the_hosts_receive_side_is_what_the_guest_sent(tmp_path: Path) -> None:
    stats_tree(tmp_path, "vnet0", rx_bytes=1000, tx_bytes=50, rx_packets=10, tx_packets=2,
               rx_dropped=3, tx_dropped=4)
    # (rx_bytes, tx_bytes, rx_packets, tx_packets, drops) of the guest
    assert read_port_counters("vnet0", str(tmp_path)) == (50, 1000, 2, 10, 7)


def test_a_missing_or_odd_device_has_no_counters(tmp_path: Path) -> None:
    assert read_port_counters("vnet9", str(tmp_path)) is None
    assert read_port_counters("../etc", str(tmp_path)) is None
    assert read_port_counters("", str(tmp_path)) is None


def test_the_metrics_file_parses_with_prometheus_own_parser() -> None:
    rows = [PortCounters("vnet1", "lab", 1, 2, 3, 4, 5, 0),
            PortCounters("vnet0", 'we"ird\\net', 10, 20, 30, 40, 0, 0)]
    text = render_metrics(rows)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # The parser reports a counter's family without the _total suffix.
    assert set(families) == {m.removesuffix("_total") for m, _, _ in METRICS}
    tx = families["kvmnetd_port_tx_bytes"]
    assert tx.type == "counter" and tx.documentation.startswith("Bytes sent by the guest")
    got = {(s.labels["ifname"], s.labels["network"]): s.value for s in tx.samples}
    assert got == {("vnet1", "lab"): 2.0, ("vnet0", 'we"ird\\net'): 20.0}


def test_no_ports_is_still_a_valid_file() -> None:
    families = list(text_string_to_metric_families(render_metrics([])))
    assert len(families) == len(METRICS) and all(not f.samples for f in families)
