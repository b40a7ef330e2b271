"""Per-port rate limits: which limit each port should have and the actions to get there.

Pure. A limit is one action per port (SetPortRate) that the adapter makes whole: a tbf on
the port for what the guest receives, and for what it sends an ifb the port's ingress is
redirected to, with a tbf of its own. Only limits kvmnetd set (owned.limits) are removed:
a qdisc someone else put on a port with no limit of ours is left alone.
"""

from __future__ import annotations

from kvmnetd.model.desired import DesiredState, Network
from kvmnetd.model.observed import ObservedState, RateSeen
from kvmnetd.model.owned import Owned
from kvmnetd.model.rate import SetPortRate, ifb_name


def port_rates(qdiscs: dict[str, tuple[int | None, bool]], observed: ObservedState,
               filters_lost: set[int] | frozenset[int] = frozenset()) -> dict[str, RateSeen]:
    """Each device's limit from its qdiscs: (root tbf rate, has ingress) per device; the
    ingress direction counts while the device redirects to its ifb (its ingress qdisc is
    there and its filter was not deleted since: `filters_lost`) and that has a tbf."""
    out: dict[str, RateSeen] = {}
    for dev, (egress, ingress) in qdiscs.items():
        link = observed.link(dev)
        if link is None or link.kind == "ifb":
            continue
        inbound = None
        if ingress and link.index not in filters_lost:
            inbound = qdiscs.get(ifb_for(dev, link.index, observed), (None, False))[0]
        out[dev] = RateSeen(egress, inbound)
    return out


def ifb_for(ifname: str, index: int, observed: ObservedState) -> str:
    """The port's ifb: kr-IFNAME, or kr<index> when a device that is no ifb has that
    name (never ours to change)."""
    name = ifb_name(ifname, index)
    other = observed.link(name)
    return f"kr{index}" if other is not None and other.kind != "ifb" else name


def effective_rate(desired: DesiredState, net: Network, ifname: str) -> int | None:
    """The port's limit in bytes/s: its override (0: none), else its network's default."""
    override = desired.rates.get(ifname)
    if override is None:
        return net.port_rate
    return override or None


def port_rate_actions(desired: DesiredState, net: Network, ifname: str,
                      observed: ObservedState, owned: Owned) -> list[SetPortRate]:
    """What a port of `net` needs for its limit to be as desired."""
    link = observed.link(ifname)
    if link is None:
        return []
    want = effective_rate(desired, net, ifname)
    ifb = ifb_for(ifname, link.index, observed)
    if want is None:
        if ifname in owned.limits:
            return [SetPortRate(net.name, ifname, None, owned.limits[ifname])]
        return []
    seen = observed.port_rates.get(ifname, RateSeen())
    ifb_link = observed.link(ifb)
    ready = ifb_link is not None and ifb_link.up and ifb_link.kind == "ifb"
    if seen == RateSeen(want, want) and ready and owned.limits.get(ifname) == ifb:
        return []
    return [SetPortRate(net.name, ifname, want, ifb)]


def released_limits(owned: Owned, observed: ObservedState, ports: dict[str, str],
                    names: list[str] | None = None) -> tuple[list[SetPortRate], list[str]]:
    """Our limits on devices that are no port of ours any more (released, network gone,
    tap deleted): (actions that remove them, records to drop as nothing is left)."""
    acts: list[SetPortRate] = []
    forget: list[str] = []
    for ifname in sorted(owned.limits if names is None else names):
        ifb = owned.limits.get(ifname)
        if ifb is None or ifname in ports:
            continue
        if observed.link(ifname) is None and observed.link(ifb) is None:
            forget.append(ifname)
        else:
            acts.append(SetPortRate(None, ifname, None, ifb))
    return acts, forget
