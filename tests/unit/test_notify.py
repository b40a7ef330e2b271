"""sd_notify never blocks the loop, even when nobody reads the socket."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from kvmnetd.adapters.notify import Notifier


def test_a_full_notify_socket_does_not_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    path = str(tmp_path / "notify")
    reader = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    n = Notifier()
    t0 = time.monotonic()
    for _ in range(5000):  # far more than the receive queue holds
        n.status("1 networks up, 0 ports, 0 degraded")
    assert time.monotonic() - t0 < 5
    assert reader.recv(4096).startswith(b"STATUS=")
    reader.close()
