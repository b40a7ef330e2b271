"""`kvmnetctl network import-libvirt`: a libvirt network as kvmnetd config."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .libvirt_import import ImportRefused, check, parse_network

DEFAULT_URI = "qemu:///system"
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


def _read_source(o: argparse.Namespace) -> str:
    src: str = o.source
    if src == "-":
        return sys.stdin.read()
    if src.endswith(".xml") or os.sep in src or os.path.isfile(src):
        with open(src, encoding="utf-8") as f:
            return f.read()
    from .adapters.libvirt_net import network_definition

    uri = o.connect or os.environ.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI
    return network_definition(uri, src)


def do_import_libvirt(c: Any, o: argparse.Namespace) -> None:
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
