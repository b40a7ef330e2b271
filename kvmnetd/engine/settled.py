"""What the loop left settled since its last full pass, and what link events about it mean.

A port pass settles each port it put where its plan wanted; a full pass that applied its
whole plan settles its ports and our bridges. Events that change only these, leaving
them as they were (a bridge's MAC aside), need no pass over every link; a settled port
seen otherwise (down, deleted, changed by hand) is looked at by its own plan.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

from kvmnetd.model.observed import Link


class Settled:
    def __init__(self) -> None:
        self._ports: dict[str, Link] = {}  # ifname -> its link as it was left
        self._names: dict[int, str] = {}  # the same, by link index
        self._bridges: dict[int, Link] = {}  # link index -> the bridge, MAC blanked

    def clear(self) -> None:
        self._ports.clear()
        self._names.clear()
        self._bridges.clear()

    def port(self, ifname: str, link: Link) -> None:
        self._ports[ifname] = link
        self._names[link.index] = ifname

    def bridge(self, link: Link) -> None:
        self._bridges[link.index] = replace(link, mac="")

    def forget(self, ifname: str) -> None:
        """A port seen gone by its own plan: its deletion event, read later, needs none.
        Its index stays known until then."""
        self._ports.pop(ifname, None)

    def still(self, ifname: str, link: Link | None) -> bool:
        """The port is as it was left (False for one not settled, or gone)."""
        return link is not None and self._ports.get(ifname) == link

    def explain(self, changed: Iterable[int], links: Mapping[int, Link]) -> list[str] | None:
        """The ports whose own plan should look again, if what was settled explains every
        changed link (by index, as `links` shows it now); None if a full pass must look."""
        again: list[str] = []
        for index in changed:
            link = links.get(index)
            if link is not None and index in self._bridges:
                # A bridge without a fixed address takes its lowest port's MAC: a port
                # coming or going changes it, and nothing the planner reads.
                if replace(link, mac="") != self._bridges[index]:
                    return None
                continue
            if link is None:
                # A settled port's tap deleted (a guest stopped): that port's plan forgets it.
                name = self._names.pop(index, None)
                if name is None:
                    return None
                settled = self._ports.get(name)
                if settled is not None and settled.index == index:
                    again.append(name)  # not yet seen gone by its own plan
                continue
            settled = self._ports.get(link.name)
            if settled is None or (settled.index, settled.master) != (index, link.master):
                return None
            if link != settled:
                # Anything else on a settled port (down, or on its way out: `ip link del`
                # downs it first; its isolation flag changed by hand): its own plan looks.
                # Events of its enslave read after the ack may show it half-way (on the
                # bridge, not yet up): if the last one puts it back, nothing is planned.
                again.append(link.name)
        return again
