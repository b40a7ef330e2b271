"""kvmnetd's own `inet` table: apply, observe and remove it (through nft_run)."""

from __future__ import annotations

import contextlib
import os
import re

from kvmnetd.adapters.files import atomic_write
from kvmnetd.adapters.nft_run import NFT, NftablesError, run_nft
from kvmnetd.model.desired import is_nft_name
from kvmnetd.plan.nft import overlay_table

__all__ = ["TAMPERED", "NftablesAdapter", "NftablesError"]

_COMMENT_RE = re.compile(r'^\s*comment "kvmnetd ([0-9a-f]+)"\s*$', re.MULTILINE)
TAMPERED = "tampered"


class NftablesAdapter:
    """Writes whole-table transactions; tells apart absent, ours-as-applied and tampered.

    After every apply the exact `nft list table` output is kept, in memory and in
    `state_path` (under /run), so tampering while the daemon was stopped is seen
    too. observe() lists the table again and compares. Without any baseline the
    fingerprint in the table's comment is trusted, so a restart over a correct
    system writes nothing.
    """

    def __init__(self, table: str = "kvmnetd", nft: str = NFT,
                 state_path: str | None = None) -> None:
        if not is_nft_name(table):
            raise ValueError(f"invalid nftables table name: {table!r}")
        self.table = table
        self.nft = nft
        self.writes = 0
        # Our last write, as nft lists it afterwards (None: we removed the table).
        self._listing: str | None = None
        self._known = False  # False until the first write: nothing to compare against
        self.state_path = state_path
        if state_path is not None:
            with contextlib.suppress(OSError):
                with open(state_path) as f:
                    self._listing, self._known = f.read(), True

    async def _run(self, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
        return await run_nft(*args, stdin=stdin, nft=self.nft)

    async def _list(self) -> str | None:
        """Our table as nft prints it, or None when it does not exist."""
        rc, out, err = await self._run("list", "table", "inet", self.table)
        if rc == 0:
            return out
        if "No such file or directory" in err:
            return None
        raise NftablesError(f"nft list table inet {self.table} failed: {err.strip()}")

    async def observe(self) -> str | None:
        """Fingerprint if our table is as applied, "tampered" if changed, None if absent."""
        listing = await self._list()
        if listing is None:
            return None
        m = _COMMENT_RE.search(listing)
        if m is None:
            return TAMPERED
        if self._known and listing != self._listing:
            return TAMPERED
        return m.group(1)

    async def apply(self, ruleset: str) -> None:
        """Load a rendered ruleset as one transaction (all or nothing)."""
        rc, _, err = await self._run("-f", "-", stdin=ruleset)
        if rc != 0:
            raise NftablesError(f"nft rejected the ruleset for table {self.table}:\n{err.strip()}")
        self.writes += 1
        self._listing = await self._list()
        self._known = True
        self._save()

    def _save(self) -> None:
        if self.state_path is None:
            return
        if self._listing is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.state_path)
            return
        atomic_write(self.state_path, self._listing, 0o600)

    async def remove(self) -> None:
        """Delete our table if it is there; other tables are never touched."""
        self._listing, self._known = None, True
        self._save()
        if await self._list() is None:
            return
        # add+delete: no error if someone removed it in between.
        ov = overlay_table(self.table)
        script = (f"add table inet {self.table}\ndelete table inet {self.table}\n"
                  f"add table bridge {ov}\ndelete table bridge {ov}\n")
        rc, _, err = await self._run("-f", "-", stdin=script)
        if rc != 0:
            raise NftablesError(f"nft could not delete table inet {self.table}: {err.strip()}")
        self.writes += 1
