"""structlog set-up: key=value to stderr, JSON on request, native journald fields when asked."""

from __future__ import annotations

import logging
import os
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


LEVELS = ("debug", "info", "warning", "error")
_NUMERIC = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50,
            "exception": 40}
_threshold = [logging.INFO]


def _gate(_logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    # A processor rather than a filtering wrapper class: loggers are cached on first
    # use, and the level must still change at run time (set_level).
    if _NUMERIC.get(method, logging.INFO) < _threshold[0]:
        raise structlog.DropEvent
    return event


def set_level(level: str) -> None:
    """Change the verbosity of every logger, at once and at run time."""
    if level not in LEVELS:
        raise ValueError(f"log level {level!r} must be one of {', '.join(LEVELS)}")
    _threshold[0] = _NUMERIC[level]


def default_format() -> str:
    """Under systemd, stderr is the journal: native fields there instead of text."""
    return "journal" if os.environ.get("JOURNAL_STREAM") else "kv"


def format_for(configured: str, from_command_line: bool) -> str:
    # "kv" is also the config's default: unless asked for by name on the command
    # line, it stands for the default, which is the journal under systemd.
    return configured if from_command_line or configured != "kv" else default_format()


# One list, changed in place: loggers are cached on first use and keep the list they
# were made with, so a later setup() (the config's format) reaches them too.
_PROCESSORS: list[Any] = []


def setup(fmt: str = "kv", level: str = "info") -> None:
    set_level(level if level in LEVELS else "info")
    procs: list[Any] = [
        _gate,
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
    _PROCESSORS[:] = procs
    structlog.configure(
        processors=_PROCESSORS,
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    if missing_journal:
        # Said once, at start: the journal still gets the text, but without its fields.
        structlog.get_logger("kvmnetd").warning(
            "log.journal_unavailable",
            reason="systemd-python (python3-systemd) is not importable",
            consequence="plain text logs: no NETWORK=, EVENT= fields in the journal")
