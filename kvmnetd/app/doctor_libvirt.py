"""`doctor` findings about libvirt's networks. Pure."""

from __future__ import annotations

from collections.abc import Iterable

from kvmnetd.app.doctor import Finding


def libvirt_clash_findings(clashes: Iterable[str]) -> list[Finding]:
    """A libvirt network kvmnetd did not define has the name of one of ours: libvirt lists
    theirs, so virt-manager and `<source network=NAME>` do not reach ours."""
    return [Finding(
        check="libvirt-network-clash", severity="warning", network=name,
        subject=f"libvirt network {name}",
        message=(f"libvirt has its own network named {name!r} (not defined by kvmnetd), so "
                 f"virt-manager, virsh and <interface type='network'><source network='{name}'/> "
                 "reach libvirt's network, not kvmnetd's; kvmnetd leaves it alone"),
        fix=(f"rename kvmnetd's network (or disable it), or move libvirt's over with its "
             f"guests: `kvmnetctl network adopt-libvirt {name}` (`kvmnetctl network "
             f"import-libvirt {name}` shows it as kvmnetd config first; see docs/libvirt.md)"))
        for name in sorted(clashes)]
