"""What the reconciler needs from each adapter. Tests fake these, never the system."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from kvmnetd.model import actions as A
from kvmnetd.model.desired import Network
from kvmnetd.model.guard import GuardElement
from kvmnetd.model.observed import ObservedState
from kvmnetd.model.rate import SetPortRate
from kvmnetd.plan.coexist import CoexistChanges, CoexistRule, ForeignForward
from kvmnetd.plan.frr import FrrPart


class NetlinkPort(Protocol):
    observed: ObservedState
    writes: int

    async def apply(self, action: A.Action) -> None: ...

    async def apply_many(self, actions: Sequence[A.Action],
                         sent: Callable[[], None] | None = None,
                         waited: bool = True) -> list[BaseException | None]:
        """apply() for each, in order, as fast as the kernel takes them (pipelined): one
        result per action, None or the error apply() would have raised. sent() is called
        once every request has gone out, before the acks are awaited. waited: a caller
        waits for these (answer it first), or not (keep the event loop free)."""
        ...

    async def tap_info(self, ifname: str) -> tuple[int | None, int | None] | None:
        """(owner uid, group gid) of a tun/tap read from the kernel now; None if none."""
        ...

    def events_pending(self) -> bool:
        """Kernel events are waiting to be read: the mirror may still show a passing state."""
        ...

    def follow(self, port_flags: bool, fdb: bool) -> None:
        """Follow bridge ports' flags and fdb entries (or stop: they read as unknown)."""
        ...

    def take_changes(self) -> tuple[set[int], bool]:
        """(link indexes events changed, anything else changed) since the last call."""
        ...


class FirewallPort(Protocol):
    writes: int

    async def observe(self) -> str | None: ...
    async def apply(self, ruleset: str) -> None: ...
    async def remove(self) -> None: ...


class PortGuardPort(Protocol):
    """The anti-spoofing bridge table."""

    writes: int

    async def observe(self) -> tuple[str | None, frozenset[GuardElement]]: ...
    async def apply(self, ruleset: str, fingerprint: str,
                    elements: frozenset[GuardElement]) -> None: ...

    async def update(self, add: frozenset[GuardElement],
                     delete: frozenset[GuardElement]) -> frozenset[GuardElement]:
        """Apply element changes; the elements now in the table."""
        ...

    async def remove(self) -> None: ...


class SysctlPort(Protocol):
    writes: int

    def forwarding(self, family: int) -> bool | None: ...
    def set_forwarding(self, family: int, enabled: bool) -> None: ...
    def accept_ra(self, ifname: str) -> int | None: ...


class RatePort(Protocol):
    writes: int

    async def observe(self) -> dict[str, tuple[int | None, bool]]:
        """device -> (its root tbf's rate in bytes/s, has an ingress qdisc), for every
        device with either, as the kernel has them now."""
        ...

    async def apply(self, action: SetPortRate) -> None: ...

    async def apply_many(self, actions: Sequence[SetPortRate]) -> list[BaseException | None]:
        """apply() for each, in as few processes as it can: one result per action."""
        ...


class CoexistPort(Protocol):
    writes: int

    async def observe(self) -> ForeignForward: ...
    async def apply(self, rules: tuple[CoexistRule, ...]) -> CoexistChanges: ...


class DhcpPort(Protocol):
    async def sync(self, networks: list[Network]) -> None: ...

    async def restart(self, network: str) -> None:
        """Its bridge was made anew: a running dnsmasq bound to the old one starts again."""
        ...


class FrrPort(Protocol):
    async def sync(self, part: FrrPart | None) -> None:
        """The part of FRR's configuration kvmnetd wants (None: none). Applied in the
        background: FRR's own tools take a second, the loop does not wait for them."""
        ...
