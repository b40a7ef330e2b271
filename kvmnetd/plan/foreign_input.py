"""Do other firewalls drop what guests send to the host's DHCP, DNS and TFTP? Pure.

Reads the JSON of `nft -j list ruleset` (iptables-nft, ufw, firewalld and plain nft all
end up there) and follows each base chain on the input hook outside kvmnetd's table with
one made-up packet: udp to the service's port, new, arriving on the bridge. Every base
chain decides on its own: an accept in our table does not override another table's drop.

A match this module cannot judge (an address, a rate limit, an xt match iptables-nft did
not translate) may or may not hold, so the rule's verdict is only possible. A chain is
reported only when every path through it ends in a drop or reject: a finding is never a
guess.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kvmnetd.model.desired import Network

_FAMILIES = {"ip": frozenset({4}), "ip6": frozenset({6}), "inet": frozenset({4, 6})}
# xt matches iptables-nft leaves untranslated. conntrack/state rules in an input chain
# accept established,related or drop invalid: neither is a guest's new request.
_XT_NEVER = {"conntrack", "state"}
_XT_ALWAYS = {"comment"}
_MAX_DEPTH = 16

ACCEPT, DROP, CONTINUE = "accept", "drop", "continue"


@dataclass(frozen=True)
class Service:
    name: str  # what a person calls it: DHCP, DNS, TFTP
    port: int  # udp
    families: frozenset[int]
    firewalld: str  # firewalld's service name

    @property
    def label(self) -> str:
        return f"{self.name} (udp/{self.port})"


DHCP = Service("DHCP", 67, frozenset({4}), "dhcp")
DNS = Service("DNS", 53, frozenset({4, 6}), "dns")
TFTP = Service("TFTP", 69, frozenset({4}), "tftp")


def services_of(net: Network) -> list[Service]:
    """What the network's config makes the host serve to its guests."""
    fams = frozenset(f for f, a in ((4, net.ipv4), (6, net.ipv6)) if a is not None)
    out = []
    if net.dhcp is not None and net.ipv4 is not None:
        out.append(DHCP)
    if net.dns.enabled and net.needs_dnsmasq:
        out.append(Service(DNS.name, DNS.port, DNS.families & fams, DNS.firewalld))
    if net.dhcp is not None and net.dhcp.tftp_root and net.ipv4 is not None:
        out.append(TFTP)
    return [s for s in out if s.families]


@dataclass(frozen=True)
class InputBlock:
    """A foreign base chain on the input hook that drops a service's packets from a bridge."""

    family: str
    table: str
    chain: str
    how: str  # "policy drop", "rule handle 7 in chain X rejects it"
    services: tuple[Service, ...]
    ufw: bool = False  # ufw's chains are in the table: fix it with ufw

    @property
    def where(self) -> str:
        return f"table {self.family} {self.table} chain {self.chain}"

    @property
    def iptables(self) -> bool:
        return self.family in ("ip", "ip6") and self.table == "filter"


class _Ruleset:
    def __init__(self, doc: Mapping[str, Any]) -> None:
        self.chains: dict[tuple[str, str, str], Mapping[str, Any]] = {}
        self.rules: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
        items = doc.get("nftables", []) if isinstance(doc, Mapping) else []
        for item in items if isinstance(items, list) else []:
            if not isinstance(item, Mapping):
                continue
            if isinstance(c := item.get("chain"), Mapping):
                self.chains[(str(c.get("family")), str(c.get("table")), str(c.get("name")))] = c
            elif isinstance(r := item.get("rule"), Mapping):
                key = (str(r.get("family")), str(r.get("table")), str(r.get("chain")))
                self.rules.setdefault(key, []).append(r)


@dataclass(frozen=True)
class _Packet:
    bridge: str
    port: int
    family: int


def _values(right: Any) -> list[Any]:
    if isinstance(right, Mapping) and "set" in right:
        right = right["set"]
    return right if isinstance(right, list) else [right]


def _has(right: Any, test: Any) -> bool:
    return any(test(v) for v in _values(right))


