"""`doctor` findings about FRR, which carries the evpn overlays' control plane. Pure."""

from __future__ import annotations

from typing import Any

from kvmnetd.app.doctor import Finding


def frr_findings(status: dict[str, Any]) -> list[Finding]:
    """A dead FRR, a part that could not be applied, and BGP peers not established."""
    state = status.get("state", "off")
    ps = status.get("pathspace") or ""
    vtysh = f"vtysh -N {ps}" if ps else "vtysh"
    subject = f"FRR (pathspace {ps})" if ps else "FRR"
    reason = status.get("reason") or ""
    if state == "down":
        return [Finding(
            "frr-down", "error", None, subject,
            f"FRR is not running ({reason}): evpn networks learn no remote guests and other "
            "hosts lose the routes to this host's guests",
            "start FRR (systemctl start frr, or zebra and bgpd with -N for a pathspace); "
            "kvmnetd applies its part again as soon as FRR is back")]
    if state == "failed":
        return [Finding(
            "frr-config-failed", "error", None, subject,
            f"kvmnetd's part of FRR's configuration is not applied: {reason}",
            f"see the daemon log (frr.state); `{vtysh} -c 'show running-config'` shows what "
            "FRR runs; kvmnetd retries by itself")]
    out: list[Finding] = []
    if state == "applied":
        for peer, pstate in sorted((status.get("peers") or {}).items()):
            if pstate != "Established":
                out.append(Finding(
                    "bgp-peer-down", "warning", None, f"BGP neighbour {peer}",
                    f"the BGP session to {peer} is {pstate}, not Established: guests on that "
                    "host are not reachable over evpn networks",
                    f"check that the host at {peer} runs kvmnetd and FRR, that TCP port 179 is "
                    f"open between the hosts, and `{vtysh} -c 'show bgp l2vpn evpn summary'`"))
    return out
