"""adapters.inotify.wait_for_path: told by the kernel, also through directories made later."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from kvmnetd.adapters.inotify import wait_for_path


async def test_returns_at_once_when_there(tmp_path: Path) -> None:
    (tmp_path / "sock").touch()
    await asyncio.wait_for(wait_for_path(str(tmp_path / "sock")), 5)


async def test_a_socket_bound_under_directories_made_later(tmp_path: Path) -> None:
    path = tmp_path / "run" / "libvirt" / "libvirt-sock"
    waiter = asyncio.ensure_future(wait_for_path(str(path)))
    await asyncio.sleep(0.05)
    (tmp_path / "run").mkdir()
    await asyncio.sleep(0.05)
    (tmp_path / "run" / "libvirt").mkdir()
    await asyncio.sleep(0.05)
    assert not waiter.done()
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(path))
        await asyncio.wait_for(waiter, 5)
    finally:
        s.close()
