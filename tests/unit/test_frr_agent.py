"""FRR's agent over an in-memory FRR: the order of the safe apply, and what stops it."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from kvmnetd.adapters.frr.agent import PEER_FOLLOW, PEER_SWEEP, FrrAgent
from kvmnetd.adapters.frr.vtysh import Result, Vtysh
from kvmnetd.engine.reconciler import SWEEP_INTERVAL
from kvmnetd.model.desired import Mode, Network
from kvmnetd.model.overlay import HostOverlay, NetworkOverlay
from kvmnetd.plan.frr import FrrPart, frr_part

BARE = "Current configuration:\n!\nfrr version 8.4.4\nhostname h\n!\nend\n"


class FakeFrr(Vtysh):
    """FRR in memory: reload replaces the running configuration with the file."""

    def __init__(self, running: str = BARE, delta: str = "", run_dir: str = "/nonexistent",
                 peer_state: str = "Established") -> None:
        super().__init__("t", run_dir=run_dir)
        self.running = running
        self.delta = delta
        self.log: list[str] = []
        self.up = (True, True)
        self.peer_state = peer_state
        self.peer_reads: list[float] = []  # the loop's clock at each read of the peers
        self.read_time = 0.0  # how long a read of the peers takes
        self.peers_fail = False  # bgpd killed: vtysh gets no answer

    def installed(self) -> bool:
        return True

    def daemons_up(self) -> tuple[bool, bool]:
        return self.up

    async def show_json(self, command: str) -> Any:
        assert command == "show bgp l2vpn evpn summary json"
        self.peer_reads.append(asyncio.get_running_loop().time())
        await asyncio.sleep(self.read_time)
        if self.peers_fail:
            raise OSError("vtysh: bgpd is not running")
        return {"as": 65000, "peers": {"192.0.2.12": {"state": self.peer_state}}}

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
    for _ in range(1000):  # up to 10 s: a bound on a busy machine, not a figure
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


class _JumpingSelector(selectors.DefaultSelector):
    """Where the loop would sleep, the clock jumps instead: minutes pass in no time."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if not ready and timeout is not None and timeout > 0:
            self.now += timeout
        elif not ready and timeout is None:
            ready = super().select(0.01)
        return ready


def run_simulated(main: Coroutine[Any, Any, None]) -> None:
    selector = _JumpingSelector()
    loop = asyncio.SelectorEventLoop(selector)
    loop.time = lambda: selector.now  # type: ignore[method-assign]
    try:
        loop.run_until_complete(main)
    finally:
        loop.close()


def test_at_rest_peers_are_read_no_faster_than_the_sweep(tmp_path: Path) -> None:
    """After an apply the agent reads a few times while the sessions come up, then once
    per sweep; FRR's configuration is not read again at rest."""
    assert PEER_SWEEP == SWEEP_INTERVAL  # the daemon's safety sweep, at most once a minute

    async def go() -> None:
        loop = asyncio.get_running_loop()
        frr = FakeFrr(peer_state="Active")  # never comes up: the follow-up runs out
        agent = FrrAgent(frr, str(tmp_path / "rec.json"), str(tmp_path))
        await agent.sync(part())
        await settle(agent, "applied")
        applied_at = loop.time()
        frr.log.clear()
        await asyncio.sleep(10 * 60)
        reads = [t - applied_at for t in frr.peer_reads]
        follow = len(PEER_FOLLOW) + 1  # one right after the apply, then one per delay
        assert len(reads) > follow
        assert reads[follow - 1] <= sum(PEER_FOLLOW) + 1
        gaps = [b - a for a, b in zip(reads[follow - 1:], reads[follow:], strict=False)]
        assert gaps and min(gaps) >= PEER_SWEEP, reads
        assert len(reads) <= follow + 10 * 60 / PEER_SWEEP
        assert frr.log == []  # no running-config read, no reload at rest
        await agent.close()
    run_simulated(go())


def test_follow_up_reads_stop_once_the_sessions_are_up(tmp_path: Path) -> None:
    async def go() -> None:
        frr = FakeFrr()
        agent = FrrAgent(frr, str(tmp_path / "rec.json"), str(tmp_path))
        await agent.sync(part())
        await settle(agent, "applied")
        await asyncio.sleep(PEER_SWEEP - 1)
        assert len(frr.peer_reads) == 1  # right after the apply: all Established
        assert agent.status.peers == {"192.0.2.12": "Established"}
        await agent.close()
    run_simulated(go())


