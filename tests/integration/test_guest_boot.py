"""A real guest (qemu TCG) gets a lease from a real dnsmasq on a bridge in a throwaway namespace."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.guest import Guest, guest_images, wait_for_link
from tests.support.netns import netns, ping, sh

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

GATEWAY = "10.66.0.1"
RANGE = (ipaddress.IPv4Address("10.66.0.10"), ipaddress.IPv4Address("10.66.0.50"))


@contextlib.contextmanager
def lan(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """A namespace with bridge br0 (GATEWAY/24) and dnsmasq serving DHCP on it."""
    with netns("gb") as ns:
        sh("ip", "link", "add", "br0", "type", "bridge", "stp_state", "0", ns=ns)
        sh("ip", "addr", "add", f"{GATEWAY}/24", "dev", "br0", ns=ns)
        sh("ip", "link", "set", "br0", "up", ns=ns)
        leases = tmp_path / "leases"
        pidfile = tmp_path / "dnsmasq.pid"
        dnsmasq = subprocess.Popen(
            ["ip", "netns", "exec", ns, "dnsmasq", "--keep-in-foreground", "--bind-interfaces",
             "--interface=br0", "--except-interface=lo", "--port=0", "--no-ping",
             "--dhcp-range=10.66.0.10,10.66.0.50", f"--pid-file={pidfile}",
             f"--dhcp-leasefile={leases}", "--conf-file=/dev/null", "--log-dhcp",
             f"--log-facility={tmp_path / 'dnsmasq.log'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 10
            while not pidfile.exists():
                if dnsmasq.poll() is not None:
                    pytest.fail(f"dnsmasq exited: {dnsmasq.communicate()[1].decode()}")
                assert time.monotonic() < deadline, "dnsmasq did not start"
                time.sleep(0.02)
            yield ns, "br0", leases
        finally:
            dnsmasq.terminate()
            dnsmasq.wait(5)


def test_guest_gets_lease_and_pings_gateway(tmp_path: Path) -> None:
    guest_images()  # build (or skip) before the clock starts
    mac = "52:54:00:66:00:21"
    with lan(tmp_path) as (ns, br, leases):
        t0 = time.monotonic()
        guest = Guest.boot("gb-a", ns, "tap0", mac, hold=True, hostname="kvmnet-a")
        try:
            wait_for_link(ns, "tap0")
            sh("ip", "link", "set", "tap0", "master", br, "up", ns=ns)
            t_tap = time.monotonic()

            lease = guest.lease(timeout=60)
            t_lease = time.monotonic()
            assert RANGE[0] <= ipaddress.IPv4Address(lease["ip"]) <= RANGE[1]
            assert lease["mask"] == "24"
            assert lease["router"] == GATEWAY
            assert lease["mac"] == mac
            guest.wait_for("KVMNET ready", 10)

            assert guest.ping(GATEWAY)
            t_ping = time.monotonic()
            assert ping(ns, lease["ip"], count=1, wait=2), "host side cannot reach the held guest"
            assert not guest.ping("10.66.0.99", timeout=4)

            again = guest.renew()  # DHCP from scratch while held; dnsmasq keeps the address
            assert again["ip"] == lease["ip"]

            rc, out = guest.run("cat /proc/sys/kernel/hostname")
            assert (rc, out) == (0, ["kvmnet-a"])
            assert f"{mac} {lease['ip']} kvmnet-a" in leases.read_text()
        finally:
            t_stop0 = time.monotonic()
            guest.stop()
            t_stop = time.monotonic()
        assert guest.proc.returncode == 0, guest._tail()
    print(f"\nguest timings: tap {t_tap - t0:.2f}s, lease {t_lease - t0:.2f}s, "
          f"gateway ping +{t_ping - t_lease:.2f}s, poweroff {t_stop - t_stop0:.2f}s")


def test_guest_without_hold_pings_and_powers_off(tmp_path: Path) -> None:
    guest_images()
    with lan(tmp_path) as (ns, br, _):
        t0 = time.monotonic()
        guest = Guest.boot("gb-b", ns, "tap1", "52:54:00:66:00:22", hold=False,
                           pings=[GATEWAY, "10.66.0.98"], wait=1)
        try:
            wait_for_link(ns, "tap1")
            sh("ip", "link", "set", "tap1", "master", br, "up", ns=ns)
            guest.lease(timeout=60)
            assert guest.wait_for(f"KVMNET ping target={GATEWAY} ", 20).endswith("ok=1")
            assert guest.wait_for("KVMNET ping target=10.66.0.98 ", 20).endswith("ok=0")
            guest.wait_for("KVMNET done", 10)
            assert guest.proc.wait(20) == 0
        finally:
            guest.stop()
    print(f"\nguest boot-to-poweroff: {time.monotonic() - t0:.2f}s")
