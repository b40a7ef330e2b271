"""libvirt domain XML -> what kvmnetd needs of a guest: its name, UUID and network interfaces. Pure.

A guest names the kvmnetd network its NICs belong to in the domain's metadata:

    <metadata>
      <kvmnet:network xmlns:kvmnet="https://kvmnetd.org/xmlns/1">NAME</kvmnet:network>
    </metadata>

(`virsh metadata DOM --uri https://kvmnetd.org/xmlns/1 --key kvmnet --set
'<network>NAME</network>'` writes exactly that.) It applies to every NIC of the domain.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

KVMNET_XMLNS = "https://kvmnetd.org/xmlns/1"
MAX_XML = 4 << 20  # a live domain XML is a few KiB; anything huge is not libvirt's

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
# Entities are only declared inside a DOCTYPE; refusing both keeps entity expansion out entirely.
_DECLARATION = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)


@dataclass(frozen=True)
class DomainNic:
    tap: str             # <target dev=.../>; "" when the XML has none (inactive domain, user type)
    mac: str             # lower case
    kind: str            # the interface type: "ethernet", "bridge", "network", ...
    bridge: str | None   # <source bridge=.../> (type bridge; type network in live XML too)
    network: str | None  # the kvmnetd network named in the domain's metadata
    # <source network=.../>: a NIC on a libvirt network. A running domain's XML shows such a
    # NIC as type 'bridge' when the network is a bridge-mode one (libvirt's "actual" type).
    source_network: str | None = None


@dataclass(frozen=True)
class DomainEvent:
    name: str
    uuid: str
    started: bool        # True: running; False: stopped, destroyed or crashed
    nics: tuple[DomainNic, ...]


@dataclass(frozen=True)
class ParsedDomain:
    name: str
    uuid: str
    live: bool           # libvirt gives a running domain's XML an id attribute, and only then
    nics: tuple[DomainNic, ...]


def parse_root(xml: str, kind: str, limit: int = MAX_XML) -> ET.Element:
    """libvirt XML whose root element is <kind>, parsed without DTDs or entities.

    ValueError names what is wrong. The one parser for domain and network XML alike:
    XML from libvirt or a user's file is checked the same way everywhere.
    """
    if len(xml) > limit:
        raise ValueError(f"{kind} XML too large ({len(xml)} characters, limit {limit})")
    if _DECLARATION.search(xml):
        raise ValueError(f"{kind} XML refused: it contains a DOCTYPE or ENTITY declaration")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ValueError(f"{kind} XML is not well-formed: {exc}") from None
    if root.tag != kind:
        local = root.tag.rpartition("}")[2]
        raise ValueError(f"not a libvirt {kind}: root element is <{local}>, expected <{kind}>")
    return root


def parse_domain(xml: str) -> ParsedDomain:
    """Parse a domain XML; ValueError with a message naming the problem if it is not one."""
    root = parse_root(xml, "domain")
    name = (root.findtext("name") or "").strip()
    if not name:
        raise ValueError("domain XML has no <name>")
    uuid = (root.findtext("uuid") or "").strip().lower()
    network = _metadata_network(root)
    nics = tuple(_nic(i, iface, network)
                 for i, iface in enumerate(root.findall("devices/interface")))
    return ParsedDomain(name, uuid, root.get("id") is not None, nics)


def parse_domain_xml(xml: str) -> tuple[str, str, tuple[DomainNic, ...]]:
    """(name, uuid, nics) of a domain XML; uuid is "" if the XML has none."""
    dom = parse_domain(xml)
    return dom.name, dom.uuid, dom.nics


def _metadata_network(root: ET.Element) -> str | None:
    el = root.find(f"metadata/{{{KVMNET_XMLNS}}}network")
    if el is None:
        return None
    return (el.text or "").strip() or None


def _nic(index: int, iface: ET.Element, network: str | None) -> DomainNic:
    where = f"interface #{index}"
    kind = iface.get("type")
    if not kind:
        raise ValueError(f"{where} has no type attribute")
    mac_el = iface.find("mac")
    mac = (mac_el.get("address") if mac_el is not None else None) or ""
    mac = mac.strip().lower()
    if not _MAC.match(mac):
        raise ValueError(f"{where} ({kind}): missing or malformed MAC address {mac!r}")
    target = iface.find("target")
    tap = (target.get("dev") if target is not None else None) or ""
    source = iface.find("source")
    bridge = (source.get("bridge") if source is not None else None) or None
    source_network = (source.get("network") if source is not None else None) or None
    return DomainNic(tap=tap, mac=mac, kind=kind, bridge=bridge, network=network,
                     source_network=source_network)
