"""libvirt network XML -> kvmnetd network config. Pure.

Every element and attribute is either mapped, known to carry no setting (uuid, title, ...), or
refused by name: nothing is dropped silently. A refusal is an ImportRefused whose message names
the element, e.g. `<ip family='ipv4' address='10.24.10.1'>: a second IPv4 subnet is not
supported`.
"""

from __future__ import annotations

import ipaddress
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

import tomli_w

from kvmnetd.model.domxml import KVMNET_XMLNS, parse_root

DNSMASQ_XMLNS = "http://libvirt.org/schemas/network/dnsmasq/1.0"
MAX_XML = 1 << 20
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_UNITS = {"seconds": 1, "minutes": 60, "hours": 3600}
MIN_LEASE = 120  # kvmnetd's floor, in seconds


class ImportRefused(ValueError):
    pass


@dataclass
class Imported:
    name: str
    network: dict[str, Any]
    notes: list[str] = field(default_factory=list)  # what carries no setting and was left out

    def toml(self) -> str:
        """The config, led by what was left out as comments."""
        head = "".join(f"# not kept: {n}\n" for n in self.notes)
        return head + tomli_w.dumps({"network": {self.name: self.network}})


def check(imp: Imported) -> None:
    """What kvmnetd's own loader says about the result (addresses in range and so on)."""
    from kvmnetd.config import load as cfg
    from kvmnetd.model.desired import Settings
    from kvmnetd.model.errors import ConfigError

    empty = cfg.Config(settings=Settings(), networks={}, rules=(), files=())
    try:
        cfg.parse_network_text(imp.toml(), "(import)", empty)
    except ConfigError as exc:
        raise ImportRefused("; ".join(str(i) for i in exc.issues)) from None


def describe(el: ET.Element) -> str:
    """`<tag a='1' b='2'>` with the element's first two attributes, as messages show it."""
    tag = _local(el.tag)
    if el.tag.startswith(f"{{{DNSMASQ_XMLNS}}}"):
        tag = f"dnsmasq:{tag}"
    attrs = "".join(f" {_local(k)}='{v}'" for k, v in list(el.attrib.items())[:2])
    return f"<{tag}{attrs}>"


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _refuse(el: ET.Element, why: str) -> ImportRefused:
    return ImportRefused(f"{describe(el)}: {why}")


def _attrs(el: ET.Element, allowed: tuple[str, ...]) -> dict[str, str]:
    for key in el.attrib:
        if key not in allowed:
            raise _refuse(el, f"attribute {_local(key)!r} is not supported")
    return dict(el.attrib)


def _no_children(el: ET.Element) -> None:
    for child in el:
        raise _refuse(child, f"unexpected inside {describe(el)}")


def _yes(el: ET.Element, key: str, default: bool) -> bool:
    v = el.get(key)
    if v is None:
        return default
    if v not in ("yes", "no", "on", "off"):
        raise _refuse(el, f"{key}={v!r} is not yes or no")
    return v in ("yes", "on")


def parse_network(xml: str) -> Imported:
    """The kvmnetd form of one libvirt network definition; ImportRefused if it cannot be."""
    try:
        root = parse_root(xml, "network", MAX_XML)
    except ValueError as exc:
        raise ImportRefused(str(exc)) from None
    return _Reader(root).read()


