"""Writes kvmnetd's qemu-bridge-helper ACL file, atomically and only when it changes."""

from __future__ import annotations

import contextlib
import os

import structlog

log = structlog.get_logger("kvmnetd.plan.qemu_bridge")


def write_if_changed(path: str, text: str) -> bool:
    """True if the file was (re)written. Errors are logged: session guests matter less than
    the daemon staying up."""
    with contextlib.suppress(OSError):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return False
    tmp = f"{path}.kvmnetd-tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # the helper runs setuid root, but people read it too
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("qemu_bridge.write_failed", path=path, error=str(exc))
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return False
    log.info("qemu_bridge.written", path=path, allowed=text.count("\nallow "))
    return True
