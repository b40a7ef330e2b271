"""Reads foreign firewalls on the forward hook; inserts and removes only kvmnetd's tagged accepts.

One `nft -j list ruleset` per observation; one `nft -f -` transaction per change.
A rule is ours only if its comment starts with "kvmnetd:"; nothing else is ever
deleted or moved. nft runs in the caller's network namespace.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..render.coexist import (
    TAG,
    USER_CHAIN,
    ChainRef,
    CoexistChanges,
    CoexistRule,
    ForeignForward,
    InstalledRule,
    changes,
    rule_text,
)
from .nft_run import NFT, NftablesError, nft_json, run_nft

_FAMILIES = ("ip", "ip6", "inet")


class CoexistError(NftablesError):
    """nft refused to list or change a foreign chain."""


def parse_ruleset(doc: Mapping[str, Any], own_table: str = "kvmnetd") -> ForeignForward:
    """`nft -j list ruleset` -> what kvmnetd needs to know about the forward hook."""
    chains: dict[ChainRef, Mapping[str, Any]] = {}
    rules: dict[ChainRef, list[Mapping[str, Any]]] = {}
    for item in doc.get("nftables", []):
        if "chain" in item:
            c = item["chain"]
            chains[ChainRef(c["family"], c["table"], c["name"])] = c
        elif "rule" in item:
            r = item["rule"]
            rules.setdefault(ChainRef(r["family"], r["table"], r["chain"]), []).append(r)
    drops: list[ChainRef] = []
    for ref, c in sorted(chains.items()):
        if ref.family not in _FAMILIES or (ref.family == "inet" and ref.table == own_table):
            continue
        if c.get("hook") == "forward" and c.get("type", "filter") == "filter" and (
                c.get("policy") == "drop" or _ends_in_drop(rules.get(ref, []))):
            drops.append(ref)
    users = set()
    for fam in ("ip", "ip6"):
        forward = ChainRef(fam, "filter", "FORWARD")
        user = ChainRef(fam, "filter", USER_CHAIN)
        if user in chains and any(_jumps_to(r, USER_CHAIN) for r in rules.get(forward, [])):
            users.add(user)
    ours = []
    for ref, rs in sorted(rules.items()):
        for r in rs:
            comment = r.get("comment")
            if isinstance(comment, str) and comment.startswith(TAG):
                ours.append(InstalledRule(ref, int(r["handle"]),
                                          rule_text(r.get("expr", []), comment)))
    return ForeignForward(tuple(drops), frozenset(users), tuple(ours))


def _ends_in_drop(rules: list[Mapping[str, Any]]) -> bool:
    """A last rule that drops or rejects everything (firewalld's and ufw's style)."""
    if not rules:
        return False
    verdicts = [e for e in rules[-1].get("expr", []) if not ("counter" in e or "log" in e)]
    return len(verdicts) == 1 and ("drop" in verdicts[0] or "reject" in verdicts[0])


def _jumps_to(rule: Mapping[str, Any], chain: str) -> bool:
    return any(isinstance(e, Mapping) and e.get("jump", {}).get("target") == chain
               for e in rule.get("expr", []))


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
