"""adopt-libvirt's order of steps and its rollback, against fakes of the project's own adapter."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from kvmnetd import cli_libvirt
from kvmnetd.adapters.libvirt import networks as libvirt_net
from kvmnetd.adapters.libvirt.networks import Snapshot

XML = """<network><name>default</name><forward mode='nat'/><bridge name='virbr0' stp='off'/>
<ip address='192.168.122.1' netmask='255.255.255.0'><dhcp>
<range start='192.168.122.2' end='192.168.122.254'/></dhcp></ip></network>"""
LEASE = {"type": 0, "expirytime": 4102444800, "mac": "52:54:00:00:00:01",
         "ipaddr": "192.168.122.50", "hostname": "g1", "clientid": None}


class Steps:
    def __init__(self, fail: str | None) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.fail = fail

    def call(self, method: str, *args: Any) -> Any:
        self.log.append((method, *args[:1]))
        if method == self.fail:
            raise RuntimeError(f"{method} refused")
        return "/org/kvmnetd/network/default"


@pytest.fixture
def steps(monkeypatch: pytest.MonkeyPatch) -> Any:
    def make(fail: str | None) -> Steps:
        s = Steps(fail)
        snap = Snapshot(XML, True, True, "virbr0", (LEASE,), (("g1", "vnet0"), ("g2", "vnet1")))
        monkeypatch.setattr(libvirt_net, "snapshot", lambda uri, name: snap)
        for fn in ("stop", "undefine"):
            monkeypatch.setattr(libvirt_net, fn,
                                lambda uri, name, fn=fn: s.log.append((f"libvirt.{fn}", name)))
        monkeypatch.setattr(libvirt_net, "restore",
                            lambda uri, snap, name: s.log.append(("libvirt.restore", name)))
        monkeypatch.setattr(libvirt_net, "plug",
                            lambda tap, br: s.log.append(("plug", tap, br)))
        return s
    return make


def opts(tmp_path: Path) -> argparse.Namespace:
    return argparse.Namespace(name="default", connect="test:///x", state_dir=str(tmp_path))


def test_adopt_in_order(steps: Any, tmp_path: Path) -> None:
    s = steps(None)
    cli_libvirt.do_adopt_libvirt(s, opts(tmp_path))
    assert s.log == [("libvirt.stop", "default"), ("DefineNetwork", s.log[1][1]),
                     ("AttachPort", "vnet0"), ("AttachPort", "vnet1"),
                     ("libvirt.undefine", "default")]
    assert 'bridge = "virbr0"' in s.log[1][1]
    assert (tmp_path / "default.leases").read_text() == (
        "4102444800 52:54:00:00:00:01 192.168.122.50 g1 *\n")


@pytest.mark.parametrize(("fail", "undo"), [
    ("DefineNetwork", []),
    ("AttachPort", [("UndefineNetwork", "default")]),
])
def test_failure_rolls_back(steps: Any, tmp_path: Path, fail: str,
                            undo: list[tuple[str, str]]) -> None:
    s = steps(fail)
    with pytest.raises(SystemExit) as exc:
        cli_libvirt.do_adopt_libvirt(s, opts(tmp_path))
    assert exc.value.code == 1
    at = next(i for i, step in enumerate(s.log) if step[0] == fail) + 1
    assert s.log[at:] == [*undo, ("libvirt.restore", "default"),
                          ("plug", "vnet0", "virbr0"), ("plug", "vnet1", "virbr0")]
    assert ("libvirt.undefine", "default") not in s.log
