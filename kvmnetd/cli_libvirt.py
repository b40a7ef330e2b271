"""`kvmnetctl network import-libvirt`: a libvirt network as kvmnetd config."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

DEFAULT_URI = "qemu:///system"
DEFAULT_STATE_DIR = "/var/lib/kvmnetd"
REFUSED = 2


def add_verbs(net: Any, verb: Any) -> None:
    """Adds the libvirt verbs to `kvmnetctl network`."""
    v = verb(net, "import-libvirt", do_import_libvirt,
             "print a libvirt network (FILE.xml of `virsh net-dumpxml`, or NAME) as kvmnetd "
             "config")
    v.add_argument("source", metavar="FILE.xml|NAME")
    v.add_argument("--connect", "-c", metavar="URI", default=None,
                   help=f"libvirt URI for NAME (default {DEFAULT_URI}, or $LIBVIRT_DEFAULT_URI)")
    v.add_argument("--define", action="store_true", help="define it on kvmnetd instead")
    v.add_argument("--runtime", action="store_true", help="with --define: until the next restart")
    a = verb(net, "adopt-libvirt", do_adopt_libvirt,
             "take a running libvirt network over, guests and leases included")
    a.add_argument("name")
    a.add_argument("--connect", "-c", metavar="URI", default=None,
                   help=f"libvirt URI (default {DEFAULT_URI}, or $LIBVIRT_DEFAULT_URI)")
    a.add_argument("--state-dir", metavar="DIR", default=DEFAULT_STATE_DIR,
                   help=f"kvmnetd's state directory, for the lease file (default "
                        f"{DEFAULT_STATE_DIR})")


def _uri(o: argparse.Namespace) -> str:
    return str(o.connect or os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI)


def _read_source(o: argparse.Namespace) -> str:
    src: str = o.source
    if src == "-":
        return sys.stdin.read()
    if src.endswith(".xml") or os.sep in src or os.path.isfile(src):
        with open(src, encoding="utf-8") as f:
            return f.read()
    from kvmnetd.adapters.libvirt.networks import network_definition

    return network_definition(_uri(o), src)


def do_import_libvirt(c: Any, o: argparse.Namespace) -> None:
    # Loaded by the verb, not at start-up: every other kvmnetctl call (a qemu hook's
    # among them) would pay for the XML and TOML libraries.
    from kvmnetd.config.libvirt_import import ImportRefused, check, parse_network

    try:
        xml = _read_source(o)
    except (OSError, UnicodeDecodeError, RuntimeError) as exc:
        print(f"kvmnetctl: import-libvirt: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    try:
        imp = parse_network(xml)
        check(imp)
    except ImportRefused as exc:
        print(f"import-libvirt: {exc}", file=sys.stderr)
        raise SystemExit(REFUSED) from None
    for note in imp.notes:
        print(f"import-libvirt: not kept: {note}", file=sys.stderr)
    text = imp.toml()
    if not o.define:
        sys.stdout.write(text)
        return
    path = c.call("DefineNetwork", text, not o.runtime)
    print(f"defined {imp.name} ({path})")


def do_adopt_libvirt(c: Any, o: argparse.Namespace) -> None:
    """libvirt's network stopped, kvmnetd's started on the same bridge and subnet with the
    leases, the guests' taps plugged into it; libvirt's definition then replaced by kvmnetd's
    bridge-mode one. Any failure before that puts libvirt's network back as it was."""
    import time

    from kvmnetd.adapters.libvirt import networks as lv
    from kvmnetd.config.libvirt_import import (
        ImportRefused,
        check,
        dnsmasq_leases,
        parse_network,
    )

    uri = _uri(o)
    try:
        snap = lv.snapshot(uri, o.name)
    except RuntimeError as exc:
        print(f"kvmnetctl: adopt-libvirt: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    try:
        imp = parse_network(snap.xml)
        check(imp)
    except ImportRefused as exc:
        print(f"adopt-libvirt: {exc}", file=sys.stderr)
        raise SystemExit(REFUSED) from None
    if not snap.active:
        print(f"adopt-libvirt: libvirt network {o.name} is not running; use import-libvirt",
              file=sys.stderr)
        raise SystemExit(REFUSED)
    leases, v6 = dnsmasq_leases(list(snap.leases), int(time.time()))
    lease_file = os.path.join(o.state_dir, f"{imp.name}.leases")
    defined = False
    try:
        lv.stop(uri, o.name)
        os.makedirs(o.state_dir, exist_ok=True)
        with open(lease_file, "a", encoding="ascii") as f:
            f.write(leases)
        c.call("DefineNetwork", imp.toml(), True)
        defined = True
        for _domain, tap in snap.taps:
            c.call("AttachPort", tap, imp.name, True)
    except Exception as exc:
        print(f"kvmnetctl: adopt-libvirt: {exc}; putting libvirt's network back",
              file=sys.stderr)
        _roll_back(c, uri, snap, o.name, defined)
        raise SystemExit(1) from None
    try:
        lv.undefine(uri, o.name)  # kvmnetd defines its bridge-mode network in its place
    except RuntimeError as exc:
        print(f"kvmnetctl: adopt-libvirt: {exc} (run `virsh net-undefine {o.name}`)",
              file=sys.stderr)
    for note in imp.notes:
        print(f"adopt-libvirt: not kept: {note}", file=sys.stderr)
    if v6:
        print(f"adopt-libvirt: {v6} DHCPv6 leases not carried over", file=sys.stderr)
    print(f"adopted {imp.name}: {len(snap.taps)} guest ports, "
          f"{leases.count(chr(10))} leases")


def _roll_back(c: Any, uri: str, snap: Any, name: str, defined: bool) -> None:
    from kvmnetd.adapters.libvirt import networks as lv

    if defined:
        try:
            c.call("UndefineNetwork", name, True)
        except Exception as exc:  # keep going: libvirt's network matters more
            print(f"kvmnetctl: adopt-libvirt: rollback: {exc}", file=sys.stderr)
    try:
        lv.restore(uri, snap, name)
    except Exception as exc:
        print(f"kvmnetctl: adopt-libvirt: rollback: {exc}", file=sys.stderr)
        return
    for _domain, tap in snap.taps:
        lv.plug(tap, snap.bridge)
