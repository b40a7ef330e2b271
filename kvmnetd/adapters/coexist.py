"""Reads foreign firewalls on the forward hook; inserts and removes only kvmnetd's tagged accepts.

One `nft -j list ruleset` per observation; one `nft -f -` transaction per change.
A rule is ours only if its comment starts with "kvmnetd:"; nothing else is ever
deleted or moved. nft runs in the caller's network namespace.
"""

from __future__ import annotations

from collections.abc import Iterable

from kvmnetd.adapters.nft_run import NFT, NftablesError, nft_json, run_nft
from kvmnetd.plan.coexist import CoexistChanges, CoexistRule, ForeignForward, changes
from kvmnetd.plan.foreign_forward import parse_ruleset


class CoexistError(NftablesError):
    """nft refused to list or change a foreign chain."""


def transaction(change: CoexistChanges) -> str:
    """Deletes first (by handle), then inserts at the top, last first so the order is kept."""
    lines = [f"delete rule {r.chain} handle {r.handle}" for r in change.delete]
    lines += [f"insert rule {r.chain} {r.text}" for r in reversed(change.insert)]
    return "".join(f"{line}\n" for line in lines)


class ForeignForwardAdapter:
    def __init__(self, own_table: str = "kvmnetd", nft: str = NFT) -> None:
        self.own_table = own_table
        self.nft = nft
        self.writes = 0
        self.last: ForeignForward | None = None

    async def _run(self, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
        return await run_nft(*args, stdin=stdin, nft=self.nft, error=CoexistError)

    async def observe(self) -> ForeignForward:
        doc = await nft_json("list", "ruleset", nft=self.nft, error=CoexistError)
        self.last = parse_ruleset(doc, self.own_table)
        return self.last

    async def apply(self, desired: Iterable[CoexistRule]) -> CoexistChanges:
        """Make our tagged rules exactly `desired`; no nft call when they already are."""
        observed = self.last if self.last is not None else await self.observe()
        change = changes(desired, observed.ours)
        if change:
            await self._commit(change)
        return change

    async def _commit(self, change: CoexistChanges) -> None:
        self.last = None  # handles changed: the next apply re-reads them
        rc, _, err = await self._run("-f", "-", stdin=transaction(change))
        if rc != 0:
            raise CoexistError(f"nft refused kvmnetd's accepts in a foreign chain:\n{err.strip()}")
        self.writes += 1
