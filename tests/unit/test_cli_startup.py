"""kvmnetctl starts light: a qemu hook may run it for every guest NIC."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("dbus_fast", "tomli_w", "xml.etree.ElementTree", "kvmnetd.config.libvirt_import",
         "kvmnetd.app.core", "kvmnetd.engine.reconciler", "structlog")


def test_kvmnetctl_imports_no_heavy_module_at_start() -> None:
    probe = ("import sys, kvmnetd.cli; kvmnetd.cli.parser(); "
             f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       check=True)
    assert r.stdout.strip() == ""