def _port_in(right: Any, port: int) -> bool:
    def one(v: Any) -> bool:
        if isinstance(v, Mapping) and isinstance(v.get("range"), list) and len(v["range"]) == 2:
            lo, hi = v["range"]
            return isinstance(lo, int) and isinstance(hi, int) and lo <= port <= hi
        return bool(v == port)
    return _has(right, one)


def _name_in(right: Any, name: str) -> bool:
    return _has(right, lambda v: isinstance(v, str)
                and fnmatch.fnmatchcase(name, v.replace("\\", "")))


def _is_udp(v: Any) -> bool:
    return v in ("udp", 17)


def _match(expr: Mapping[str, Any], pkt: _Packet) -> bool | None:
    """Does one match expression hold for the packet? None: cannot tell."""
    op, left, right = expr.get("op", "=="), expr.get("left"), expr.get("right")
    if not isinstance(left, Mapping) or op not in ("==", "!=", "in"):
        return None
    result: bool | None = None
    if isinstance(meta := left.get("meta"), Mapping):
        key = meta.get("key")
        if key in ("iifname", "iif"):
            result = _name_in(right, pkt.bridge)
        elif key == "l4proto":
            result = _has(right, _is_udp)
        elif key == "nfproto":
            result = _has(right, lambda v: v == ("ipv4" if pkt.family == 4 else "ipv6"))
        elif key == "protocol":
            result = _has(right, lambda v: v == ("ip" if pkt.family == 4 else "ip6"))
        elif key in ("oifname", "oif"):
            result = False  # nothing has an output device on the input hook
    elif isinstance(payload := left.get("payload"), Mapping):
        proto, field = payload.get("protocol"), payload.get("field")
        if proto in ("udp", "th") and field == "dport":
            result = _port_in(right, pkt.port)
        elif proto in ("tcp", "sctp", "dccp", "icmp", "icmpv6", "udplite"):
            result = False  # the header of another protocol: the packet is udp
        elif (proto, field) == ("ip", "protocol") or (proto, field) == ("ip6", "nexthdr"):
            result = _has(right, _is_udp)
    elif isinstance(ct := left.get("ct"), Mapping) and ct.get("key") == "state":
        result = _has(right, lambda v: v == "new")
    if result is None:
        return None
    return not result if op == "!=" else result


def _rule_matches(exprs: list[Mapping[str, Any]], pkt: _Packet) -> bool | None:
    """All matches together: False if one fails, None if any is unknown, else True."""
    verdict: bool | None = True
    for e in exprs:
        if isinstance(m := e.get("match"), Mapping):
            one = _match(m, pkt)
        elif isinstance(xt := e.get("xt"), Mapping) and xt.get("type") == "match":
            name = xt.get("name")
            one = False if name in _XT_NEVER else True if name in _XT_ALWAYS else None
        elif "limit" in e or "quota" in e or "fib" in e:
            one = None
        else:
            continue  # statements (counter, log, meta set, ...) and the verdict itself
        if one is False:
            return False
        if one is None:
            verdict = None
    return verdict


_VERDICTS = ("accept", "drop", "reject", "jump", "goto", "return", "queue", "vmap")


def _verdict(exprs: list[Mapping[str, Any]]) -> tuple[str, str | None] | None:
    for e in exprs:
        for key in _VERDICTS:
            if key in e:
                target = e[key].get("target") if isinstance(e[key], Mapping) else None
                return key, str(target) if target is not None else None
        if isinstance(xt := e.get("xt"), Mapping) and xt.get("type") == "target":
            return "queue", None  # an xt target: whatever it does, it may let it through
    return None