class _Reader:
    def __init__(self, root: ET.Element) -> None:
        self.root = root
        self.net: dict[str, Any] = {}
        self.dhcp: dict[str, Any] | None = None
        self.leases: dict[int | str, ET.Element] = {}  # lease time -> where it was set
        self.notes: list[str] = []
        self.name = ""

    def read(self) -> Imported:
        root = self.root
        for key, value in root.attrib.items():
            if key == "connections":
                continue  # live XML: how many guests are plugged in now
            if key == "ipv6" and value == "no":
                continue
            raise _refuse(root, f"attribute {_local(key)!r} is not supported"
                          + (" (guest-to-guest IPv6 without an address)" if key == "ipv6" else ""))
        handlers = {
            "name": self._name, "uuid": self._ignored, "title": self._ignored,
            "description": self._ignored, "metadata": self._metadata,
            "forward": self._forward, "bridge": self._bridge, "mtu": self._mtu,
            "mac": self._mac, "domain": self._domain, "dns": self._dns, "ip": self._ip,
            "port": self._port,
        }
        seen: set[str] = set()
        forward_seen = False
        for el in root:
            tag = el.tag
            if tag.startswith(f"{{{DNSMASQ_XMLNS}}}"):
                raise _refuse(el, "dnsmasq options are not supported")
            handler = handlers.get(tag)
            if handler is None:
                raise _refuse(el, _UNSUPPORTED.get(tag, "not supported"))
            if tag != "ip" and tag in seen:
                raise _refuse(el, "given twice")
            seen.add(tag)
            forward_seen = forward_seen or tag == "forward"
            handler(el)
        if not self.name:
            raise ImportRefused("<network>: no <name>")
        if not forward_seen:
            self.net["mode"] = "isolated"
        if "ipv4" not in self.net and "ipv6" not in self.net:
            raise _refuse(root, "a network without an IP address is not supported "
                          "(kvmnetd's nat, routed and isolated networks need ipv4 or ipv6)")
        if len(self.leases) > 1:
            first, second = list(self.leases.values())[:2]
            raise _refuse(second, f"a lease time other than that of {describe(first)} is not "
                          "supported (kvmnetd has one lease time per network, and per host)")
        if self.dhcp is not None:
            if self.leases:
                self.dhcp["lease_time"] = _duration(next(iter(self.leases)))
            self.net["dhcp"] = self.dhcp
        return Imported(self.name, self._ordered(), self.notes)

    def _ordered(self) -> dict[str, Any]:
        # mode first, tables last: the TOML reads like docs/config.md
        order = ["mode", "bridge", "ipv4", "ipv6", "uplink", "stp", "forward_delay", "mtu"]
        net = {k: self.net[k] for k in order if k in self.net}
        net.update({k: v for k, v in self.net.items() if k not in net})
        return net

    # -- top level ---------------------------------------------------------------------------

    def _name(self, el: ET.Element) -> None:
        _attrs(el, ())
        name = (el.text or "").strip()
        if not _NAME.match(name):
            raise _refuse(el, f"the name {name!r} is not a kvmnetd network name "
                          "(1 to 32 of A-Z a-z 0-9 _ -); rename it first")
        self.name = name

    def _ignored(self, el: ET.Element) -> None:
        if el.tag != "uuid":
            self.notes.append(f"{describe(el)} carries no setting; not kept")

    def _metadata(self, el: ET.Element) -> None:
        for child in el:
            if child.tag == f"{{{KVMNET_XMLNS}}}network":
                raise _refuse(child, "this libvirt network is kvmnetd's own already")
        self.notes.append("<metadata> of other applications is not kept")

    def _forward(self, el: ET.Element) -> None:
        a = _attrs(el, ("mode", "dev"))
        mode = a.get("mode", "nat")
        if mode == "none":
            self.net["mode"] = "isolated"
        elif mode in ("nat", "route"):
            self.net["mode"] = "nat" if mode == "nat" else "routed"
        else:
            raise _refuse(el, f"forward mode {mode!r} is not supported "
                          "(only nat, route and none)")
        if "dev" in a:
            self.net["uplink"] = a["dev"]
        for child in el:
            if child.tag == "nat" and mode == "nat":
                self._nat(child)
            elif child.tag == "interface":
                # libvirt lists forward.dev as an interface too in live XML: the same device.
                ca = _attrs(child, ("dev",))
                _no_children(child)
                if ca.get("dev") != a.get("dev"):
                    raise _refuse(child, "a pool of forward interfaces is not supported")
            else:
                raise _refuse(child, f"not supported inside {describe(el)}")

    def _nat(self, el: ET.Element) -> None:
        a = _attrs(el, ("ipv6",))
        if a.get("ipv6") == "yes":
            raise _refuse(el, "NAT of IPv6 is not supported")
        for child in el:
            if child.tag == "port":
                ca = _attrs(child, ("start", "end"))
                _no_children(child)
                if (ca.get("start"), ca.get("end")) != ("1024", "65535"):
                    raise _refuse(child, "a NAT port range is not supported")
                # libvirt writes its default range into every NAT network it dumps.
                self.notes.append(f"{describe(child)}: libvirt's default NAT port range; "
                                  "kvmnetd masquerades without one (low source ports may stay)")
                continue
            if child.tag == "address":
                raise _refuse(child, "a NAT address range is not supported")
            raise _refuse(child, f"not supported inside {describe(el)}")

    def _port(self, el: ET.Element) -> None:
        # <port isolated='yes'/>: libvirt's bridge port isolation of every guest's port.
        _attrs(el, ("isolated",))
        _no_children(el)
        self.net["isolate_ports"] = _yes(el, "isolated", False)

    def _bridge(self, el: ET.Element) -> None:
        a = _attrs(el, ("name", "stp", "delay", "macTableManager", "zone"))
        _no_children(el)
        if a.get("macTableManager", "kernel") != "kernel":
            raise _refuse(el, "macTableManager='libvirt' is not supported")
        if "zone" in a:
            raise _refuse(el, "a firewalld zone is not supported (kvmnetd uses its own zone)")
        if "name" in a:
            self.net["bridge"] = a["name"]
        stp = _yes(el, "stp", True)  # libvirt's default is on
        self.net["stp"] = stp
        delay = _int(el, "delay", a.get("delay", "0"))
        # With STP the kernel's floor is 2 s, libvirt's delay='0' included: kvmnetd's default.
        if delay and not (stp and delay < 2):
            self.net["forward_delay"] = delay

    def _mtu(self, el: ET.Element) -> None:
        a = _attrs(el, ("size",))
        _no_children(el)
        self.net["mtu"] = _int(el, "size", a.get("size", ""))

    def _mac(self, el: ET.Element) -> None:
        # libvirt writes one into every network it defines; kvmnetd's bridge takes the kernel's.
        _attrs(el, ("address",))
        _no_children(el)
        self.notes.append(f"{describe(el)}: the bridge's MAC address is not kept "
                          "(kvmnetd lets the kernel choose it)")

    def _domain(self, el: ET.Element) -> None:
        a = _attrs(el, ("name", "localOnly", "register"))
        _no_children(el)
        if a.get("localOnly", "yes") != "yes":
            raise _refuse(el, "localOnly='no' is not supported (kvmnetd answers for its "
                          "domain itself)")
        if a.get("register", "no") != "no":
            raise _refuse(el, "register='yes' is not supported")
        self._dns_table()["domain"] = a.get("name", "")

    def _dns_table(self) -> dict[str, Any]:
        dns: dict[str, Any] = self.net.setdefault("dns", {})
        return dns

    def _dns(self, el: ET.Element) -> None:
        _attrs(el, ("enable", "forwardPlainNames"))
        if not _yes(el, "forwardPlainNames", True):
            raise _refuse(el, "forwardPlainNames='no' is not supported")
        if not _yes(el, "enable", True):
            self._dns_table()["enabled"] = False
        forwarders = []
        hosts: list[dict[str, Any]] = []
        for child in el:
            if child.tag == "forwarder":
                ca = _attrs(child, ("addr", "domain"))
                _no_children(child)
                if "domain" in ca:
                    raise _refuse(child, "a forwarder for one domain is not supported")
                forwarders.append(_ip(child, "addr", ca.get("addr", "")))
            elif child.tag == "host":
                hosts.append(self._dns_host(child))
            elif child.tag == "srv":
                raise _refuse(child, "SRV records are not supported")
            elif child.tag == "txt":
                raise _refuse(child, "TXT records are not supported")
            else:
                raise _refuse(child, f"not supported inside {describe(el)}")
        if forwarders:
            self._dns_table()["forwarders"] = forwarders
        if hosts:
            self._dns_table()["host"] = hosts

    def _dns_host(self, el: ET.Element) -> dict[str, Any]:
        a = _attrs(el, ("ip",))
        names = []
        for sub in el:
            if sub.tag != "hostname":
                raise _refuse(sub, f"not supported inside {describe(el)}")
            _attrs(sub, ())
            _no_children(sub)
            names.append((sub.text or "").strip())
        if not names:
            raise _refuse(el, "a DNS host without a <hostname>")
        return {"ip": _ip(el, "ip", a.get("ip", "")), "names": names}

    # -- addresses and DHCP ------------------------------------------------------------------

    def _ip(self, el: ET.Element) -> None:
        a = _attrs(el, ("family", "address", "netmask", "prefix", "localPtr"))
        family = a.get("family", "ipv4")
        if family not in ("ipv4", "ipv6"):
            raise _refuse(el, f"family {family!r} is not ipv4 or ipv6")
        if "localPtr" in a:
            raise _refuse(el, "localPtr is not supported")
        key = family
        if key in self.net:
            raise _refuse(el, f"a second {'IPv4' if family == 'ipv4' else 'IPv6'} subnet is "
                          "not supported")
        address = a.get("address", "")
        try:
            if "netmask" in a:
                iface: Any = ipaddress.ip_interface(f"{address}/{a['netmask']}")
            else:
                default = "24" if family == "ipv4" else "64"
                iface = ipaddress.ip_interface(f"{address}/{a.get('prefix', default)}")
        except ValueError as exc:
            raise _refuse(el, f"not an address: {exc}") from None
        if iface.version != (4 if family == "ipv4" else 6):
            raise _refuse(el, f"the address is not {family}")
        self.net[key] = str(iface)
        tftp: str | None = None
        tftp_el: ET.Element | None = None
        dhcp_el: ET.Element | None = None
        for child in el:
            if child.tag == "tftp":
                ca = _attrs(child, ("root",))
                _no_children(child)
                tftp, tftp_el = ca.get("root", ""), child
            elif child.tag == "dhcp":
                dhcp_el = child
            else:
                raise _refuse(child, f"not supported inside {describe(el)}")
        if dhcp_el is not None:
            self._dhcp(dhcp_el, family)
        if tftp_el is not None:
            if self.dhcp is None:
                raise _refuse(tftp_el, "TFTP without DHCP is not supported")
            self.dhcp["tftp_root"] = tftp

    def _dhcp(self, el: ET.Element, family: str) -> None:
        _attrs(el, ())
        dhcp = self.dhcp if self.dhcp is not None else {}
        ranges_key = "ranges" if family == "ipv4" else "ranges6"
        ranges: list[str] = []
        hosts: list[dict[str, Any]] = []
        for child in el:
            if child.tag == "range":
                ca = _attrs(child, ("start", "end"))
                first = _ip(child, "start", ca.get("start", ""))
                last = _ip(child, "end", ca.get("end", ""))
                ranges.append(f"{first}-{last}")
                for sub in child:
                    if sub.tag != "lease":
                        raise _refuse(sub, f"not supported inside {describe(child)}")
                    self._lease(sub)
            elif child.tag == "host":
                hosts.append(self._host(child, family))
            elif child.tag == "bootp":
                ca = _attrs(child, ("file", "server"))
                _no_children(child)
                if family != "ipv4":
                    raise _refuse(child, "BOOTP is IPv4 only")
                if "file" in ca:
                    dhcp["boot_file"] = ca["file"]
                if "server" in ca:
                    dhcp["next_server"] = _ip(child, "server", ca["server"])
            else:
                raise _refuse(child, f"not supported inside {describe(el)}")
        # An IPv4 <dhcp> with no range hands out static hosts only; kvmnetd says so with [].
        dhcp[ranges_key] = ranges
        if family == "ipv6":
            dhcp["dhcpv6"] = "stateful"
        if hosts:
            dhcp["host" if family == "ipv4" else "host6"] = hosts
        self.dhcp = dhcp

    def _host(self, el: ET.Element, family: str) -> dict[str, Any]:
        a = _attrs(el, ("mac", "name", "ip", "id"))
        host: dict[str, Any] = {}
        if family == "ipv6":
            # libvirt names a DHCPv6 host by its DUID, by name, or both; never by MAC.
            if "mac" in a:
                raise _refuse(el, "a DHCPv6 host by MAC is not supported (libvirt and "
                              "kvmnetd take id or name)")
            if "id" not in a and "name" not in a:
                raise _refuse(el, "a DHCPv6 host needs id or name")
            if "id" in a:
                host["id"] = a["id"].lower()
        else:
            if "id" in a:
                # libvirt's id is the DHCPv6 DUID; kvmnetd's IPv4 hosts have no client id.
                raise _refuse(el, "a DHCP host by client id is not supported under IPv4")
            if "mac" in a:
                host["mac"] = a["mac"].lower()
            elif "name" not in a or "ip" not in a:
                raise _refuse(el, "a DHCP host needs mac, or name and ip")
        if "ip" in a:
            host["ip"] = _ip(el, "ip", a["ip"])
        elif family == "ipv6":
            raise _refuse(el, "a DHCPv6 host without ip is not supported")
        if "name" in a:
            host["name"] = a["name"]
        for sub in el:
            if sub.tag != "lease":
                raise _refuse(sub, f"not supported inside {describe(el)}")
            host["lease_time"] = _duration(_lease_seconds(sub))
        return host

    def _lease(self, el: ET.Element) -> None:
        self.leases.setdefault(_lease_seconds(el), el)


