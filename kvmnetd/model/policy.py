"""The attach policy: which network an [[attach]] rule gives a guest's tap. One object per
config load serves the planner, the loop, the port API and libvirt domains alike."""

from __future__ import annotations

import fnmatch
from collections.abc import Collection
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from kvmnetd.model.observed import Link


class AttachRule(Protocol):
    """What the policy reads of an [[attach]] rule (model.AttachRule; the model holds the
    policy, so this module does not import it)."""

    @property
    def network(self) -> str: ...
    @property
    def ifname(self) -> str | None: ...
    @property
    def mac(self) -> str | None: ...
    @property
    def domain(self) -> str | None: ...

PORT_KINDS = ("tun", "veth")  # what may join a network: taps and veth ends
_MEMO_MOST = 65536  # tap names churn: the memo stays bounded


class AttachPolicy:
    """The rules in file order; the first whose network is active wins, an inactive one
    is passed over. A rule naming a domain applies only to that domain's NICs."""

    def __init__(self, rules: tuple[AttachRule, ...] = ()) -> None:
        self.rules = rules
        # (tap name, MAC) -> networks whose rules match it: taps are asked about on every
        # pass, and a glob match costs more than a dict look-up.
        self._memo: dict[tuple[str, str], tuple[str, ...]] = {}

    def __bool__(self) -> bool:
        return bool(self.rules)

    def network_for(self, link: Link, active: Collection[str]) -> str | None:
        """Where policy puts a tap netlink reports (no domain known)."""
        if not self.rules:
            return None
        key = (link.name, link.mac)
        nets = self._memo.get(key)
        if nets is None:
            if len(self._memo) >= _MEMO_MOST:
                self._memo.clear()
            nets = self._memo[key] = tuple(
                r.network for r in self.rules
                if r.domain is None and rule_matches(r.ifname, r.mac, link))
        for net in nets:
            if net in active:
                return net
        return None

    def network_for_domain(self, link: Link, domain: str, uuid: str,
                           active: Collection[str]) -> str | None:
        """Where policy puts a libvirt domain's NIC: rules naming the domain (and matching
        the NIC if they say more) first, then the rules for any tap."""
        for r in self.rules:
            if r.domain is None or r.domain not in (domain, uuid) or r.network not in active:
                continue
            if (r.ifname or r.mac) and not rule_matches(r.ifname, r.mac, link):
                continue
            return r.network
        return self.network_for(link, active)

    def eligible(self, link: Link, ours: Collection[str], master: str | None) -> bool:
        """A tap policy may place: a tap or veth, on no bridge or on one of ours."""
        return link.kind in PORT_KINDS and (master is None or master in ours)


def rule_matches(ifname_glob: str | None, mac_glob: str | None, link: Link) -> bool:
    if ifname_glob is None and mac_glob is None:
        return False
    if ifname_glob is not None and not fnmatch.fnmatchcase(link.name, ifname_glob):
        return False
    if mac_glob is not None:
        pattern = mac_glob.lower()
        if not any(c in pattern for c in "*?["):
            pattern += "*"  # a bare prefix
        if not fnmatch.fnmatchcase(link.mac.lower(), pattern):
            return False
    return True
