"""The checked-in manual pages are what scripts/gen-man makes from the parsers and
docs/config.md now: a change to --help or to the config reference must regenerate them."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_man_pages_are_up_to_date() -> None:
    r = subprocess.run([REPO / "scripts/gen-man", "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_daemon_parser_is_what_main_parses() -> None:
    from kvmnetd import daemon

    args = daemon.parse_args(["--no-bus", "--log-level", "debug"])
    assert vars(args) == vars(daemon.parser().parse_args(["--no-bus", "--log-level", "debug"]))
