"""structlog set-up: key=value to stderr, JSON on request, native journald fields when asked."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def _journal_renderer() -> Any:
    import importlib

    journal = importlib.import_module("systemd.journal")  # optional: systemd-python

    def render(_logger: Any, method: str, event: dict[str, Any]) -> str:
        msg = event.pop("event", "")
        fields = {k.upper(): str(v) for k, v in event.items() if k not in ("level",)}
        prio = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}.get(method, 6)
        journal.send(str(msg), PRIORITY=str(prio), SYSLOG_IDENTIFIER="kvmnetd",
                     EVENT=str(msg), **fields)
        raise structlog.DropEvent

    return render


def setup(fmt: str = "kv", level: str = "info") -> None:
    lvl = getattr(logging, level.upper(), logging.INFO)
    procs: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    missing_journal = False
    if fmt == "journal":
        try:
            procs.append(_journal_renderer())
        except ImportError:
            fmt, missing_journal = "kv", True
    if fmt == "json":
        procs.append(structlog.processors.JSONRenderer(sort_keys=True))
    elif fmt == "kv":
        procs.append(structlog.processors.KeyValueRenderer(
            key_order=["timestamp", "level", "event"], drop_missing=True))
    structlog.configure(
        processors=procs,
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    if missing_journal:
        # Said once, at start: the journal still gets the text, but without its fields.
        structlog.get_logger("kvmnetd").warning(
            "log.journal_unavailable",
            reason="systemd-python (python3-systemd) is not importable",
            consequence="plain text logs: no NETWORK=, EVENT= fields in the journal")