class _Walk:
    def __init__(self, rs: _Ruleset, family: str, table: str, pkt: _Packet) -> None:
        self.rs, self.family, self.table, self.pkt = rs, family, table, pkt
        self.why: str | None = None  # the first drop met on a path that surely takes it

    def chain(self, name: str, depth: int = 0) -> set[str]:
        """The outcomes a packet may have in this chain: accept, drop, continue."""
        if depth > _MAX_DEPTH:
            return {ACCEPT}  # a loop or a maze: do not claim a drop
        out: set[str] = set()
        for rule in self.rs.rules.get((self.family, self.table, name), []):
            exprs = [e for e in rule.get("expr", []) if isinstance(e, Mapping)]
            sure = _rule_matches(exprs, self.pkt)
            verdict = _verdict(exprs)
            if sure is False or verdict is None:
                continue
            kind, target = verdict
            if kind in ("jump", "goto") and target is not None:
                inner = self.chain(target, depth + 1)
                # A goto that falls through returns to our caller: it ends this chain.
                ends = inner - {CONTINUE} if kind == "jump" else inner
                out |= ends
                if sure and (kind == "goto" or CONTINUE not in inner):
                    return out
                continue
            if kind in ("drop", "reject"):
                if sure and self.why is None:
                    self.why = (f"rule handle {rule.get('handle')} in chain {name} "
                                f"{'drops' if kind == 'drop' else 'rejects'} it")
                result = {DROP}
            elif kind == "return":
                result = {CONTINUE}
            elif kind == "vmap":
                result = {ACCEPT, DROP, CONTINUE}  # by value: any of them
            else:  # accept, queue, an xt target
                result = {ACCEPT}
            out |= result
            if sure:
                return out
        return out | {CONTINUE}


def input_blocks(doc: Mapping[str, Any], bridge: str, services: Iterable[Service],
                 own_table: str = "kvmnetd") -> list[InputBlock]:
    """Foreign input base chains that surely drop some of `services` arriving on `bridge`."""
    rs = _Ruleset(doc)
    services = list(services)
    out = []
    for (family, table, name), c in sorted(rs.chains.items()):
        if (c.get("hook") != "input" or c.get("type", "filter") != "filter"
                or family not in _FAMILIES or (family == "inet" and table == own_table)):
            continue
        dropped: list[Service] = []
        how = ""
        for svc in services:
            for fam in sorted(svc.families & _FAMILIES[family]):
                walk = _Walk(rs, family, table, _Packet(bridge, svc.port, fam))
                ends = walk.chain(name)
                policy_drop = c.get("policy") == "drop"
                if CONTINUE in ends:
                    ends = (ends - {CONTINUE}) | ({DROP} if policy_drop else {ACCEPT})
                if ends == {DROP}:
                    dropped.append(svc)
                    how = how or walk.why or "policy drop"
                    break
        if dropped:
            ufw = any(k[:2] == (family, table) and k[2].startswith("ufw-") for k in rs.chains)
            out.append(InputBlock(family, table, name, how, tuple(dropped), ufw))
    return out


def accept_fix(block: InputBlock, bridge: str, zone: str | None = None) -> str:
    """What lets the services through: the tool that owns the chain, or a plain nft rule."""
    svcs = block.services
    if block.table == "firewalld":
        where = f"--zone={zone}" if zone else "--zone=ZONE"
        adds = " ".join(f"--add-service={s.firewalld}" for s in svcs)
        return (f"firewall-cmd --zone=kvmnetd --add-interface={bridge} (the zone kvmnetd "
                "ships in contrib/firewalld/kvmnetd.xml; add --permanent to keep it), or "
                f"firewall-cmd {where} {adds}")
    if block.ufw:
        return "; ".join(f"ufw allow in on {bridge} to any port {s.port} proto udp"
                         for s in svcs)
    if block.iptables:
        tool = "iptables" if block.family == "ip" else "ip6tables"
        return "; ".join(f"{tool} -I {block.chain} -i {bridge} -p udp --dport {s.port} "
                         "-j ACCEPT" for s in svcs)
    ports = ", ".join(str(s.port) for s in svcs)
    ports = f"{{ {ports} }}" if len(svcs) > 1 else ports
    return (f'nft insert rule {block.family} {block.table} {block.chain} iifname "{bridge}" '
            f"udp dport {ports} accept")