def test_a_caller_gets_a_fresh_read_bounded_and_shared(tmp_path: Path) -> None:
    async def go() -> None:
        loop = asyncio.get_running_loop()
        frr = FakeFrr()
        agent = FrrAgent(frr, str(tmp_path / "rec.json"), str(tmp_path))
        await agent.sync(part())
        await settle(agent, "applied")
        await asyncio.sleep(1)
        before = len(frr.peer_reads)
        frr.peer_state = "Connect"
        await agent.refresh()
        assert len(frr.peer_reads) == before + 1
        assert agent.status.peers == {"192.0.2.12": "Connect"}
        # A slow bgpd: two callers share one read, and neither waits past the bound.
        frr.read_time = 30.0
        frr.peer_state = "Idle"
        start = loop.time()
        await asyncio.gather(agent.refresh(timeout=2.0), agent.refresh(timeout=2.0))
        assert loop.time() - start <= 2.0 + 0.5
        assert len(frr.peer_reads) == before + 2
        assert agent.status.peers == {"192.0.2.12": "Connect"}  # the last value read
        await asyncio.sleep(30)
        assert agent.status.peers == {"192.0.2.12": "Idle"}
        await agent.close()
    run_simulated(go())


def _fake_daemon(name: str) -> subprocess.Popen[bytes]:
    """A process that calls itself NAME, as zebra's or bgpd's /proc/PID/comm reads."""
    proc = subprocess.Popen([sys.executable, "-c",
                             f"open('/proc/self/comm', 'w').write({name!r})\n"
                             "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    for _ in range(500):
        if Path(f"/proc/{proc.pid}/comm").read_text().strip() == name:
            return proc
        time.sleep(0.01)
    raise AssertionError("the fake daemon did not rename itself")


async def wait_for(check: Any) -> None:
    for _ in range(1000):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not reached")


def test_a_daemon_exiting_is_seen_through_its_pidfd_and_rewatched(tmp_path: Path) -> None:
    """A killed bgpd leaves its vty socket, so nothing in the run directory changes: its
    pidfd says it exited. Its return (a new pid file) is watched again."""
    run = tmp_path / "run"
    (run / "t").mkdir(parents=True)
    procs = [_fake_daemon("zebra"), _fake_daemon("bgpd")]

    async def go() -> None:
        frr = FakeFrr(run_dir=str(run))
        (run / "t" / "zebra.pid").write_text(f"{procs[0].pid}\n")
        (run / "t" / "bgpd.pid").write_text(f"{procs[1].pid}\n")
        agent = FrrAgent(frr, str(tmp_path / "rec.json"), str(tmp_path))
        await agent.sync(part())
        await settle(agent, "applied")
        assert agent._daemons.armed == {"zebra": procs[0].pid, "bgpd": procs[1].pid}
        reads = len(frr.peer_reads)
        frr.up = (True, False)
        procs[1].kill()
        procs[1].wait()
        await settle(agent, "down")
        assert len(frr.peer_reads) == reads  # seen without a read
        assert agent.status.reason == f"bgpd exited (pid {procs[1].pid})"
        await asyncio.sleep(0.3)  # the loop's own look agrees, and keeps the reason
        assert agent.status.reason == f"bgpd exited (pid {procs[1].pid})"
        assert agent.status.peers == {}
        procs.append(_fake_daemon("bgpd"))
        frr.up = (True, True)
        (run / "t" / "bgpd.pid").write_text(f"{procs[2].pid}\n")  # inotify: it is back
        await settle(agent, "applied")
        await wait_for(lambda: agent._daemons.armed.get("bgpd") == procs[2].pid)
        await agent.close()
        assert agent._daemons.armed == {}

    try:
        asyncio.run(go())
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_without_pidfds_a_read_finds_a_dead_daemon(tmp_path: Path) -> None:
    """Where pidfd_open fails, a killed bgpd is found by the next read: the sweep's, or
    the one a caller asks for."""
    async def go() -> None:
        frr = FakeFrr()
        agent = FrrAgent(frr, str(tmp_path / "rec.json"), str(tmp_path))
        agent._daemons.unavailable = "Function not implemented"
        await agent.sync(part())
        await settle(agent, "applied")
        frr.up = (True, False)
        frr.peers_fail = True
        await agent.refresh()
        assert agent.status.state == "down", agent.status
        assert "bgpd not running" in agent.status.reason
        await agent.close()
    asyncio.run(go())


def test_a_stale_pid_file_is_not_watched(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "t").mkdir(parents=True)
    (run / "t" / "bgpd.pid").write_text(f"{os.getpid()}\n")  # not a bgpd

    async def go() -> None:
        frr = FakeFrr(run_dir=str(run))
        agent = FrrAgent(frr, str(tmp_path / "rec.json"), str(tmp_path))
        await agent.sync(part())
        await settle(agent, "applied")
        assert agent._daemons.armed == {}
        await agent.close()
    asyncio.run(go())


def test_run_directory_made_later_is_watched_without_polling(tmp_path: Path) -> None:
    run = tmp_path / "run"

    async def go() -> None:
        frr = FakeFrr(run_dir=str(run))
        agent = FrrAgent(frr, str(tmp_path / "rec.json"), str(tmp_path))
        await agent.sync(part())
        await settle(agent, "applied")
        assert agent._watch is None
        (run / "t").mkdir(parents=True)
        await wait_for(lambda: agent._watch is not None)
        await agent.close()
    asyncio.run(go())
