"""Small pure helpers of the service wiring."""

from __future__ import annotations

import pytest

from kvmnetd.service import libvirt_socket


@pytest.mark.parametrize("uri,sock", [
    ("qemu:///system?socket=/tmp/x/libvirt-sock", "/tmp/x/libvirt-sock"),
    ("qemu:///system", "/run/libvirt/libvirt-sock"),
    ("qemu+ssh://host/system", None),
    ("test:///default", None),
])
def test_libvirt_socket(uri: str, sock: str | None) -> None:
    assert libvirt_socket(uri) == sock
