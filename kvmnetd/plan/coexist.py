"""Pure: which accepts kvmnetd must place in a foreign firewall's forward path, and where.

Every base chain on a hook must accept a packet for it to pass: an accept in our
own table does not outvote Docker's `FORWARD` policy DROP, ufw's, or a foreign
nftables table's drop. So, for each kvmnetd bridge, narrowly scoped accepts go
where that firewall expects user rules:

- `ip`/`ip6 filter DOCKER-USER` when Docker's FORWARD jumps to it;
- else `ip`/`ip6 filter FORWARD` itself when it drops (policy or a final drop);
- a foreign pure-nftables forward chain that drops is only reported, unless the
  operator allows inserting there (mode "all"): its owner may rewrite it any time.

The rules are only a hole in the foreign drop; our own table still polices the
traffic (both must accept). That is why, inside iptables-nft chains, the NAT
reply rule carries no `ct state` match: iptables-nft cannot parse a native ct
expression and would declare the whole chain incompatible, which breaks Docker's
own iptables calls. Our table keeps the `established,related` restriction.

Each rule carries the comment "kvmnetd:NETWORK"; only such rules are ever removed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kvmnetd.model.desired import Mode, Network
from kvmnetd.plan.nft import quote

TAG = "kvmnetd:"
MODES = ("auto", "off", "all")
USER_CHAIN = "DOCKER-USER"


@dataclass(frozen=True, order=True)
class ChainRef:
    family: str  # ip | ip6 | inet
    table: str
    chain: str

    def __str__(self) -> str:
        return f"{self.family} {self.table} {self.chain}"

    @property
    def iptables(self) -> bool:
        """Managed by iptables-nft: only xt-compatible expressions may go in."""
        return self.table == "filter" and self.family in ("ip", "ip6")


@dataclass(frozen=True)
class InstalledRule:
    chain: ChainRef
    handle: int
    text: str  # as rule_text() renders it, comment included; "" if not understood


@dataclass(frozen=True)
class ForeignForward:
    """What the foreign firewalls look like on the forward hook (observed)."""

    # Base chains on the forward hook, outside our table, that drop what they do not accept.
    drops: tuple[ChainRef, ...] = ()
    # DOCKER-USER chains that their family's FORWARD jumps to.
    user_chains: frozenset[ChainRef] = frozenset()
    # Rules tagged "kvmnetd:", wherever they are.
    ours: tuple[InstalledRule, ...] = ()


@dataclass(frozen=True)
class CoexistRule:
    chain: ChainRef
    network: str
    text: str  # nft rule statement, comment included


@dataclass(frozen=True)
class CoexistPlan:
    rules: tuple[CoexistRule, ...] = ()
    # Foreign drops we leave alone, said in words (for status/doctor).
    reports: tuple[str, ...] = ()


@dataclass(frozen=True)
class CoexistChanges:
    insert: tuple[CoexistRule, ...] = ()
    delete: tuple[InstalledRule, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.insert or self.delete)


@dataclass
class _Target:
    chain: ChainRef
    families: tuple[str, ...] = field(default=())  # ip, ip6


def _targets(observed: ForeignForward, mode: str) -> tuple[list[_Target], list[str]]:
    targets: list[_Target] = []
    reports: list[str] = []
    for fam in ("ip", "ip6"):
        user = ChainRef(fam, "filter", USER_CHAIN)
        forward = ChainRef(fam, "filter", "FORWARD")
        if user in observed.user_chains:
            targets.append(_Target(user, (fam,)))
        elif forward in observed.drops:
            targets.append(_Target(forward, (fam,)))
    for ref in observed.drops:
        if ref.iptables:
            continue
        if mode == "all":
            fams = ("ip", "ip6") if ref.family == "inet" else (ref.family,)
            if ref.family in ("ip", "ip6", "inet"):
                targets.append(_Target(ref, fams))
                continue
        reports.append(
            f"table {ref.family} {ref.table} chain {ref.chain} drops forwarded traffic; "
            "kvmnetd does not insert into foreign nftables tables: accept kvmnetd's bridges "
            'there (or set [daemon] coexist = "all")')
    return targets, reports


def _prefixes(net: Network, fam: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    addr = net.ipv4 if fam == "ip" else net.ipv6
    return [addr.network] if addr is not None else []


def _rules_for(net: Network, target: _Target) -> list[str]:
    br = quote(net.bridge)
    tag = f"comment {quote(TAG + net.name)}"
    # Guest to guest on one bridge (br_netfilter); bridged networks need only this.
    rules = [f"iifname {br} oifname {br} accept {tag}"]
    if net.mode not in (Mode.NAT, Mode.ROUTED):
        return rules
    out = f" oifname {quote(net.uplink)}" if net.uplink else ""
    for fam in target.families:
        for prefix in _prefixes(net, fam):
            rules.append(f"iifname {br}{out} {fam} saddr {prefix} accept {tag}")
            replies_only = net.mode is Mode.NAT and fam == "ip" and not target.chain.iptables
            ct = " ct state established,related" if replies_only else ""
            rules.append(f"oifname {br} {fam} daddr {prefix}{ct} accept {tag}")
            if replies_only and net.port_forwards:
                # New connections our port forwards DNAT into the network.
                rules.append(f"oifname {br} {fam} daddr {prefix} ct status dnat accept {tag}")
    return rules


def coexist_rules(networks: Iterable[Network], observed: ForeignForward,
                  mode: str = "auto") -> CoexistPlan:
    """The accepts wanted now, in chain order (top first), and the drops left to the operator."""
    if mode not in MODES:
        raise ValueError(f"coexist mode must be one of {', '.join(MODES)}: {mode!r}")
    targets, reports = _targets(observed, mode)
    if mode == "off":
        targets = []
        reports = [*(f"{ref} drops forwarded traffic; coexist is off" for ref in observed.drops)]
    rules: list[CoexistRule] = []
    nets = sorted(networks, key=lambda n: n.name)
    for target in targets:
        for net in nets:
            rules += [CoexistRule(target.chain, net.name, t) for t in _rules_for(net, target)]
    return CoexistPlan(tuple(rules), tuple(reports))


def changes(wanted: Iterable[CoexistRule], installed: Iterable[InstalledRule]) -> CoexistChanges:
    """Insert what is missing, delete ours that are unwanted or duplicated; keep the rest."""
    pending = list(wanted)
    keep: set[tuple[ChainRef, str]] = set()
    delete: list[InstalledRule] = []
    want_keys = {(r.chain, r.text) for r in pending}
    for rule in sorted(installed, key=lambda r: (r.chain, r.handle)):
        key = (rule.chain, rule.text)
        if key in want_keys and key not in keep:
            keep.add(key)
        else:
            delete.append(rule)
    insert = [r for r in pending if (r.chain, r.text) not in keep]
    return CoexistChanges(tuple(insert), tuple(delete))


# --- nft JSON -> rule text, for the expressions we write ------------------------------------


def _value(right: Any) -> str | None:
    if isinstance(right, str):
        return right
    if isinstance(right, int):
        return str(right)
    if isinstance(right, Mapping) and "prefix" in right:
        p = right["prefix"]
        return f"{p['addr']}/{p['len']}"
    if isinstance(right, Mapping) and "set" in right:
        right = right["set"]
    if isinstance(right, list) and all(isinstance(v, str) for v in right):
        return ",".join(right)
    return None


def _match(m: Mapping[str, Any]) -> str | None:
    if m.get("op", "==") not in ("==", "in"):
        return None
    left, right = m.get("left"), _value(m.get("right"))
    if right is None or not isinstance(left, Mapping):
        return None
    if "meta" in left and left["meta"].get("key") in ("iifname", "oifname"):
        return f"{left['meta']['key']} {quote(right)}"
    if "payload" in left:
        pl = left["payload"]
        if pl.get("protocol") in ("ip", "ip6") and pl.get("field") in ("saddr", "daddr"):
            addr = right if "/" in right else str(ipaddress.ip_network(right))
            return f"{pl['protocol']} {pl['field']} {addr}"
    if "ct" in left and left["ct"].get("key") == "state":
        states = sorted(right.split(","), key=lambda s: ("established", "related").index(s)
                        if s in ("established", "related") else 9)
        return f"ct state {','.join(states)}"
    return None


def rule_text(expr: list[Any], comment: str | None) -> str:
    """Our rule as _rules_for writes it; "" if it has anything we never write."""
    parts: list[str] = []
    for e in expr:
        if not isinstance(e, Mapping) or len(e) != 1:
            return ""
        (kind, body), = e.items()
        if kind == "match" and isinstance(body, Mapping):
            text = _match(body)
            if text is None:
                return ""
            parts.append(text)
        elif kind == "counter":
            continue  # counters do not change the meaning
        elif kind == "accept":
            parts.append("accept")
        else:
            return ""
    if comment is not None:
        parts.append(f"comment {quote(comment)}")
    return " ".join(parts)
