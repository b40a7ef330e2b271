"""Exceptions at the boundary: core errors become named D-Bus errors, anything else Failed."""

from __future__ import annotations

import structlog
from dbus_fast import DBusError

from kvmnetd.control.names import error_name
from kvmnetd.model import errors as core_errors

log = structlog.get_logger("kvmnetd.bus")

# Replies stay small even when a hostile argument ends up in a message.
MAX_MESSAGE = 4096

_BY_CLASS: tuple[tuple[type[core_errors.KvmnetError], str], ...] = (
    (core_errors.NoSuchNetwork, "NoSuchNetwork"),
    (core_errors.NoSuchPort, "NoSuchPort"),
    (core_errors.ConfigError, "ConfigInvalid"),
    (core_errors.InvalidArgument, "InvalidArgument"),
    (core_errors.PermissionDenied, "PermissionDenied"),
    (core_errors.Conflict, "Conflict"),
    (core_errors.Busy, "Busy"),
    (core_errors.NotSupported, "NotSupported"),
)


def _clip(text: str) -> str:
    text = text.replace("\0", "\\0")
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + "..."


def _clip_lines(lines: list[str]) -> str:
    """Whole lines, as many as fit; the count of the rest after them."""
    out: list[str] = []
    size = 0
    for i, line in enumerate(lines):
        line = _clip(line)
        if size + len(line) + 1 > MAX_MESSAGE and out:
            out.append(f"... and {len(lines) - i} more")
            break
        out.append(line)
        size += len(line) + 1
    return "\n".join(out)


def classify(exc: BaseException, method: str = "") -> tuple[str, str]:
    """(full error name, message) for any exception; unexpected ones are logged."""
    if isinstance(exc, core_errors.ConfigError) and exc.issues:
        return error_name("ConfigInvalid"), _clip_lines([str(i) for i in exc.issues])
    if isinstance(exc, core_errors.KvmnetError):
        for cls, short in _BY_CLASS:
            if isinstance(exc, cls):
                return error_name(short), _clip(str(exc) or short)
        return error_name("Failed"), _clip(str(exc) or type(exc).__name__)
    log.error("request failed unexpectedly", method=method, exc_info=exc)
    return error_name("Failed"), f"internal error in {method or 'request'}: {type(exc).__name__}"


def to_dbus_error(exc: BaseException, method: str = "") -> DBusError:
    if isinstance(exc, DBusError):
        return exc
    name, message = classify(exc, method)
    return DBusError(name, message)
