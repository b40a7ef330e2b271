"""kvmnetd's part of FRR's configuration: the render (golden text) and the merge into a
running configuration that keeps whatever else is there."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import replace
from pathlib import Path

import pytest

from kvmnetd.model.desired import Mode, Network
from kvmnetd.model.overlay import HostOverlay, NetworkOverlay
from kvmnetd.plan.frr import (
    FrrPart,
    delta_outside,
    frr_part,
    is_config,
    merged_config,
    part_applied,
    part_problem,
)

GOLDEN = Path(__file__).parent.parent / "golden" / "frr"
ip = ipaddress.IPv4Address


def host(**kw: object) -> HostOverlay:
    base = HostOverlay(local=ip("192.0.2.11"), asn=65000,
                       neighbors=(ip("192.0.2.13"), ip("192.0.2.12")))
    return replace(base, **kw)  # type: ignore[arg-type]


def net(name: str = "ov", mode: str = "evpn", vni: int = 100) -> Network:
    return Network(name=name, mode=Mode.NAT, bridge=f"kv{name}",
                   ipv4=ipaddress.IPv4Interface("10.60.0.1/24"),
                   overlay=NetworkOverlay(vni=vni, mode=mode))  # type: ignore[arg-type]


CASES = {
    "mesh": (host(), [net()]),
    "bfd": (host(bfd=True), [net(), net("ov2", vni=200)]),
    "alone": (host(neighbors=()), [net()]),
}

# What `show running-config` of FRR 8.4 prints, with hand-written config around and
# inside our instance.
RUNNING = """Building configuration...

Current configuration:
!
frr version 8.4.4
frr defaults traditional
hostname vm
no ip forwarding
service integrated-vtysh-config
!
ip prefix-list HAND seq 5 permit 10.0.0.0/8
!
router bgp 65000
 bgp router-id 192.0.2.11
 bgp log-neighbor-changes
 no bgp default ipv4-unicast
 coalesce-time 100
 neighbor 192.0.2.12 remote-as 65000
 neighbor 192.0.2.12 update-source 192.0.2.11
 neighbor 192.0.2.13 remote-as 65000
 neighbor 192.0.2.13 update-source 192.0.2.11
 !
 address-family l2vpn evpn
  neighbor 192.0.2.12 activate
  neighbor 192.0.2.13 activate
  advertise-all-vni
  advertise-svi-ip
 exit-address-family
exit
!
route-map HAND permit 10
exit
!
end
"""


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    h, nets = CASES[case]
    part = frr_part(h, nets)
    assert part is not None
    text = part.text()
    path = GOLDEN / f"{case}.conf"
    if os.environ.get("KVMNETD_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text()
    assert part_problem(part) is None


def test_no_part_without_evpn_networks() -> None:
    assert frr_part(host(), []) is None
    assert frr_part(host(), [net(mode="static")]) is None
    assert frr_part(None, [net()]) is None


def test_local_address_is_never_its_own_neighbour() -> None:
    part = frr_part(host(neighbors=(ip("192.0.2.11"), ip("192.0.2.12"))), [net()])
    assert part is not None and part.neighbors == ("192.0.2.12",)


def test_partial_render_refused() -> None:
    part = frr_part(host(), [net()])
    assert part is not None
    no_vni = replace(part, lines=tuple(x for x in part.lines if x[1] != "advertise-all-vni"))
    assert "advertise-all-vni" in (part_problem(no_vni) or "")
    no_act = replace(part, lines=tuple(x for x in part.lines if "activate" not in x[1]))
    assert "activate" in (part_problem(no_act) or "")
    assert part_problem(replace(part, lines=())) == "the render is empty"


def test_running_config_that_holds_the_part_needs_nothing() -> None:
    part = frr_part(host(), [net()])
    assert is_config(RUNNING)
    assert merged_config(RUNNING, part, part) is None
    assert part_applied(RUNNING, part, None)


def test_removed_neighbour_goes_hand_written_lines_stay() -> None:
    old = frr_part(host(), [net()])
    new = frr_part(host(neighbors=(ip("192.0.2.12"),)), [net()])
    merged = merged_config(RUNNING, new, old)
    assert merged is not None
    assert "192.0.2.13" not in merged
    for kept in ("ip prefix-list HAND seq 5 permit 10.0.0.0/8", " bgp log-neighbor-changes",
                 "  advertise-svi-ip", "route-map HAND permit 10", "hostname vm"):
        assert kept in merged.splitlines()
    # The result is what FRR then runs: applying it again finds nothing to do.
    assert merged_config(merged, new, old) is None


def test_lines_not_recorded_as_ours_are_never_taken_out() -> None:
    # Without a record of what was written (first start), nothing is removed.
    new = frr_part(host(neighbors=(ip("192.0.2.12"),)), [net()])
    assert merged_config(RUNNING, new, None) is None


def test_new_instance_goes_before_end() -> None:
    part = frr_part(host(), [net()])
    assert part is not None
    bare = "Current configuration:\n!\nfrr version 8.4.4\nhostname vm\n!\nend\n"
    merged = merged_config(bare, part, None)
    assert merged is not None
    lines = merged.splitlines()
    assert lines[-1] == "end" and lines.index("router bgp 65000") > lines.index("hostname vm")
    assert merged_config(merged, part, None) is None


def test_no_evpn_left_removes_our_lines_and_an_emptied_instance() -> None:
    old = frr_part(host(), [net()])
    merged = merged_config(RUNNING, None, old)
    assert merged is not None
    # Hand-written lines keep the instance.
    assert "router bgp 65000" in merged and " bgp log-neighbor-changes" in merged
    assert "neighbor 192" not in merged
    assert old is not None
    only_ours = RUNNING.replace(" bgp log-neighbor-changes\n", "").replace(
        "  advertise-svi-ip\n", "")
    emptied = merged_config(only_ours, None, old)
    assert emptied is not None and "router bgp" not in emptied
    assert "route-map HAND permit 10" in emptied


def test_asn_change_moves_the_part() -> None:
    old = frr_part(host(), [net()])
    new = frr_part(host(asn=65001), [net()])
    merged = merged_config(RUNNING, new, old)
    assert merged is not None
    assert "router bgp 65001" in merged and "router bgp 65000" in merged  # hand lines left


def test_record_round_trip() -> None:
    part = frr_part(host(bfd=True), [net()])
    assert part is not None
    assert FrrPart.from_json(part.to_json()) == part


def test_delta_outside_our_instance() -> None:
    ok = ("\nLines To Delete\n===============\nrouter bgp 65000\n no neighbor 192.0.2.13 "
          "remote-as 65000\n\nLines To Add\n============\nrouter bgp 65000\n"
          " neighbor 192.0.2.14 remote-as 65000\n")
    assert delta_outside(ok, {65000}) == []
    assert delta_outside("\nLines To Delete\n====\nno router bgp 65000\n", {65000}) == []
    bad = ok + "no route-map HAND permit 10\n"
    assert delta_outside(bad, {65000}) == ["no route-map HAND permit 10"]


def test_not_a_config() -> None:
    assert not is_config("")
    assert not is_config("Exiting: failed to connect to any daemons.\n")
