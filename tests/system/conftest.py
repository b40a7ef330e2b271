"""Figures of the system test, printed in pytest's summary (they are measurements, not checks)."""

from __future__ import annotations

from typing import Any

from tests.support.container import FIGURES


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("kvmnetd system test")
        for line in FIGURES:
            terminalreporter.write_line(line)
