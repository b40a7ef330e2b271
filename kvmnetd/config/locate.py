"""Line numbers for TOML keys, and typed access to parsed tables that reports by line.

tomllib returns plain data without positions. The Locator walks a document
that tomllib already accepted and records the line of every table header and
`key =` line, so an issue about `network.nat.dhcp.host[1].mac` can name the
line where it was written. Table reads values with type checks and sends every
problem, with that line, to the file's issue list instead of stopping.
"""

from __future__ import annotations

import bisect
import difflib
import json
import re
import tomllib
import unicodedata
from collections.abc import Callable, Collection
from typing import Any, TypeVar

from kvmnetd.model.desired import Source
from kvmnetd.model.errors import ConfigIssue

T = TypeVar("T")
D = TypeVar("D")
Part = str | int
Path = tuple[Part, ...]

_BARE = re.compile(r"[A-Za-z0-9_-]+")
_WS = " \t"


def format_path(path: Path) -> str:
    """`("network", "nat", "dhcp", "host", 1, "mac")` -> `network.nat.dhcp.host[1].mac`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        # Quote odd keys so control characters can never reach a log line raw.
        text = part if _BARE.fullmatch(part) else json.dumps(part)
        out = f"{out}.{text}" if out else text
    return out or "(top)"


class Locator:
    """Maps key paths to 1-based line numbers of one document."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self._lines: dict[Path, int] = {}
        self._arrays: dict[Path, int] = {}
        # The document is already known to be valid; any surprise just ends
        # the scan early and lookups fall back to enclosing tables.
        try:
            self._scan()
        except (IndexError, ValueError):
            pass

    def line(self, path: Path) -> int:
        while path:
            found = self._lines.get(path)
            if found is not None:
                return found
            path = path[:-1]
        return 1

    # -- scanning ---------------------------------------------------------

    def _lineno(self, pos: int) -> int:
        return bisect.bisect_right(self._starts, pos)

    def _note(self, path: Path, line: int, exact: bool) -> None:
        for i in range(1, len(path)):
            self._lines.setdefault(path[:i], line)
        if exact:
            self._lines[path] = line
        else:
            self._lines.setdefault(path, line)

    def _scan(self) -> None:
        text = self._text
        n = len(text)
        pos = 0
        table: Path = ()
        while pos < n:
            c = text[pos]
            if c in _WS or c in "\r\n":
                pos += 1
            elif c == "#":
                pos = self._eol(pos)
            elif c == "[":
                line = self._lineno(pos)
                double = text.startswith("[[", pos)
                pos, keys = self._keys(pos + (2 if double else 1))
                table = self._resolve(keys, double)
                self._note(table, line, exact=True)
                pos = self._eol(pos)
            else:
                line = self._lineno(pos)
                pos, keys = self._keys(pos)
                self._note(table + tuple(keys), line, exact=False)
                pos = self._skip_value(pos + 1)  # past '='

    def _resolve(self, keys: list[str], array: bool) -> Path:
        # Earlier [[arrays]] along the way refer to their latest element.
        out: list[Part] = []
        for i, key in enumerate(keys):
            out.append(key)
            here = tuple(out)
            last = i == len(keys) - 1
            if last and array:
                self._arrays[here] = self._arrays.get(here, 0) + 1
                out.append(self._arrays[here] - 1)
            elif here in self._arrays:
                out.append(self._arrays[here] - 1)
        return tuple(out)

    def _eol(self, pos: int) -> int:
        end = self._text.find("\n", pos)
        return len(self._text) if end < 0 else end + 1

    def _keys(self, pos: int) -> tuple[int, list[str]]:
        """Parse a dotted key; return the position of the following '=' or ']'."""
        text = self._text
        keys: list[str] = []
        while True:
            while text[pos] in _WS:
                pos += 1
            c = text[pos]
            if c in "\"'":
                end = self._string_end(pos)
                raw = text[pos:end]
                keys.append(raw[1:-1] if c == "'" else tomllib.loads(f"k = {raw}")["k"])
                pos = end
            else:
                m = _BARE.match(text, pos)
                if m is None:
                    raise ValueError("no key")
                keys.append(m.group())
                pos = m.end()
            while text[pos] in _WS:
                pos += 1
            if text[pos] != ".":
                return pos, keys
            pos += 1

    def _string_end(self, pos: int) -> int:
        """Position just past the string starting at pos (any of the four kinds)."""
        text = self._text
        q = text[pos]
        if text.startswith(q * 3, pos):
            pos += 3
            while True:
                if q == '"' and text[pos] == "\\":
                    pos += 2
                    continue
                if text.startswith(q * 3, pos):
                    pos += 3
                    # Up to two quotes may belong to the content, right before the end.
                    for _ in range(2):
                        if pos < len(text) and text[pos] == q:
                            pos += 1
                    return pos
                pos += 1
        pos += 1
        while text[pos] != q:
            pos += 2 if (q == '"' and text[pos] == "\\") else 1
        return pos + 1

    def _skip_value(self, pos: int) -> int:
        text = self._text
        depth = 0
        while pos < len(text):
            c = text[pos]
            if c in "\"'":
                pos = self._string_end(pos)
            elif c == "#":
                nl = text.find("\n", pos)
                pos = len(text) if nl < 0 else nl
            elif c in "[{":
                depth += 1
                pos += 1
            elif c in "]}":
                depth -= 1
                pos += 1
            elif c == "\n" and depth <= 0:
                return pos + 1
            else:
                pos += 1
        return pos


