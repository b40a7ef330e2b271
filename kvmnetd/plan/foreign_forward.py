"""Which foreign chains on the forward hook drop guests' traffic? Pure.

The one analysis for both its users: coexistence (which chains get kvmnetd's tagged
accepts) and the doctor (which networks are cut off, and the fix to print). It reads the
JSON of `nft -j list ruleset`; foreign_input.py does the same for the input hook.

A base chain drops "what nothing before accepted" when its policy is drop or when any
of its rules drops or rejects unconditionally (only counter/log beside the verdict): the
rules after such a rule are never reached, so it need not be the last one.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvmnetd.plan.coexist import TAG, USER_CHAIN, ChainRef, ForeignForward, InstalledRule, rule_text

_FAMILIES = {"ip": frozenset({4}), "ip6": frozenset({6}), "inet": frozenset({4, 6})}
_HARMLESS = {"counter", "log"}  # expressions that neither match nor decide

Ruleset = Mapping[str, Any]


@dataclass(frozen=True)
class ForwardDrop:
    """A base chain on the forward hook that drops whatever nothing before it accepted."""

    family: str
    table: str
    chain: str
    how: str  # "policy drop", "rule handle 4 drops everything"
    has_docker_user: bool = False  # the chain jumps to DOCKER-USER (Docker's place for us)

    @property
    def ref(self) -> ChainRef:
        return ChainRef(self.family, self.table, self.chain)

    @property
    def families(self) -> frozenset[int]:
        return _FAMILIES[self.family]

    @property
    def iptables(self) -> bool:  # iptables-nft's own table: fix it with iptables
        return self.table == "filter" and self.chain == "FORWARD" and self.family != "inet"

    @property
    def iptables_chain(self) -> str:
        return USER_CHAIN if self.has_docker_user else "FORWARD"

    def ours(self, table: str) -> bool:
        return self.family == "inet" and self.table == table


def _objects(ruleset: Ruleset, kind: str) -> list[Mapping[str, Any]]:
    items = ruleset.get("nftables", []) if isinstance(ruleset, Mapping) else []
    return [o[kind] for o in items if isinstance(o, Mapping) and isinstance(o.get(kind), Mapping)]


def _ref(o: Mapping[str, Any], name_key: str) -> ChainRef:
    return ChainRef(str(o.get("family")), str(o.get("table")), str(o.get(name_key)))


def _rules_by_chain(ruleset: Ruleset) -> dict[ChainRef, list[Mapping[str, Any]]]:
    out: dict[ChainRef, list[Mapping[str, Any]]] = {}
    for r in _objects(ruleset, "rule"):
        out.setdefault(_ref(r, "chain"), []).append(r)
    return out


def _exprs(rule: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    expr = rule.get("expr", [])
    return [e for e in expr if isinstance(e, Mapping)] if isinstance(expr, list) else []


def _drops_everything(rule: Mapping[str, Any]) -> bool:
    keys = [k for e in _exprs(rule) for k in e]
    return bool(keys) and keys[-1] in ("drop", "reject") and set(keys[:-1]) <= _HARMLESS


def _jumps_to(rule: Mapping[str, Any], chain: str) -> bool:
    return any(isinstance(e.get("jump"), Mapping) and e["jump"].get("target") == chain
               for e in _exprs(rule))


def _feeds_user_chain(ref: ChainRef, chains: set[ChainRef],
                      rules: dict[ChainRef, list[Mapping[str, Any]]]) -> bool:
    """The chain jumps to a DOCKER-USER beside it: Docker leaves that one to admins (and us)."""
    return (ChainRef(ref.family, ref.table, USER_CHAIN) in chains
            and any(_jumps_to(r, USER_CHAIN) for r in rules.get(ref, [])))


def has_table(ruleset: Ruleset, table: str) -> bool:
    return any(t.get("family") == "inet" and t.get("name") == table
               for t in _objects(ruleset, "table"))


def forward_drops(ruleset: Ruleset) -> list[ForwardDrop]:
    """Every base chain on the forward hook that drops (kvmnetd's own table included)."""
    rules = _rules_by_chain(ruleset)
    chains = {_ref(c, "name") for c in _objects(ruleset, "chain")}
    out: list[ForwardDrop] = []
    for c in _objects(ruleset, "chain"):
        ref = _ref(c, "name")
        if c.get("hook") != "forward" or ref.family not in _FAMILIES or not c.get("table") \
                or not c.get("name") or c.get("type", "filter") != "filter":
            continue
        mine = rules.get(ref, [])
        if c.get("policy") == "drop":
            how = "policy drop"
        elif (rule := next((r for r in mine if _drops_everything(r)), None)) is not None:
            how = f"rule handle {rule.get('handle')} drops everything"
        else:
            continue
        out.append(ForwardDrop(ref.family, ref.table, ref.chain, how,
                               _feeds_user_chain(ref, chains, rules)))
    return sorted(out, key=lambda d: d.ref)


def parse_ruleset(ruleset: Ruleset, own_table: str = "kvmnetd") -> ForeignForward:
    """`nft -j list ruleset` -> what coexistence needs to know about the forward hook."""
    drops = [d for d in forward_drops(ruleset) if not d.ours(own_table)]
    rules = _rules_by_chain(ruleset)
    chains = {_ref(c, "name") for c in _objects(ruleset, "chain")}
    users = frozenset(ChainRef(fam, "filter", USER_CHAIN) for fam in ("ip", "ip6")
                      if _feeds_user_chain(ChainRef(fam, "filter", "FORWARD"), chains, rules))
    ours = []
    for ref, rs in sorted(rules.items()):
        for r in rs:
            comment = r.get("comment")
            if isinstance(comment, str) and comment.startswith(TAG):
                ours.append(InstalledRule(ref, int(r["handle"]), rule_text(r.get("expr", []),
                                                                           comment)))
    return ForeignForward(tuple(d.ref for d in drops), users, tuple(ours))


def _iface_matches(rule: Mapping[str, Any]) -> list[tuple[str, Any]]:
    out = []
    for e in _exprs(rule):
        m = e.get("match")
        left = m.get("left") if isinstance(m, Mapping) else None
        key = left.get("meta", {}).get("key") if isinstance(left, Mapping) else None
        if isinstance(m, Mapping) and key in ("iifname", "oifname"):
            out.append((str(m.get("op", "==")), m.get("right")))
    return out


def _names(right: Any, bridge: str) -> bool:
    values = right.get("set", []) if isinstance(right, Mapping) else right
    values = values if isinstance(values, list) else [values]
    return any(isinstance(v, str) and fnmatch.fnmatchcase(bridge, v.replace("\\", ""))
               for v in values)


def bridge_allowed(ruleset: Ruleset, drop: ForwardDrop, bridge: str) -> bool:
    """Does the dropping chain (or a chain it jumps to) let `bridge`'s traffic through first?

    Counted: kvmnetd's coexistence rules (comment "kvmnetd:...") for this bridge or for all
    interfaces, and any accept that matches the bridge by name. Order is not checked.
    """
    rules = _rules_by_chain(ruleset)
    seen, todo = set(), [drop.chain]
    while todo:
        chain = todo.pop()
        if chain in seen:
            continue
        seen.add(chain)
        for rule in rules.get(ChainRef(drop.family, drop.table, chain), []):
            exprs = _exprs(rule)
            for e in exprs:
                for verdict in ("jump", "goto"):
                    if isinstance(e.get(verdict), Mapping):
                        todo.append(str(e[verdict].get("target")))
            ifaces = _iface_matches(rule)
            named = any(op == "==" and _names(right, bridge) for op, right in ifaces)
            if str(rule.get("comment", "")).startswith(TAG) and (named or not ifaces):
                return True
            if named and any("accept" in e for e in exprs):
                return True
    return False
