"""What kvmnetd created or changed, so it removes only that. Persisted under run_dir."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvmnetd.model import actions as A
from kvmnetd.model.observed import ObservedState, Route
from kvmnetd.model.rate import SetPortRate


@dataclass
class UplinkMove:
    """A bridged network's NIC: what moved from it onto the bridge, to move back on teardown."""

    bridge: str
    addresses: list[str] = field(default_factory=list)
    routes: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Owned:
    # bridge -> network name; `created` says whether we made it (else adopted).
    bridges: dict[str, str] = field(default_factory=dict)
    created: set[str] = field(default_factory=set)
    addresses: dict[str, set[str]] = field(default_factory=dict)  # ifname -> addresses we added
    ports: dict[str, str] = field(default_factory=dict)  # port ifname -> bridge we put it on
    forwarding: dict[int, bool] = field(default_factory=dict)  # family -> value before us
    uplinks: dict[str, UplinkMove] = field(default_factory=dict)
    firewall: bool = False
    # port ifname -> the ifb we made for its rate limit (model/rate.py)
    limits: dict[str, str] = field(default_factory=dict)
    vxlans: dict[str, str] = field(default_factory=dict)  # VXLAN device -> network

    def to_json(self) -> dict[str, Any]:
        return {
            # Copies: a snapshot taken before a pass must not change with the record.
            "bridges": dict(self.bridges),
            "created": sorted(self.created),
            "addresses": {k: sorted(v) for k, v in self.addresses.items() if v},
            "ports": dict(self.ports),
            "forwarding": {str(k): v for k, v in self.forwarding.items()},
            "uplinks": {k: dict(vars(v)) for k, v in self.uplinks.items()},
            "firewall": self.firewall,
            "limits": dict(self.limits),
            "vxlans": dict(self.vxlans),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Owned:
        return cls(
            bridges=dict(d.get("bridges", {})),
            created=set(d.get("created", [])),
            addresses={k: set(v) for k, v in d.get("addresses", {}).items()},
            ports=dict(d.get("ports", {})),
            forwarding={int(k): bool(v) for k, v in d.get("forwarding", {}).items()},
            uplinks={k: UplinkMove(**v) for k, v in d.get("uplinks", {}).items()},
            firewall=bool(d.get("firewall", False)),
            limits=dict(d.get("limits", {})),
            vxlans=dict(d.get("vxlans", {})),
        )

    def record(self, action: A.Action, observed: ObservedState) -> None:
        """Note the effect of an action that has just succeeded."""
        match action:
            case A.CreateBridge(network=net, bridge=br):
                self.bridges[br] = net or ""
                self.created.add(br)
            case A.AddAddress(ifname=dev, address=addr) if dev in self.bridges:
                self.addresses.setdefault(dev, set()).add(str(addr))
            case A.RemoveAddress(ifname=dev, address=addr):
                self.addresses.get(dev, set()).discard(str(addr))
            case A.Enslave(ifname=dev, bridge=br, uplink=True):
                if dev not in self.uplinks:
                    self.uplinks[dev] = UplinkMove(
                        bridge=br,
                        addresses=sorted(str(a) for a in observed.addresses_of(dev)),
                        routes=[route_to_json(r) for r in sorted(
                            observed.routes_via(dev), key=str) if r.gateway],
                    )
            case A.Enslave(ifname=dev, bridge=br):
                self.ports[dev] = br
            case A.Release(ifname=dev):
                self.ports.pop(dev, None)
                self.uplinks.pop(dev, None)
            case A.DeleteBridge(bridge=br):
                # The kernel released its ports with it.
                self.ports = {i: b for i, b in self.ports.items() if b != br}
                self.bridges.pop(br, None)
                self.created.discard(br)
                self.addresses.pop(br, None)
            case A.SetForwarding(family=fam, enabled=on):
                if fam in self.forwarding and self.forwarding[fam] == on:
                    del self.forwarding[fam]  # restored to what it was before us
                elif fam not in self.forwarding:
                    self.forwarding[fam] = observed.forwarding.get(fam, False)
            case A.CreateVxlan(network=net, ifname=dev):
                self.vxlans[dev] = net or ""
            case A.DeleteVxlan(ifname=dev):
                self.vxlans.pop(dev, None)
            case A.ApplyFirewall():
                self.firewall = True
            case A.RemoveFirewall():
                self.firewall = False
            case SetPortRate(ifname=dev, rate=None):
                self.limits.pop(dev, None)
            case SetPortRate(ifname=dev, ifb=ifb):
                self.limits[dev] = ifb
            case _:
                pass

    def adopt(self, bridge: str, network: str) -> None:
        self.bridges[bridge] = network


def route_to_json(r: Route) -> dict[str, Any]:
    return {"dst": str(r.dst), "gateway": r.gateway, "priority": r.priority,
            "proto": r.proto, "scope": r.scope}
