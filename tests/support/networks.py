"""Sample networks of every mode: the golden nft files are rendered from these."""

from __future__ import annotations

import ipaddress

from kvmnetd.model.desired import Dhcp, Dns, Mode, Network

v4 = ipaddress.IPv4Interface
v6 = ipaddress.IPv6Interface

NAT = Network("default", Mode.NAT, "kvbr0", v4("10.77.1.1/24"), uplink="eth0", dhcp=Dhcp())
ISOLATED = Network("iso", Mode.ISOLATED, "kvbr1", v4("10.77.2.1/24"), dhcp=Dhcp())
ROUTED = Network("lab", Mode.ROUTED, "kvbr2", v4("10.77.3.1/24"), dns=Dns(enabled=False))
BRIDGED = Network("lan", Mode.BRIDGED, "br0", uplink="eno1")
MIXED = [
    Network("default", Mode.NAT, "kvbr0", v4("10.77.1.1/24"), v6("fd00:77:1::1/64"),
            dhcp=Dhcp()),
    Network("iso", Mode.ISOLATED, "kvbr1", v4("10.77.2.1/24"), v6("fd00:77:2::1/64"),
            dhcp=Dhcp(), host_access=True),
    Network("lab", Mode.ROUTED, "kvbr2", v4("10.77.3.1/24"), v6("fd00:77:3::1/64"),
            uplink="eth1", dhcp=Dhcp()),
    BRIDGED,
]
# PXE on an isolated network without host access: DHCP, DHCPv6, DNS, TFTP, RA only.
PXE = Network("pxe", Mode.ISOLATED, "kvbr3", v4("10.77.4.1/24"), v6("fd00:77:4::1/64"),
              dhcp=Dhcp(tftp_root="/srv/tftp", boot_file="pxelinux.0", dhcpv6="stateless"))
CASES = {
    "nat": [NAT],
    "pxe": [PXE],
    "isolated": [ISOLATED],
    "routed": [ROUTED],
    "bridged": [BRIDGED],
    "mixed": MIXED,
}
