"""Settled: which link events the ports and bridges the loop left explain on their own."""

from __future__ import annotations

from dataclasses import replace

from kvmnetd.engine.settled import Settled
from kvmnetd.model.observed import Link

BR = Link(index=10, name="kvbr0", kind="bridge", up=True, mac="02:00:00:00:00:0a")
TAP = Link(index=20, name="vnet0", kind="tun", up=True, master=10, mac="52:54:00:00:00:01")


def settled() -> Settled:
    s = Settled()
    s.bridge(BR)
    s.port("vnet0", TAP)
    return s


def test_links_as_they_were_left_need_nothing() -> None:
    assert settled().explain([10, 20], {10: BR, 20: TAP}) == []


def test_a_bridge_taking_a_ports_mac_needs_nothing() -> None:
    assert settled().explain([10], {10: replace(BR, mac="52:54:00:00:00:01")}) == []


def test_a_bridge_changed_otherwise_needs_a_full_pass() -> None:
    assert settled().explain([10], {10: replace(BR, up=False)}) is None


def test_a_port_seen_otherwise_is_looked_at_by_its_own_plan() -> None:
    assert settled().explain([20], {20: replace(TAP, up=False)}) == ["vnet0"]
    assert settled().explain([20], {20: replace(TAP, isolated=True)}) == ["vnet0"]


def test_a_port_on_another_bridge_or_renamed_needs_a_full_pass() -> None:
    assert settled().explain([20], {20: replace(TAP, master=11)}) is None
    assert settled().explain([20], {20: replace(TAP, name="vnet9")}) is None


def test_a_settled_ports_deletion_is_its_own_plans_once() -> None:
    s = settled()
    assert s.explain([20], {}) == ["vnet0"]
    assert s.explain([20], {}) is None  # its index is forgotten: someone else's now


def test_a_port_its_plan_saw_gone_needs_nothing_when_its_deletion_is_read() -> None:
    s = settled()
    s.forget("vnet0")
    assert s.explain([20], {}) == []


def test_unknown_links_need_a_full_pass() -> None:
    assert settled().explain([30], {30: replace(TAP, index=30, name="vnet3")}) is None
    assert settled().explain([30], {}) is None


def test_still_compares_with_the_link_as_left() -> None:
    s = settled()
    assert s.still("vnet0", TAP)
    assert not s.still("vnet0", replace(TAP, up=False))
    assert not s.still("vnet0", None) and not s.still("vnet1", TAP)
    s.clear()
    assert not s.still("vnet0", TAP) and s.explain([10], {10: BR}) is None
