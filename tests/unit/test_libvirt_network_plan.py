"""The libvirt network planner: what kvmnetd defines, starts, repairs and never touches."""

from __future__ import annotations

import pytest

from kvmnetd.app.doctor_libvirt import libvirt_clash_findings
from kvmnetd.app.domains import libvirt_plugged
from kvmnetd.model.desired import Mode, Network
from kvmnetd.model.domxml import KVMNET_XMLNS, DomainNic
from kvmnetd.plan.libvirt_networks import (
    NetAction,
    SeenNetwork,
    network_xml,
    parse_seen,
    plan_networks,
)


def ours(name: str, bridge: str, active: bool = True, persistent: bool = True,
         autostart: bool = True) -> SeenNetwork:
    return SeenNetwork(name, True, bridge, active, persistent, autostart)


def kinds(actions: list[NetAction]) -> list[tuple[str, str]]:
    return [(a.kind, a.name) for a in actions]


def test_missing_network_is_defined_started_and_autostarted() -> None:
    actions, clashes = plan_networks({"lab": "kvlab0"}, {})
    assert kinds(actions) == [("define", "lab"), ("start", "lab"), ("autostart", "lab")]
    assert clashes == []
    seen = parse_seen(actions[0].xml, True, True, True)
    assert seen == ours("lab", "kvlab0")


def test_in_step_means_nothing_to_do() -> None:
    assert plan_networks({"lab": "kvlab0"}, {"lab": ours("lab", "kvlab0")}) == ([], [])


@pytest.mark.parametrize(("seen", "expected"), [
    (ours("lab", "kvlab0", active=False), [("start", "lab")]),
    (ours("lab", "kvlab0", autostart=False), [("autostart", "lab")]),
    # `virsh net-undefine` of a running one leaves it transient: define it again.
    (ours("lab", "kvlab0", persistent=False, autostart=False),
     [("define", "lab"), ("autostart", "lab")]),
    # The bridge changed: libvirt cannot change it in place.
    (ours("lab", "old0"), [("destroy", "lab"), ("undefine", "lab"), ("define", "lab"),
                           ("start", "lab"), ("autostart", "lab")]),
])
def test_drift_is_repaired(seen: SeenNetwork, expected: list[tuple[str, str]]) -> None:
    actions, _ = plan_networks({"lab": "kvlab0"}, {"lab": seen})
    assert kinds(actions) == expected


def test_transient_leftover_is_redefined_under_its_uuid() -> None:
    seen = SeenNetwork("lab", True, "kvlab0", True, False, False, "0b1f-uuid")
    actions, _ = plan_networks({"lab": "kvlab0"}, {"lab": seen})
    assert "<uuid>0b1f-uuid</uuid>" in actions[0].xml
    assert parse_seen(actions[0].xml, True, True, True).uuid == "0b1f-uuid"


def test_ours_no_longer_wanted_are_removed() -> None:
    actions, _ = plan_networks({}, {"gone": ours("gone", "kvg0"),
                                    "off": ours("off", "kvo0", active=False)})
    assert kinds(actions) == [("destroy", "gone"), ("undefine", "gone"), ("undefine", "off")]


def test_foreign_networks_are_never_touched_and_clashes_reported() -> None:
    default = SeenNetwork("default", False, "virbr0", True, True, True)
    other = SeenNetwork("other", False, "virbr1", False, True, False)
    actions, clashes = plan_networks({"default": "kvdef0", "lab": "kvlab0"},
                                     {"default": default, "other": other})
    assert kinds(actions) == [("define", "lab"), ("start", "lab"), ("autostart", "lab")]
    assert clashes == ["default"]
    (finding,) = libvirt_clash_findings(clashes)
    assert finding.check == "libvirt-network-clash" and finding.network == "default"
    assert "adopt-libvirt default" in finding.fix


def test_network_xml_is_escaped_and_tagged() -> None:
    xml = network_xml("a&b", "kv'0")
    assert "<name>a&amp;b</name>" in xml and f"xmlns:kvmnet=\"{KVMNET_XMLNS}\"" in xml
    assert "<forward mode='bridge'/>" in xml
    assert parse_seen(xml, False, True, False).bridge == "kv'0"


@pytest.mark.parametrize("xml", ["<domain/>", "<network", "<!DOCTYPE x><network/>"])
def test_parse_seen_refuses(xml: str) -> None:
    with pytest.raises(ValueError):
        parse_seen(xml, True, True, True)


def test_foreign_metadata_is_not_ours() -> None:
    xml = ("<network><name>x</name><metadata><m:network xmlns:m='urn:other'>x</m:network>"
           "</metadata><bridge name='virbr9'/></network>")
    assert not parse_seen(xml, True, True, True).ours


def test_libvirt_plugged_maps_type_network_by_bridge() -> None:
    nets = {"lab": Network(name="lab", mode=Mode.ISOLATED, bridge="kvlab0")}
    nic = DomainNic(tap="vnet0", mac="52:54:00:00:00:01", kind="network", bridge="kvlab0",
                    network=None, source_network="lab")
    assert libvirt_plugged(nic, nets) == "lab"
    assert libvirt_plugged(DomainNic("vnet1", nic.mac, "network", "virbr0", None, "default"),
                           nets) is None
    assert libvirt_plugged(DomainNic("vnet2", nic.mac, "bridge", "kvlab0", None), nets) is None
    # A running domain's XML gives such a NIC libvirt's actual type, bridge.
    live = DomainNic("vnet3", nic.mac, "bridge", "kvlab0", None, "lab")
    assert libvirt_plugged(live, nets) == "lab"
