"""Helpers shared by the tests; conftest files hold only fixtures.

netns      throwaway network namespaces, veths, `sh` inside them
rig        Sandbox: a host namespace running the real daemon, an upstream router, guests
fabric     several Sandboxes on one VXLAN underlay: overlay networks across hosts, live moves
guest      real guests (QEMU) for the slow tests
libvirtd   a private libvirtd and domain XML
container  the Debian root and systemd-nspawn boot of tests/system
dbus       a private system-like dbus-daemon with our policy, a client runner
core       the real Core over one Reconciler and the fakes, its config in files; the
           core the bus tests serve
fakes      in-memory fakes of kvmnetd's own adapter interfaces (never of system libraries)
networks   sample networks of every mode (the golden nft files)
toml       builders for the kvmnetd.toml text the tests write
"""
