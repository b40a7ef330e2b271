"""parse_domain_xml on live, inactive and hostile domain XML."""

from __future__ import annotations

import pytest

from kvmnetd.model.domxml import KVMNET_XMLNS, DomainNic, parse_domain, parse_domain_xml

UUID = "86a78bb7-f561-45b2-b18e-a345cdd61f4e"


def domain(devices: str, *, live: bool = True, metadata: str = "", name: str = "g1") -> str:
    dom_id = " id='3'" if live else ""
    return f"""<?xml version='1.0' encoding='UTF-8'?>
<domain type='qemu'{dom_id}>
  <name>{name}</name>
  <uuid>{UUID.upper()}</uuid>
  {metadata}
  <memory unit='KiB'>65536</memory>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {devices}
    <memballoon model='none'/>
  </devices>
</domain>"""


ETHERNET = """<interface type='ethernet'>
  <mac address='52:54:00:AA:00:01'/>
  <target dev='kvt0' managed='no'/>
  <model type='virtio'/>
  <alias name='net0'/>
</interface>"""

BRIDGE = """<interface type='bridge'>
  <mac address='52:54:00:aa:00:02'/>
  <source bridge='br-lab'/>
  <target dev='vnet3'/>
  <model type='virtio'/>
</interface>"""

NETWORK = """<interface type='network'>
  <mac address='52:54:00:aa:00:03'/>
  <source network='default' portid='0b1f' bridge='virbr0'/>
  <target dev='vnet4'/>
</interface>"""

OUR_METADATA = (f"<metadata><kvmnet:network xmlns:kvmnet='{KVMNET_XMLNS}'> lab "
                "</kvmnet:network></metadata>")


def test_ethernet_with_target_dev() -> None:
    name, uuid, nics = parse_domain_xml(domain(ETHERNET))
    assert (name, uuid) == ("g1", UUID)
    assert nics == (DomainNic(tap="kvt0", mac="52:54:00:aa:00:01", kind="ethernet",
                              bridge=None, network=None),)


def test_bridge_type_reports_its_source_bridge() -> None:
    (nic,) = parse_domain_xml(domain(BRIDGE))[2]
    assert (nic.kind, nic.bridge, nic.tap, nic.mac) == ("bridge", "br-lab", "vnet3",
                                                        "52:54:00:aa:00:02")


def test_our_metadata_names_the_network_of_every_nic() -> None:
    _, _, nics = parse_domain_xml(domain(ETHERNET + BRIDGE, metadata=OUR_METADATA))
    assert [n.network for n in nics] == ["lab", "lab"]


def test_foreign_or_empty_metadata_is_ignored() -> None:
    other = ("<metadata><x:network xmlns:x='https://example.org/other'>lab</x:network>"
             "<kvmnet:network xmlns:kvmnet='" + KVMNET_XMLNS + "'>  </kvmnet:network></metadata>")
    assert parse_domain_xml(domain(ETHERNET, metadata=other))[2][0].network is None
    # Same local name, no namespace: not ours either.
    plain = "<metadata><network>lab</network></metadata>"
    assert parse_domain_xml(domain(ETHERNET, metadata=plain))[2][0].network is None


def test_inactive_xml_has_no_target_and_is_not_live() -> None:
    inactive = """<interface type='bridge'>
      <mac address='52:54:00:aa:00:02'/><source bridge='br-lab'/><model type='virtio'/>
    </interface>"""
    dom = parse_domain(domain(inactive, live=False))
    assert not dom.live
    assert dom.nics[0].tap == "" and dom.nics[0].bridge == "br-lab"
    assert parse_domain(domain(inactive)).live


def test_multiple_nics_in_document_order() -> None:
    _, _, nics = parse_domain_xml(domain(ETHERNET + BRIDGE + NETWORK))
    assert [(n.kind, n.tap) for n in nics] == [("ethernet", "kvt0"), ("bridge", "vnet3"),
                                               ("network", "vnet4")]
    assert nics[2].bridge == "virbr0"  # live XML of a libvirt network names its bridge too


def test_no_interfaces() -> None:
    assert parse_domain_xml(domain("")) == ("g1", UUID, ())


def test_missing_uuid_is_empty() -> None:
    xml = "<domain type='qemu'><name>x</name><devices/></domain>"
    assert parse_domain_xml(xml) == ("x", "", ())


@pytest.mark.parametrize("xml, message", [
    ("", "not well-formed"),
    ("<domain><name>g1</name>", "not well-formed"),
    ("<network><name>default</name></network>", "expected <domain>"),
    ("<domain type='qemu'><uuid>" + UUID + "</uuid></domain>", "no <name>"),
    (domain("<interface><mac address='52:54:00:aa:00:01'/></interface>"), "no type"),
    (domain("<interface type='ethernet'><target dev='t0'/></interface>"), "MAC"),
    (domain("<interface type='ethernet'><mac address='52:54:00:zz:00:01'/></interface>"),
     "malformed MAC"),
])
def test_bad_xml_is_a_clear_value_error(xml: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_domain_xml(xml)


@pytest.mark.parametrize("xml", [
    # Billion laughs: entities expanding into entities.
    """<?xml version="1.0"?>
<!DOCTYPE domain [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>
<domain><name>&b;</name></domain>""",
    # External entity: a local file pulled into the name.
    """<!DOCTYPE domain [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<domain><name>&x;</name></domain>""",
    # A DOCTYPE alone, in odd spelling.
    """<!doctype   domain SYSTEM "http://example.org/d.dtd"><domain><name>g</name></domain>""",
])
def test_doctype_and_entities_refused(xml: str) -> None:
    with pytest.raises(ValueError, match="DOCTYPE or ENTITY"):
        parse_domain_xml(xml)


def test_undeclared_entity_is_not_well_formed() -> None:
    with pytest.raises(ValueError, match="not well-formed"):
        parse_domain_xml("<domain><name>&x;</name></domain>")


def test_huge_input_refused() -> None:
    with pytest.raises(ValueError, match="too large"):
        parse_domain_xml(domain("<!--" + "x" * (5 << 20) + "-->"))


def test_libvirt_network_nics_name_their_network() -> None:
    # A bridge-mode libvirt network's NIC shows as type bridge in a running domain's XML.
    live = NETWORK.replace("type='network'", "type='bridge'")
    _, _, nics = parse_domain_xml(domain(NETWORK + live + BRIDGE))
    assert [n.source_network for n in nics] == ["default", "default", None]
