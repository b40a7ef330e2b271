"""libvirt domains' NICs: which network each belongs to, and following their lifecycle."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING

import structlog

from kvmnetd.model.desired import Network
from kvmnetd.model.domxml import DomainNic
from kvmnetd.model.errors import KvmnetError
from kvmnetd.model.observed import Link
from kvmnetd.model.policy import AttachPolicy
from kvmnetd.model.records import ROOT

if TYPE_CHECKING:
    from kvmnetd.app.core import Core

log = structlog.get_logger("kvmnetd.app.domains")


def network_for_nic(nic: DomainNic, domain: str, uuid: str, policy: AttachPolicy,
                    networks: Mapping[str, Network], active: Collection[str]) -> str | None:
    """The domain's <kvmnet:network> metadata, then the attach policy (rules naming the
    domain first), then the bridge libvirt put it on if it is ours."""
    if nic.network:
        return nic.network
    link = Link(index=0, name=nic.tap, kind="tun", mac=nic.mac)
    return (policy.network_for_domain(link, domain, uuid, active)
            or _bridge_network(nic.bridge, networks))


def _bridge_network(bridge: str | None, networks: Mapping[str, Network]) -> str | None:
    """The network whose bridge libvirt already put the NIC on."""
    if bridge:
        for net in networks.values():
            if net.bridge == bridge:
                return net.name
    return None


def libvirt_plugged(nic: DomainNic, networks: Mapping[str, Network]) -> str | None:
    """For <interface type='network'>: the kvmnetd network whose bridge libvirt plugged the
    tap into (live XML names it in <source bridge=...>), or None if that bridge is not ours."""
    if not nic.source_network or not nic.bridge:
        return None
    for net in networks.values():
        if net.bridge == nic.bridge:
            return net.name
    return None


async def domain_changed(core: Core, name: str, uuid: str, started: bool,
                         nics: Iterable[DomainNic]) -> None:
    """A domain started or stopped: attach or detach its taps, as root, by policy.

    Taps of type='network' NICs are libvirt's: plugged and removed by libvirt, only listed here.
    """
    for nic in nics:
        if not nic.tap:
            continue
        if nic.source_network:
            await _libvirt_nic(core, name, started, nic)
            continue
        desired = core.build_desired()
        net = network_for_nic(nic, name, uuid, desired.policy, desired.networks,
                              desired.active)
        if net is None:
            continue
        try:
            if started:
                core.port_domains[nic.tap] = name
                # The domain's XML names the guest's MAC: anti-spoofing needs no lease for it.
                core.identities.learn(nic.tap, nic.mac, core.rec.netlink.observed, replace=True)
                await core.attach_port(ROOT, nic.tap, net)
                log.info("domain.port_attached", domain=name, ifname=nic.tap, network=net)
            elif nic.tap in {p.ifname for p in core.list_ports()}:
                core.port_domains.pop(nic.tap, None)
                await core.detach_port(ROOT, nic.tap)
                log.info("domain.port_detached", domain=name, ifname=nic.tap, network=net)
        except KvmnetError as e:
            log.warning("domain.port_failed", domain=name, ifname=nic.tap, network=net,
                        error=str(e))


async def _libvirt_nic(core: Core, domain: str, started: bool, nic: DomainNic) -> None:
    net = libvirt_plugged(nic, core.networks())
    try:
        if started and net is not None:
            core.identities.learn(nic.tap, nic.mac, core.rec.netlink.observed, replace=True)
            await core.adopt_libvirt_port(nic.tap, net, domain)
            log.info("domain.port_adopted", domain=domain, ifname=nic.tap, network=net)
        elif not started and (nic.tap in core.libvirt_managed
                              or nic.tap in core.rec.desired.ports):
            # Also a tap attached by adopt-libvirt before libvirt's events named it ours.
            await core.forget_libvirt_port(nic.tap)
            log.info("domain.port_released", domain=domain, ifname=nic.tap, network=net)
    except KvmnetError as e:
        log.warning("domain.port_failed", domain=domain, ifname=nic.tap, network=net,
                    error=str(e))
