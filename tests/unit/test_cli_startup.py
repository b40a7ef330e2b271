"""kvmnetctl starts light: a qemu hook may run it for every guest NIC."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

HEAVY = ("dbus_fast", "tomli_w", "xml.etree.ElementTree", "kvmnetd.config.libvirt_import",
         "kvmnetd.app.core", "kvmnetd.engine.reconciler", "structlog")


def test_kvmnetctl_imports_no_heavy_module_at_start() -> None:
    probe = ("import sys, kvmnetd.cli; kvmnetd.cli.parser(); "
             f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       check=True)
    assert r.stdout.strip() == ""


LINES = [
    ["status"], ["status", "--json"],
    ["network", "list", "--json"], ["network", "define", "-", "--runtime"],
    ["network", "import-libvirt", "default.xml"],
    ["--socket", "port", "port", "attach", "vnet0", "nat", "--force", "-q"],
    ["--bus-address", "unix:path=/x", "-q", "port", "limit", "vnet0", "20mbit"],
    ["--socket=/run/k.sock", "forward", "add", "nat", "tcp", "8080", "10.0.0.2:80"],
    ["leases", "nat"], ["log-level", "debug"], ["version"],
]


@pytest.mark.parametrize("argv", LINES, ids=" ".join)
def test_a_call_builds_only_its_verbs_and_parses_as_the_whole_parser(argv: list[str]) -> None:
    from kvmnetd import cli

    def parsed(p: Any) -> dict[str, Any]:
        out = vars(p.parse_args(argv))
        fn = out.pop("fn")  # simple()'s are made anew with each parser
        return {**out, "fn": (fn.__code__, [c.cell_contents for c in fn.__closure__ or ()])}

    assert parsed(cli.parser(cli.verb_of(argv))) == parsed(cli.parser())


@pytest.mark.parametrize("argv", [["nosuch"], ["port"], ["port", "nosuch"], ["network"]])
def test_a_bad_call_fails_as_with_the_whole_parser(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from kvmnetd import cli

    errors = []
    for p in (cli.parser(cli.verb_of(argv)), cli.parser()):
        with pytest.raises(SystemExit):
            p.parse_args(argv)
        errors.append(capsys.readouterr().err)
    assert errors[0] == errors[1] and "kvmnetctl" in errors[0]


def test_the_verb_is_the_first_word_that_is_no_options_value() -> None:
    from kvmnetd.cli import verb_of

    assert verb_of(["--socket", "port", "network", "list"]) == "network"
    assert verb_of(["-q", "--bus-address", "x", "port", "attach"]) == "port"
    assert verb_of(["--help"]) is None and verb_of([]) is None
