"""kvmnetd's own `bridge` table for anti-spoofing: apply, update, observe, remove, and
read its per-port drop counters (through nft_run)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess

from kvmnetd.adapters.files import atomic_write
from kvmnetd.adapters.nft_run import NFT, NftablesError, run_nft
from kvmnetd.model.desired import is_nft_name
from kvmnetd.model.guard import GuardElement
from kvmnetd.plan.nft_bridge import render_update

TAMPERED = "tampered"
_COMMENT_RE = re.compile(r'^\s*comment "kvmnetd ([0-9a-f]+)"\s*$', re.MULTILINE)
# Reading the counters is a read for `port stats` and the metrics file: short.
COUNTERS_TIMEOUT = 5.0


class PortGuardAdapter:
    """Like the inet table's adapter: the listing after our last write is kept (`nft -s`,
    without counter values, which change by themselves) and a listing that differs is
    "tampered". While it is as written, the elements are the ones last applied."""

    def __init__(self, table: str = "kvmnetd", nft: str = NFT,
                 state_path: str | None = None) -> None:
        if not is_nft_name(table):
            raise ValueError(f"invalid nftables table name: {table!r}")
        self.table = table
        self.nft = nft
        self.writes = 0
        self._listing: str | None = None
        self._elements: frozenset[GuardElement] = frozenset()
        # The listing and elements after our last write, also kept in `state_path` (under
        # /run): a restart over a table as we left it writes nothing, and its drop
        # counters keep counting.
        self.state_path = state_path
        if state_path is not None:
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                with open(state_path) as f:
                    data = json.load(f)
                self._listing = str(data["listing"])
                self._elements = frozenset((str(a), str(b)) for a, b in data["elements"])

    def _save(self) -> None:
        if self.state_path is None:
            return
        if self._listing is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.state_path)
            return
        atomic_write(self.state_path, json.dumps(
            {"listing": self._listing, "elements": sorted(self._elements)}), 0o600,
            make_dir=True)

    async def _list(self) -> str | None:
        rc, out, err = await run_nft("-s", "list", "table", "bridge", self.table, nft=self.nft)
        if rc == 0:
            return out
        if "No such file or directory" in err:
            return None
        raise NftablesError(f"nft list table bridge {self.table} failed: {err.strip()}")

    async def observe(self) -> tuple[str | None, frozenset[GuardElement]]:
        """(fingerprint, elements) if the table is as we left it; ("tampered", ...) if
        changed or not ours to vouch for; (None, empty) if absent."""
        listing = await self._list()
        if listing is None:
            return None, frozenset()
        m = _COMMENT_RE.search(listing)
        if m is None or listing != self._listing:
            # Also without a record of our last write: the elements cannot be vouched
            # for, so it is rewritten once (its drop counters start again from zero).
            return TAMPERED, frozenset()
        return m.group(1), self._elements

    async def _run_script(self, script: str, what: str) -> None:
        rc, _, err = await run_nft("-f", "-", stdin=script, nft=self.nft)
        if rc != 0:
            raise NftablesError(f"nft rejected {what} for table bridge {self.table}:\n"
                                f"{err.strip()}")
        self.writes += 1

    async def apply(self, ruleset: str, elements: frozenset[GuardElement]) -> None:
        """The whole table with its elements, in one transaction."""
        await self._run_script(ruleset, "the anti-spoofing table")
        self._elements = elements
        self._listing = await self._list()
        self._save()

    async def update(self, add: frozenset[GuardElement],
                     delete: frozenset[GuardElement]) -> frozenset[GuardElement]:
        """Element changes in one transaction; returns the elements now in the table."""
        script = render_update(add, delete & self._elements, self.table)
        if script:
            await self._run_script(script, "an anti-spoofing update")
        self._elements = (self._elements - delete) | add
        self._listing = await self._list()
        self._save()
        return self._elements

    async def remove(self) -> None:
        self._listing, self._elements = None, frozenset()
        self._save()
        if await self._list() is None:
            return
        await self._run_script(f"add table bridge {self.table}\n"
                               f"delete table bridge {self.table}\n", "the removal")


def read_spoof_drops(table: str = "kvmnetd", nft: str = NFT) -> dict[str, int]:
    """Dropped frames per guarded port ({} when the table is not there)."""
    if not is_nft_name(table):
        return {}
    try:
        proc = subprocess.run([nft, "-j", "list", "set", "bridge", table, "drops"],
                              capture_output=True, text=True, timeout=COUNTERS_TIMEOUT,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if proc.returncode != 0:
        return {}
    out: dict[str, int] = {}
    with contextlib.suppress(ValueError, KeyError, TypeError):
        for item in json.loads(proc.stdout)["nftables"]:
            for elem in item.get("set", {}).get("elem", ()):
                e = elem["elem"]
                out[str(e["val"])] = int(e["counter"]["packets"])
    return out
