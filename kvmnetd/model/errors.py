"""Typed errors of the core. The bus layer maps each class to one D-Bus error name."""

from __future__ import annotations

from dataclasses import dataclass


class KvmnetError(Exception):
    """Base: a refused request. The message says what to do."""


class NoSuchNetwork(KvmnetError):
    pass


class NoSuchPort(KvmnetError):
    pass


class InvalidArgument(KvmnetError):
    pass


class PermissionDenied(KvmnetError):
    pass


class Conflict(KvmnetError):
    pass


class Busy(KvmnetError):
    pass


class NotSupported(KvmnetError):
    pass


@dataclass(frozen=True)
class ConfigIssue:
    file: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.key}: {self.message}"


class ConfigError(InvalidArgument):
    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))
