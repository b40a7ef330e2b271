"""Extra dnsmasq options a network may add: the allow list and the check. Pure, no I/O.

An option is written as in a dnsmasq config file, `name` or `name=value`, and lands
on a line of its own after kvmnetd's options. dnsmasq runs as root until it drops
privileges, so only options that neither run programs, read or write files, touch
the firewall, nor undo what kvmnetd sets are accepted. The value itself is only
kept to one line; its meaning is dnsmasq's (a bad one fails that network's dnsmasq
with dnsmasq's own message).
"""

from __future__ import annotations

import re

from kvmnetd.config.locate import has_control, suggest

# Options kvmnetd does not model, by what they are for. Each is harmless to the host:
# it shapes DHCP, DNS or RA answers, or logging to dnsmasq's own log.
ALLOWED: dict[str, tuple[str, ...]] = {
    "DHCP options and tags": (
        "dhcp-option", "dhcp-option-force", "dhcp-match", "dhcp-name-match", "dhcp-userclass",
        "dhcp-vendorclass", "dhcp-circuitid", "dhcp-remoteid", "dhcp-subscrid", "dhcp-mac",
        "tag-if", "dhcp-ignore", "dhcp-ignore-names", "dhcp-generate-names", "dhcp-broadcast",
        "dhcp-host", "dhcp-boot", "pxe-service", "pxe-prompt", "dhcp-pxe-vendor",
    ),
    "DHCP behaviour": (
        "dhcp-ignore-clid", "dhcp-sequential-ip", "dhcp-rapid-commit", "dhcp-client-update",
        "dhcp-fqdn", "dhcp-reply-delay", "dhcp-lease-max", "dhcp-ttl", "dhcp-duid",
        "bootp-dynamic",
    ),
    "DNS records": (
        "address", "host-record", "cname", "txt-record", "srv-host", "mx-host", "ptr-record",
        "naptr-record", "caa-record", "dns-rr", "synth-domain", "interface-name",
    ),
    "DNS behaviour": (
        "server", "rev-server", "local", "domain-needed", "bogus-priv", "bogus-nxdomain",
        "ignore-address", "filterwin2k", "filter-A", "filter-AAAA", "filter-rr",
        "stop-dns-rebind", "rebind-localhost-ok", "rebind-domain-ok", "no-negcache",
        "neg-ttl", "local-ttl", "max-ttl", "max-cache-ttl", "min-cache-ttl", "cache-size",
        "dns-forward-max", "all-servers", "no-hosts", "localise-queries", "no-round-robin",
        "edns-packet-max", "selfmx", "localmx", "mx-target",
    ),
    "router advertisements": ("ra-param", "quiet-ra"),
    "logging": ("log-dhcp", "log-queries", "log-debug", "log-async", "quiet-dhcp",
                "quiet-dhcp6", "quiet-tftp"),
}
_ALLOWED = frozenset(name for names in ALLOWED.values() for name in names)

# Refused with the reason, so the message says why and not only "unknown".
REFUSED: dict[str, str] = {
    **dict.fromkeys(("dhcp-script", "dhcp-luascript", "dhcp-scriptuser", "script-arp",
                     "script-on-renewal", "conf-script"), "runs a program"),
    **dict.fromkeys(("conf-file", "conf-dir", "addn-hosts", "hostsdir", "dhcp-hostsfile",
                     "dhcp-hostsdir", "dhcp-optsfile", "dhcp-optsdir", "servers-file",
                     "resolv-file", "read-ethers", "dhcp-leasefile", "leasefile-ro",
                     "pid-file", "log-facility", "dumpfile", "dumpmask", "dnssec-timestamp",
                     "tftp-root", "tftp-unique-root", "tftp-secure"),
                    "reads or writes files"),
    **dict.fromkeys(("ipset", "nftset", "connmark-allowlist", "connmark-allowlist-enable",
                     "conntrack"), "changes or reads the host's firewall state"),
    **dict.fromkeys(("enable-dbus", "enable-ubus"), "publishes dnsmasq on a message bus"),
    **dict.fromkeys(("interface", "except-interface", "listen-address", "bind-interfaces",
                     "bind-dynamic", "no-dhcp-interface", "no-dhcpv4-interface",
                     "no-dhcpv6-interface", "bridge-interface", "shared-network", "port",
                     "query-port", "min-port", "max-port", "user", "group",
                     "keep-in-foreground", "no-daemon", "dhcp-alternate-port", "dhcp-relay",
                     "dhcp-proxy", "auth-server", "alias"),
                    "is set by kvmnetd (sockets, interfaces, privileges)"),
    "dhcp-range": "is set by kvmnetd: use ranges and ranges6 in [network.NAME.dhcp]",
    "enable-ra": "is set by kvmnetd: use ra in [network.NAME.dhcp]",
    "enable-tftp": "is set by kvmnetd: use tftp_root in [network.NAME.dhcp]",
    "domain": "is set by kvmnetd: use domain in [network.NAME.dns]",
    "expand-hosts": "is set by kvmnetd: use domain in [network.NAME.dns]",
    "no-resolv": "is set by kvmnetd: use forwarders in [network.NAME.dns]",
    "no-ping": "is set by kvmnetd: use ping_check in [network.NAME.dhcp]",
}

_NAME = re.compile(r"[a-z][a-zA-Z0-9-]*")
MAX_LENGTH = 1024  # far above any real option; keeps a config line of sane size


def option_name(option: str) -> str:
    return option.partition("=")[0]


def check_option(option: str) -> str:
    """The option as written if it may be passed on; ValueError saying why not."""
    if has_control(option):
        raise ValueError(f"{option!r} contains a control character (newline, NUL, ...); refused")
    if len(option) >= MAX_LENGTH:
        raise ValueError(f"longer than {MAX_LENGTH - 1} characters")
    name = option_name(option)
    if name.startswith("-"):
        raise ValueError(f"write the option without leading dashes: {name.lstrip('-')!r}")
    if name != name.strip() or not _NAME.fullmatch(name):
        raise ValueError(f"{option!r} is not 'name' or 'name=value' with a dnsmasq option name")
    if name in REFUSED:
        raise ValueError(f"{name!r} is refused: it {REFUSED[name]}")
    if name not in _ALLOWED:
        raise ValueError(f"{name!r} is not on the allow list of extra dnsmasq options"
                         f"{suggest(name, _ALLOWED)} (see docs/config.md)")
    return option
