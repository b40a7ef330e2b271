"""Shared fixtures: a whole sandbox (host, upstream, guests) for tests of the real daemon."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dbus import PrivateBus, open_dir, start_bus, stop_bus
from tests.support.rig import Sandbox


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    d = Path(open_dir())
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def box(scratch_dir: Path) -> Iterator[Sandbox]:
    with Sandbox(scratch_dir) as b:
        yield b
        if b.log.exists():
            print(f"--- kvmnetd log ---\n{b.log.read_text()[-8000:]}")


@pytest.fixture
def bus(box: Sandbox) -> Iterator[PrivateBus]:
    """A private system-type dbus-daemon with our policy, for the sandboxed daemon."""
    b = start_bus(str(box.tmp))
    try:
        yield b
    finally:
        stop_bus(b)
