"""libvirt domains' NICs: which network each belongs to, and following their lifecycle."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING

import structlog

from .adapters.domxml import DomainNic
from .attach import AttachPolicy
from .errors import KvmnetError
from .model import Network
from .observed import Link
from .status import ROOT

if TYPE_CHECKING:
    from .core import Core

log = structlog.get_logger("kvmnetd.domains")


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


async def domain_changed(core: Core, name: str, uuid: str, started: bool,
                         nics: Iterable[DomainNic]) -> None:
    """A domain started or stopped: attach or detach its taps, as root, by policy."""
    for nic in nics:
        if not nic.tap:
            continue
        desired = core.build_desired()
        net = network_for_nic(nic, name, uuid, desired.policy, desired.networks,
                              desired.active)
        if net is None:
            continue
        try:
            if started:
                await core.attach_port(ROOT, nic.tap, net)
                log.info("domain.port_attached", domain=name, ifname=nic.tap, network=net)
            elif nic.tap in {p.ifname for p in core.list_ports()}:
                await core.detach_port(ROOT, nic.tap)
                log.info("domain.port_detached", domain=name, ifname=nic.tap, network=net)
        except KvmnetError as e:
            log.warning("domain.port_failed", domain=name, ifname=nic.tap, network=net,
                        error=str(e))
