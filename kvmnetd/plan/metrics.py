"""Port counters as a Prometheus text file (exposition format 0.0.4), for node exporter's
textfile collector. Pure: rows in, text out."""

from __future__ import annotations

from kvmnetd.model.records import PortCounters

# (metric, PortCounters field, help)
METRICS = (
    ("kvmnetd_port_rx_bytes_total", "rx_bytes", "Bytes received by the guest on this port."),
    ("kvmnetd_port_tx_bytes_total", "tx_bytes", "Bytes sent by the guest on this port."),
    ("kvmnetd_port_rx_packets_total", "rx_packets",
     "Packets received by the guest on this port."),
    ("kvmnetd_port_tx_packets_total", "tx_packets", "Packets sent by the guest on this port."),
    ("kvmnetd_port_drops_total", "drops", "Packets dropped on this port, either way."),
    ("kvmnetd_port_spoof_drops_total", "spoof_drops",
     "Packets dropped by anti-spoofing on this port (0 until anti-spoofing exists)."),
)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(rows: list[PortCounters]) -> str:
    out: list[str] = []
    for metric, field, help_text in METRICS:
        out.append(f"# HELP {metric} {help_text}")
        out.append(f"# TYPE {metric} counter")
        for r in sorted(rows, key=lambda r: r.ifname):
            labels = f'ifname="{_label(r.ifname)}",network="{_label(r.network)}"'
            out.append(f"{metric}{{{labels}}} {getattr(r, field)}")
    return "\n".join(out) + "\n"
