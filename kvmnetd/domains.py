"""Which network a libvirt domain's NIC belongs to. Pure: no libvirt here."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .adapters.domxml import DomainNic
from .model import AttachRule, Network
from .observed import Link
from .plan import rule_matches


def network_for_nic(nic: DomainNic, domain: str, uuid: str, rules: Iterable[AttachRule],
                    networks: Mapping[str, Network]) -> str | None:
    """The domain's <kvmnet:network> metadata, then an [[attach]] rule naming the domain
    (and matching the NIC if it says more), then the bridge libvirt put it on if it is ours."""
    if nic.network:
        return nic.network
    link = Link(index=0, name=nic.tap, kind="tun", mac=nic.mac)
    for rule in rules:
        if rule.domain is None or rule.domain not in (domain, uuid):
            continue
        if (rule.ifname or rule.mac) and not rule_matches(rule.ifname, rule.mac, link):
            continue
        return rule.network
    if nic.bridge:
        for net in networks.values():
            if net.bridge == nic.bridge:
                return net.name
    return None
