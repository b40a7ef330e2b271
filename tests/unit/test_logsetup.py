"""The journal format without systemd-python: one clear warning, then text."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
sys.modules["systemd"] = None  # as if python3-systemd were not installed
from kvmnetd import logsetup
import structlog
logsetup.setup("journal")
structlog.get_logger().info("network.state", network="default")
structlog.get_logger().info("network.state", network="other")
"""


def test_missing_systemd_python_is_warned_about_once() -> None:
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    lines = r.stderr.splitlines()
    warned = [x for x in lines if "log.journal_unavailable" in x]
    assert len(warned) == 1, r.stderr
    assert "python3-systemd" in warned[0] and "level='warning'" in warned[0]
    # The events still come, as text.
    assert sum("network.state" in x for x in lines) == 2
