"""kvmnetd's own `bridge` table for anti-spoofing: apply, update, observe, remove, and
read its per-port drop counters (through nft_run)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections import Counter
from typing import Any

from kvmnetd.adapters.files import atomic_write
from kvmnetd.adapters.nft_run import NFT, NftablesError, run_nft
from kvmnetd.model.desired import is_nft_name
from kvmnetd.model.guard import GuardElement
from kvmnetd.plan.nft_bridge import render_update

TAMPERED = "tampered"
# Reading the counters is a read for `port stats` and the metrics file: short.
COUNTERS_TIMEOUT = 5.0

Shape = str  # the table as nft lists it in JSON, without elements, handles or counters


def _shape(listing: Any) -> tuple[Shape, Counter[str]]:
    """(shape, elements per set) of `nft -j` output (which leaves out the table's comment
    here, so the fingerprint of our last write is kept beside the shape)."""
    items: list[Any] = []
    counts: Counter[str] = Counter()
    for item in listing.get("nftables", ()):
        if "metainfo" in item:
            continue
        kind, body = next(iter(item.items()))
        body = {k: v for k, v in body.items() if k not in ("handle", "elem")}
        if kind == "set":
            counts[str(body["name"])] = len(item["set"].get("elem", ()))
        items.append({kind: body})
    return json.dumps(items, sort_keys=True), counts


class PortGuardAdapter:
    """Tells apart absent, as-we-left-it and tampered, like the inet table's adapter, but
    without reading the whole table after each element update (at 1,000 ports a listing
    costs ~150 ms, an update ~6 ms): the table's shape (sets, chains, rules: what never
    changes) is compared with the shape after our last whole write, and each set's number
    of elements with ours. An element added, removed or flushed by hand changes a count."""

    def __init__(self, table: str = "kvmnetd", nft: str = NFT,
                 state_path: str | None = None) -> None:
        if not is_nft_name(table):
            raise ValueError(f"invalid nftables table name: {table!r}")
        self.table = table
        self.nft = nft
        self.writes = 0
        self._shape: Shape | None = None
        self._fingerprint: str | None = None
        self._elements: frozenset[GuardElement] = frozenset()
        # Also kept in `state_path` (under /run): a restart over a table as we left it
        # writes nothing, and its drop counters keep counting.
        self.state_path = state_path
        if state_path is not None:
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                with open(state_path) as f:
                    data = json.load(f)
                self._shape = str(data["shape"])
                self._fingerprint = str(data["fingerprint"])
                self._elements = frozenset((str(a), str(b)) for a, b in data["elements"])

    def _save(self) -> None:
        if self.state_path is None:
            return
        if self._shape is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.state_path)
            return
        atomic_write(self.state_path, json.dumps(
            {"shape": self._shape, "fingerprint": self._fingerprint,
             "elements": sorted(self._elements)}), 0o600, make_dir=True)

    async def _list(self) -> Any | None:
        rc, out, err = await run_nft("-j", "list", "table", "bridge", self.table, nft=self.nft)
        if rc == 0:
            try:
                return json.loads(out)
            except ValueError as e:
                raise NftablesError(f"nft printed JSON we cannot read: {e}") from e
        if "No such file or directory" in err:
            return None
        raise NftablesError(f"nft list table bridge {self.table} failed: {err.strip()}")

    async def observe(self) -> tuple[str | None, frozenset[GuardElement]]:
        """(fingerprint, elements) if the table is as we left it; ("tampered", empty) if
        changed or not ours to vouch for; (None, empty) if absent."""
        listing = await self._list()
        if listing is None:
            return None, frozenset()
        shape, counts = _shape(listing)
        ours = Counter(name for name, _ in self._elements)
        fp = self._fingerprint
        if fp is None or shape != self._shape or +counts != +ours:
            # Also without a record of our last write: the elements cannot be vouched
            # for, so it is written whole once (its drop counters start again from zero).
            return TAMPERED, frozenset()
        return fp, self._elements

    async def _run_script(self, script: str, what: str) -> None:
        rc, _, err = await run_nft("-f", "-", stdin=script, nft=self.nft)
        if rc != 0:
            raise NftablesError(f"nft rejected {what} for table bridge {self.table}:\n"
                                f"{err.strip()}")
        self.writes += 1

    async def apply(self, ruleset: str, fingerprint: str,
                    elements: frozenset[GuardElement]) -> None:
        """The whole table with its elements, in one transaction."""
        await self._run_script(ruleset, "the anti-spoofing table")
        self._elements, self._fingerprint = elements, fingerprint
        listing = await self._list()
        self._shape = _shape(listing)[0] if listing is not None else None
        self._save()

    async def update(self, add: frozenset[GuardElement],
                     delete: frozenset[GuardElement]) -> frozenset[GuardElement]:
        """Element changes in one transaction; returns the elements now in the table."""
        script = render_update(add - self._elements, delete & self._elements, self.table)
        if script:
            await self._run_script(script, "an anti-spoofing update")
        self._elements = (self._elements - delete) | add
        self._save()
        return self._elements

    async def remove(self) -> None:
        self._shape, self._fingerprint, self._elements = None, None, frozenset()
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
