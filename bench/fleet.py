"""50 NAT networks (DHCP on) with [[attach]] rules, and taps spread over them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from contextlib import suppress

from bench.common import DAEMON_TOML, Box, attach_rule, network_toml
from tests.support.netns import sh

NETS = 50


def config() -> str:
    parts = [DAEMON_TOML]
    for i in range(NETS):
        parts.append(network_toml(f"n{i:02d}", f"kb{i:02d}", f"10.60.{i}.1/24"))
    for i in range(NETS):
        parts.append(attach_rule(f"n{i:02d}", f"t{i:02d}-*"))
    return "".join(parts)


def tap_names(first: int, last: int) -> list[str]:
    """Taps first..last-1, round-robin over the networks: t07-0123 joins n07."""
    return [f"t{j % NETS:02d}-{j:04d}" for j in range(first, last)]


def bridge_of(tap: str) -> str:
    return f"kb{tap[1:3]}"


def bridges() -> list[str]:
    return [f"kb{i:02d}" for i in range(NETS)]


def wipe(box: Box) -> None:
    """After the daemon stopped: remove all it made, so the next start is a cold one."""
    box.batch(f"link del {b}" for b in bridges())
    sh("nft", "delete", "table", "inet", "kvmnetd", ns=box.host, check=False)
    for f in box.run_dir.glob("*.pid"):
        with suppress(ValueError, OSError):
            os.kill(int(f.read_text().strip()), signal.SIGKILL)
    shutil.rmtree(box.run_dir, ignore_errors=True)
    shutil.rmtree(box.state_dir, ignore_errors=True)


def grow(box: Box, have: int, n: int) -> None:
    """Stop the daemon (if running), wipe what it made, and add taps up to n: the next
    start is a cold one over n taps."""
    if box.daemon is not None:
        try:
            box.stop_daemon(timeout=10)
        except subprocess.TimeoutExpired:
            box.kill_daemon()
        wipe(box)
    box.batch(f"tuntap add dev {t} mode tap" for t in tap_names(have, n))
