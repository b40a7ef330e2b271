"""kvmnetd: guest networks for KVM hosts, declared and kept right."""

__version__ = "0.1.0"