def has_control(s: str) -> bool:
    # Zl/Zp too: some readers treat U+2028/U+2029 as line breaks.
    return any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") for c in s)


def suggest(word: str, known: Collection[str]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


_TYPE_NAMES = {str: "a string", bool: "true or false", int: "an integer", list: "an array",
               dict: "a table", float: "a number"}


def type_name(v: Any) -> str:
    for t, name in _TYPE_NAMES.items():
        if type(v) is t:
            return name
    return type(v).__name__


class FileCtx:
    """One file being read: where issues go and how lines are found."""

    def __init__(self, file: str, text: str, issues: list[ConfigIssue]) -> None:
        self.file = file
        self.issues = issues
        self._loc = Locator(text)

    def line(self, path: Path) -> int:
        return self._loc.line(path)

    def error(self, path: Path, message: str) -> None:
        self.issues.append(ConfigIssue(self.file, self.line(path), format_path(path), message))

    def source(self, path: Path) -> Source:
        return Source(self.file, self.line(path))


class Table:
    """Typed access to one TOML table; unknown keys are reported on creation."""

    def __init__(self, ctx: FileCtx, path: Path, data: dict[str, Any],
                 known: Collection[str]) -> None:
        self.ctx = ctx
        self.path = path
        self.data = data
        self.bad: set[str] = set()  # keys whose value was refused
        for key in data:
            if key not in known:
                self.bad.add(key)
                ctx.error((*path, key), f"unknown key{suggest(key, known)}")

    def has(self, key: str) -> bool:
        return key in self.data

    def error(self, key: str | Path, message: str) -> None:
        sub = (key,) if isinstance(key, str) else key
        if sub and isinstance(sub[0], str):
            self.bad.add(sub[0])
        self.ctx.error(self.path + sub, message)

    def _typed(self, key: str, kind: type) -> Any:
        v = self.data[key]
        if type(v) is not kind:
            self.error(key, f"expected {_TYPE_NAMES[kind]}, got {type_name(v)}")
            return None
        return v

    def _convert(self, key: Path, v: Any, conv: Callable[[str], T]) -> T | None:
        if type(v) is not str:
            self.error(key, f"expected a string, got {type_name(v)}")
            return None
        if has_control(v):
            self.error(key, f"{v!r} contains a control character (newline, NUL, ...); refused")
            return None
        try:
            return conv(v)
        except ValueError as e:
            self.error(key, str(e))
            return None

    def text(self, key: str, conv: Callable[[str], T], default: D) -> T | D:
        if key not in self.data:
            return default
        got = self._convert((key,), self.data[key], conv)
        return default if got is None else got

    def texts(self, key: str, conv: Callable[[str], T]) -> tuple[T, ...]:
        if key not in self.data:
            return ()
        items = self._typed(key, list)
        out: list[T] = []
        for i, v in enumerate(items or ()):
            got = self._convert((key, i), v, conv)
            if got is not None:
                out.append(got)
        return tuple(out)

    def flag(self, key: str, default: bool) -> bool:
        if key not in self.data:
            return default
        v = self._typed(key, bool)
        return default if v is None else bool(v)

    def number(self, key: str, default: int, lo: int, hi: int, hint: str = "") -> int:
        if key not in self.data:
            return default
        v = self._typed(key, int)
        if v is None:
            return default
        if not lo <= v <= hi:
            self.error(key, f"{v} is outside {lo}..{hi}{hint}")
            return default
        return int(v)

    def table(self, key: str) -> dict[str, Any] | None:
        if key not in self.data:
            return None
        v = self._typed(key, dict)
        return v if isinstance(v, dict) else None

    def tables(self, key: str) -> list[tuple[int, dict[str, Any]]]:
        """An array of tables, as (index, table) pairs of the well-formed entries."""
        if key not in self.data:
            return []
        items = self._typed(key, list) or []
        out = []
        for i, v in enumerate(items):
            if isinstance(v, dict):
                out.append((i, v))
            else:
                self.error((key, i), f"expected a table, got {type_name(v)}")
        return out
