"""FRR's agent over an in-memory FRR: the order of the safe apply, and what stops it."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

from kvmnetd.adapters.frr.agent import FrrAgent
from kvmnetd.adapters.frr.vtysh import Result, Vtysh
from kvmnetd.model.desired import Mode, Network
from kvmnetd.model.overlay import HostOverlay, NetworkOverlay
from kvmnetd.plan.frr import FrrPart, frr_part

BARE = "Current configuration:\n!\nfrr version 8.4.4\nhostname h\n!\nend\n"


class FakeFrr(Vtysh):
    """FRR in memory: reload replaces the running configuration with the file."""

    def __init__(self, running: str = BARE, delta: str = "") -> None:
        super().__init__("t")
        self.running = running
        self.delta = delta
        self.log: list[str] = []

    def installed(self) -> bool:
        return True

    def daemons_up(self) -> tuple[bool, bool]:
        return True, True

    async def running_config(self) -> Result:
        self.log.append("read")
        return Result(0, self.running, "")

    async def check_syntax(self, path: str) -> Result:
        self.log.append("syntax")
        return Result(0, "", "")

    async def reload_test(self, path: str, running: str) -> Result:
        self.log.append("test")
        return Result(0, self.delta or "\nLines To Add\n============\nrouter bgp 65000\n", "")

    async def reload(self, path: str) -> Result:
        self.log.append("reload")
        self.running = "Current configuration:\n" + Path(path).read_text()
        return Result(0, "", "")


def part() -> FrrPart:
    host = HostOverlay(local=ipaddress.IPv4Address("192.0.2.11"), asn=65000,
                       neighbors=(ipaddress.IPv4Address("192.0.2.12"),))
    net = Network(name="ov", mode=Mode.NAT, bridge="kvov",
                  overlay=NetworkOverlay(vni=100, mode="evpn"))
    p = frr_part(host, [net])
    assert p is not None
    return p


async def settle(agent: FrrAgent, want: str) -> None:
    for _ in range(200):
        if agent.status.state == want:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{agent.status.state}: {agent.status.reason}")


def test_apply_in_order_then_nothing_on_restart(tmp_path: Path) -> None:
    async def go() -> None:
        frr = FakeFrr()
        agent = FrrAgent(frr, str(tmp_path / "rec.json"), str(tmp_path))
        await agent.sync(part())
        await settle(agent, "applied")
        assert frr.log == ["read", "syntax", "test", "reload", "read"]
        assert "router bgp 65000" in frr.running
        await agent.close()
        # A new process with the record: it reads, finds its part, writes nothing.
        frr.log.clear()
        again = FrrAgent(frr, str(tmp_path / "rec.json"), str(tmp_path))
        await again.sync(part())
        await settle(again, "applied")
        assert frr.log == ["read"] and again.status.applies == 0
        await again.close()
    asyncio.run(go())


def test_delta_outside_our_instance_is_refused(tmp_path: Path) -> None:
    async def go() -> None:
        frr = FakeFrr(delta="\nLines To Delete\n===\nno route-map HAND permit 10\n")
        agent = FrrAgent(frr, str(tmp_path / "rec.json"), str(tmp_path))
        await agent.sync(part())
        await settle(agent, "failed")
        assert "outside kvmnetd's part" in agent.status.reason
        assert "reload" not in frr.log
        await agent.close()
    asyncio.run(go())


def test_unreadable_running_config_writes_nothing(tmp_path: Path) -> None:
    async def go() -> None:
        frr = FakeFrr(running="% Exiting: failed to connect to any daemons.\n")
        agent = FrrAgent(frr, str(tmp_path / "rec.json"), str(tmp_path))
        await agent.sync(part())
        await settle(agent, "failed")
        assert frr.log == ["read"]
        await agent.close()
    asyncio.run(go())