def _lease_seconds(el: ET.Element) -> int | str:
    a = _attrs(el, ("expiry", "unit"))
    _no_children(el)
    unit = a.get("unit", "minutes")
    if unit not in _UNITS:
        raise _refuse(el, f"unit {unit!r} is not seconds, minutes or hours")
    n = _int(el, "expiry", a.get("expiry", ""))
    if n == 0:
        return "infinite"
    seconds = n * _UNITS[unit]
    if seconds < MIN_LEASE:
        raise _refuse(el, f"a lease time under {MIN_LEASE} s is not supported")
    return seconds


def _duration(value: int | str) -> str:
    if isinstance(value, str):
        return value
    for unit, size in (("h", 3600), ("m", 60)):
        if value % size == 0:
            return f"{value // size}{unit}"
    return f"{value}s"


def _int(el: ET.Element, key: str, raw: str) -> int:
    try:
        n = int(raw)
    except ValueError:
        raise _refuse(el, f"{key}={raw!r} is not a whole number") from None
    if n < 0:
        raise _refuse(el, f"{key}={raw!r} is negative")
    return n


def _ip(el: ET.Element, key: str, raw: str) -> str:
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        raise _refuse(el, f"{key}={raw!r} is not an IP address") from None


_UNSUPPORTED = {
    "route": "static routes are not supported",
    "portgroup": "port groups are not supported",
    "bandwidth": "bandwidth limits are not supported",
    "vlan": "VLAN tags are not supported",
    "virtualport": "virtual ports (Open vSwitch, 802.1Qbh) are not supported",
}


def dnsmasq_leases(records: list[dict[str, Any]], now: int) -> tuple[str, int]:
    """libvirt's DHCP lease records as dnsmasq lease-file lines: (text, IPv6 leases left out).

    dnsmasq's format: EXPIRY MAC IP HOSTNAME CLIENT-ID, `*` for none. Expired ones are dropped.
    """
    lines, skipped = [], 0
    for r in records:
        if r.get("type", 0) != 0:  # VIR_IP_ADDR_TYPE_IPV4
            skipped += 1
            continue
        expiry = int(r.get("expirytime") or 0)
        if expiry and expiry <= now:
            continue
        fields = [str(expiry), str(r["mac"]).lower(), str(r["ipaddr"]),
                  r.get("hostname") or "*", r.get("clientid") or "*"]
        if any(" " in f or "\n" in f for f in fields):
            continue  # not from dnsmasq: would break the file
        lines.append(" ".join(fields) + "\n")
    return "".join(lines), skipped
