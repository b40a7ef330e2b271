"""What an idle host costs: which `nft` commands the daemon runs at rest.

A wrapper named `nft`, first on the daemon's PATH, logs every argv and execs the real nft.
After start-up has settled, ten idle seconds must show no nft command at all: drift is
reported by nft monitor, and the safety sweep runs once a minute. A foreign change is
still noticed (its chains are re-read), and so is a change to our own table.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.support.netns import sh
from tests.support.rig import Sandbox, wait_until
from tests.support.toml import network_toml

pytestmark = pytest.mark.integration

CONFIG = network_toml("nat", "nat", "kvcost0", "10.57.0.1/24", dns=False)


def nft_wrapper(directory: Path, log: Path) -> Path:
    real = shutil.which("nft")
    assert real is not None
    wrapper = directory / "nft"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    return directory


def calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def test_idle_runs_no_nft_and_changes_are_still_seen(box: Sandbox) -> None:
    log = box.tmp / "nft-calls.log"
    bindir = box.tmp / "bin"
    bindir.mkdir()
    nft_wrapper(bindir, log)
    box.write_config(CONFIG)
    box.start_daemon("--no-bus", env={"PATH": f"{bindir}:{os.environ['PATH']}"})
    assert any("list ruleset" in c for c in calls(log)), "start-up reads foreign chains once"
    # Start-up settles: our own apply comes back through nft monitor once.
    box.ctl("status")
    wait_until(lambda: False, timeout=2.0)
    start = len(calls(log))
    time.sleep(10)
    idle = calls(log)[start:]
    print(f"NFT idle 10s: {len(idle)} calls: "
          f"{sum('list ruleset' in c for c in idle)} list ruleset, "
          f"{sum('list table' in c for c in idle)} list table")
    assert not idle, idle
    # A foreign change is still noticed: nft monitor makes the next pass read the chains.
    before = len(calls(log))
    sh("nft", "add", "table", "ip", "other", ns=box.host)
    assert wait_until(lambda: any("list ruleset" in c for c in calls(log)[before:]),
                      timeout=10)
    before = len(calls(log))
    sh("nft", "add", "chain", "inet", "kvmnetd", "stray", ns=box.host)
    assert wait_until(lambda: any(c.startswith("list table inet kvmnetd")
                                  for c in calls(log)[before:]), timeout=10)
