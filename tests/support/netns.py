"""Throwaway network namespaces for integration tests. Nothing here touches the host's own stack."""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import subprocess
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
_counter = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


def unique_name(tag: str) -> str:
    # Short: names also become interface names in some tests (15 bytes max).
    return f"kt{os.getpid() % 10000}{tag}{next(_counter)}"


def sh(*cmd: str, ns: str | None = None, check: bool = True, timeout: float = 30,
       input: str | None = None, env: dict[str, str] | None = None
       ) -> subprocess.CompletedProcess[str]:
    argv = list(cmd)
    if ns is not None:
        argv = ["ip", "netns", "exec", ns, *argv]
    return subprocess.run(argv, check=check, capture_output=True, text=True,
                          timeout=timeout, input=input,
                          env={**os.environ, **env} if env else None)


@contextlib.contextmanager
def netns(tag: str = "n") -> Iterator[str]:
    """Create a namespace with lo up; delete it (and kill what runs in it) afterwards."""
    name = unique_name(tag)
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "link", "set", "lo", "up", ns=name)
        yield name
    finally:
        pids = sh("ip", "netns", "pids", name, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        sh("ip", "netns", "del", name, check=False)


@contextlib.contextmanager
def entered(ns: str) -> Iterator[None]:
    """Move the calling thread into `ns` (sockets and children it makes live there), then back."""
    with open("/proc/self/ns/net") as home, open(f"/run/netns/{ns}") as target:
        if _libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns failed")
        try:
            yield
        finally:
            if _libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back failed")


def veth_into(host_ns: str, guest_ns: str, host_if: str, guest_if: str = "eth0",
              address: str | None = None, gateway: str | None = None) -> None:
    """A veth pair: `host_if` stays in host_ns (a port for kvmnetd), `guest_if` goes to guest_ns."""
    sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", guest_if, "netns", guest_ns,
       ns=host_ns)
    sh("ip", "link", "set", guest_if, "up", ns=guest_ns)
    if address:
        sh("ip", "addr", "add", address, "dev", guest_if, ns=guest_ns)
    if gateway:
        sh("ip", "route", "add", "default", "via", gateway, ns=guest_ns)


def ping(ns: str, target: str, count: int = 1, wait: int = 1) -> bool:
    r = sh("busybox", "ping", "-c", str(count), "-W", str(wait), target, ns=ns, check=False)
    return r.returncode == 0


def nft_ruleset(ns: str) -> str:
    return sh("nft", "list", "ruleset", ns=ns).stdout
