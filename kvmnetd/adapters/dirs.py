"""The daemon's own directories: made at start, and refused when they cannot be written."""

from __future__ import annotations

import contextlib
import os
import re

import structlog

from kvmnetd.model.desired import Settings
from kvmnetd.model.errors import ConfigError, ConfigIssue

log = structlog.get_logger("kvmnetd")


# The unit's ReadWritePaths (systemd/kvmnetd.service): under ProtectSystem=strict every
# other path is read-only for the daemon and dnsmasq.
UNIT_WRITABLE = ("/run/kvmnetd", "/var/lib/kvmnetd", "/etc/kvmnetd/networks.d")


def check_writable_dirs(s: Settings, config_file: str | None, overrides: dict[str, str]) -> None:
    """Make run_dir and state_dir, and refuse to start when one cannot be written.

    A run_dir or state_dir moved outside the unit's ReadWritePaths is read-only under
    ProtectSystem=strict: better to say so at start than to fail every network later.
    networks_dir may be read-only on purpose (configuration managed elsewhere): only
    networks defined over D-Bus need it, so that is a warning.
    """
    issues = []
    for key, path in (("run_dir", s.run_dir), ("state_dir", s.state_dir)):
        try:
            os.makedirs(path, mode=0o755, exist_ok=True)
            probe = os.path.join(path, f".kvmnetd-probe{os.getpid()}")
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink(probe)
        except OSError as e:
            issues.append(ConfigIssue(*_where(key, config_file, overrides), key,
                                      f"{path} is not writable ({e.strerror}){_unit_hint()}"))
    if issues:
        raise ConfigError(issues)
    if os.path.isdir(s.networks_dir) and not os.access(s.networks_dir, os.W_OK):
        log.warning("config.networks_dir_read_only", path=s.networks_dir,
                    consequence="networks defined over D-Bus cannot be saved")


def _unit_hint() -> str:
    if not os.environ.get("INVOCATION_ID"):  # not started by systemd
        return ""
    return ("; kvmnetd.service may write only its ReadWritePaths (" + " ".join(UNIT_WRITABLE)
            + "): keep the default, or add the path in a drop-in (systemctl edit kvmnetd)")


def _where(key: str, config_file: str | None, overrides: dict[str, str]) -> tuple[str, int]:
    """FILE and LINE that set `key`, for the error message."""
    if key in overrides:
        return "(command line)", 0
    if config_file:
        with contextlib.suppress(OSError):
            with open(config_file, encoding="utf-8", errors="replace") as f:
                for n, line in enumerate(f, 1):
                    if re.match(rf"\s*{key}\s*=", line):
                        return config_file, n
        return config_file, 0
    return "(default)", 0
