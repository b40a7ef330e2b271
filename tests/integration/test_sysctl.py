"""Forwarding switches, flipped inside a throwaway namespace only."""

from __future__ import annotations

import os

import pytest

from kvmnetd.adapters.sysctl import SysctlAdapter, forwarding
from tests.support.netns import entered, netns, sh

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]


@pytest.mark.parametrize("family", [4, 6])
def test_set_and_read_forwarding_in_a_namespace(family: int) -> None:
    host_before = forwarding(family)  # read only: the host's own value must not move
    with netns("sc") as ns:
        adapter = SysctlAdapter()
        with entered(ns):
            assert adapter.forwarding(family) is False  # a new namespace starts off
            adapter.set_forwarding(family, True)
            assert adapter.forwarding(family) is True
        key = "net.ipv4.ip_forward" if family == 4 else "net.ipv6.conf.all.forwarding"
        assert sh("sysctl", "-n", key, ns=ns).stdout.strip() == "1"
        with entered(ns):
            adapter.set_forwarding(family, False)
            assert adapter.forwarding(family) is False
        assert adapter.writes == 2
    assert forwarding(family) == host_before


def test_rejects_unknown_family() -> None:
    with pytest.raises(ValueError):
        forwarding(5)
