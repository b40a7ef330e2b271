"""kvmnetd's part of FRR's configuration as desired state: applied, verified, healed.

The reconciler hands over the part it wants (sync); the agent applies it in the
background, one step after another, and stops at the first that fails:
  1. read FRR's running configuration, merge our part into it (plan/frr.py); nothing
     to do when it already holds it, so a restart of kvmnetd writes nothing;
  2. refuse an empty or partial render;
  3. vtysh --dryrun on the merged file (syntax);
  4. frr-reload.py --test against the configuration read in 1: a delta that touches
     anything outside our `router bgp` instance is refused;
  5. frr-reload.py --reload;
  6. read the running configuration again: it must hold our part.
The vty sockets of zebra and bgpd are watched (inotify): FRR stopping is reported, and
once it is back the part is applied again. BGP peers are read every few seconds while
the part exists, so a lost peer is reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from kvmnetd.adapters.files import atomic_write
from kvmnetd.adapters.frr.vtysh import NOT_INSTALLED, Vtysh
from kvmnetd.adapters.inotify import DirWatch
from kvmnetd.plan.frr import (
    FrrPart,
    config_lines,
    delta_outside,
    is_config,
    merged_config,
    part_problem,
)

log = structlog.get_logger("kvmnetd.frr")

PEER_INTERVAL = 2.0  # seconds between reads of the BGP peers' state
RETRY_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)  # after a failed apply
SETTLE = 0.2  # after a vty socket appears: the daemon reads its own config first
WAIT_DIR = 2.0  # FRR's run directory does not exist yet: looked for this often


@dataclass
class FrrStatus:
    state: str = "off"  # off | applying | applied | down | failed
    reason: str = ""
    pathspace: str = ""
    asn: int | None = None
    peers: dict[str, str] = field(default_factory=dict)  # neighbour -> BGP state
    applies: int = 0  # reloads done since start

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "reason": self.reason, "pathspace": self.pathspace,
                "asn": self.asn, "peers": dict(sorted(self.peers.items())),
                "applies": self.applies}


class FrrAgent:
    def __init__(self, vtysh: Vtysh, record_path: str, work_dir: str,
                 on_change: Callable[[FrrStatus], None] | None = None) -> None:
        self.vtysh = vtysh
        self.record_path = record_path
        self.work_dir = work_dir
        self.status = FrrStatus(pathspace=vtysh.pathspace)
        self._on_change = on_change
        self.wanted: FrrPart | None = None
        self._synced = False  # sync() called once: the record may be acted on
        self.applied: FrrPart | None = self._load_record()
        self._verified = False  # FRR was seen to hold `applied` since it last came up
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._peers_task: asyncio.Task[None] | None = None
        self._watch: DirWatch | None = None
        self._failures = 0

    # -- the reconciler's side ----------------------------------------------------------------

    async def sync(self, part: FrrPart | None) -> None:
        """The part FRR should hold (None: none of ours). Returns at once."""
        if part is None and self.applied is None and self._task is None:
            self._synced = True  # no overlay here and never was: nothing runs for FRR
            return
        if self._synced and part == self.wanted and (
                self._verified or self.status.state in ("down", "failed", "applying")):
            return
        self._synced = True
        self.wanted = part
        self.status.asn = part.asn if part is not None else None
        self._start()
        self._kick.set()

    async def settle(self, timeout: float) -> None:
        """Wait until the part last handed over is applied, refused, or FRR is down (the
        daemon stopping with teardown_on_stop takes its part out before it goes)."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self._kick.is_set() or self.status.state == "applying" or (
                        self.wanted != self.applied
                        and self.status.state not in ("down", "failed")):
                    await asyncio.sleep(0.05)

    def use_pathspace(self, pathspace: str) -> None:
        """[daemon.overlay] frr_pathspace changed (a reload): talk to that FRR from now on.
        The part stays in the FRR left behind; kvmnetd no longer owns anything there."""
        if pathspace == self.vtysh.pathspace:
            return
        log.info("frr.pathspace", was=self.vtysh.pathspace, now=pathspace)
        self.vtysh = Vtysh(pathspace, reload=self.vtysh.reload_tool, vtysh=self.vtysh.vtysh)
        self.status.pathspace = pathspace
        self.status.peers = {}
        self._stop_watch()
        self._verified = False
        if self._task is not None:
            self._start_watch()
            self._kick.set()

    def _stop_watch(self) -> None:
        if self._watch is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._watch.fd)
            self._watch.close()
            self._watch = None

    async def close(self) -> None:
        for task in (self._task, self._peers_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._stop_watch()

    # -- the loop -----------------------------------------------------------------------------

    def _start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
            self._peers_task = asyncio.ensure_future(self._watch_peers())
            self._start_watch()

    def _start_watch(self) -> None:
        if self._watch is not None or not os.path.isdir(self.vtysh.run_dir):
            return
        try:
            watch = DirWatch(self._on_file)
            watch.add(self.vtysh.run_dir)
        except OSError as e:
            log.warning("frr.watch_failed", dir=self.vtysh.run_dir, error=str(e))
            return
        self._watch = watch
        asyncio.get_running_loop().add_reader(watch.fd, watch.readable)

    def _on_file(self, _directory: str, name: str) -> None:
        if name in ("zebra.vty", "bgpd.vty"):
            # Gone: FRR stopped (reported by the next look). Back: our part again.
            self._verified = False
            self._kick.set()

    async def _run(self) -> None:
        while True:
            timeout = None
            if self._watch is None:
                timeout = WAIT_DIR  # nothing tells us when FRR's directory appears
            elif self.status.state == "failed":
                timeout = RETRY_BACKOFF[min(self._failures, len(RETRY_BACKOFF)) - 1]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._kick.wait()
            self._kick.clear()
            self._start_watch()
            try:
                await self._step()
            except Exception as e:  # the agent must outlive anything FRR's tools do
                log.exception("frr.crashed")
                self._set("failed", str(e))

    async def _step(self) -> None:
        if self.wanted is None and self.applied is None:
            self._set("off")
            return
        if not self.vtysh.installed():
            self._set("failed", NOT_INSTALLED)
            return
        zebra, bgpd = self.vtysh.daemons_up()
        if not (zebra and bgpd):
            gone = " and ".join(n for n, up in (("zebra", zebra), ("bgpd", bgpd)) if not up)
            self._set("down", f"{gone} not running (no vty socket in {self.vtysh.run_dir})")
            self.status.peers = {}
            return
        if self.status.state == "down":
            await asyncio.sleep(SETTLE)
        if self._verified and self.wanted == self.applied:
            return
        self._set("applying")
        err = await self._apply(self.wanted, self.applied)
        if err is None:
            self._failures = 0
            self._verified = True
            self._set("applied" if self.wanted is not None else "off")
        else:
            self._failures += 1
            self._set("failed", err)

    async def _apply(self, part: FrrPart | None, previous: FrrPart | None) -> str | None:
        """One apply: None when FRR holds `part`, else why not."""
        if part is not None:
            problem = part_problem(part)
            if problem:
                return f"refused: {problem}"
        read = await self.vtysh.running_config()
        if read.rc != 0 or not is_config(read.out):
            return f"cannot read FRR's running configuration: {read.said}"
        merged = merged_config(read.out, part, previous)
        if merged is None:
            self._record(part)  # already right: nothing written
            return None
        running_file = os.path.join(self.work_dir, "frr-running.conf")
        merged_file = os.path.join(self.work_dir, "frr-merged.conf")
        atomic_write(running_file, "\n".join(config_lines(read.out)) + "\n", 0o600, make_dir=True)
        atomic_write(merged_file, merged, 0o600, make_dir=True)
        syntax = await self.vtysh.check_syntax(merged_file)
        if syntax.rc != 0:
            return f"syntax check failed: {syntax.said}"
        test = await self.vtysh.reload_test(merged_file, running_file)
        if test.rc != 0:
            return f"frr-reload.py --test failed: {test.said}"
        asns = {p.asn for p in (part, previous) if p is not None}
        outside = delta_outside(test.out, asns)
        if outside:
            return f"refused: the change would touch {outside[0]!r}, outside kvmnetd's part"
        log.info("frr.reloading", pathspace=self.vtysh.pathspace,
                 delta=[ln for ln in test.out.splitlines() if ln.startswith(" ")])
        done = await self.vtysh.reload(merged_file)
        self.status.applies += 1
        if done.rc != 0:
            return f"frr-reload.py --reload failed: {done.said}"
        check = await self.vtysh.running_config()
        if check.rc != 0 or merged_config(check.out, part, previous) is not None:
            return "after the reload FRR's running configuration lacks kvmnetd's part"
        self._record(part)
        return None

    def _record(self, part: FrrPart | None) -> None:
        """What kvmnetd wrote into FRR: the lines it may take out again later."""
        if part == self.applied and os.path.exists(self.record_path) == (part is not None):
            return
        self.applied = part
        if part is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.record_path)
            return
        atomic_write(self.record_path, json.dumps(part.to_json(), sort_keys=True), 0o600,
                     durable=True, make_dir=True)

    def _load_record(self) -> FrrPart | None:
        try:
            with open(self.record_path) as f:
                return FrrPart.from_json(json.load(f))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError):
            log.warning("frr.record_unreadable", path=self.record_path)
            return None

    def _set(self, state: str, reason: str = "") -> None:
        st = self.status
        if (st.state, st.reason) == (state, reason):
            return
        level = "warning" if state in ("down", "failed") else "info"
        getattr(log, level)("frr.state", state=state, reason=reason,
                            pathspace=self.vtysh.pathspace)
        st.state, st.reason = state, reason
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change(self.status)
            except Exception:
                log.exception("frr.listener_failed")

    # -- peers --------------------------------------------------------------------------------

    async def _watch_peers(self) -> None:
        while True:
            await asyncio.sleep(PEER_INTERVAL)
            if self.status.state != "applied" or self.wanted is None:
                continue
            try:
                data = await self.vtysh.show_json("show bgp l2vpn evpn summary json")
            except OSError as e:
                # A daemon killed leaves its socket file: no event, but no answer either.
                log.debug("frr.peers_unread", error=str(e))
                self._verified = False
                self._kick.set()
                continue
            self._peers_seen(data)

    def _peers_seen(self, data: Any) -> None:
        if not isinstance(data, dict) or "as" not in data:
            # bgpd answers, but without our instance: it restarted under us.
            self._verified = False
            self._kick.set()
            return
        peers_raw = data.get("peers")
        if not isinstance(peers_raw, dict):
            peers_raw = {}
        peers = {ip: str(p.get("state", "?")) if isinstance(p, dict) else "?"
                 for ip, p in peers_raw.items()}
        if peers == self.status.peers:
            return
        for ip, state in sorted(peers.items()):
            was = self.status.peers.get(ip)
            if was != state and (state == "Established" or was == "Established"):
                level = "info" if state == "Established" else "warning"
                getattr(log, level)("frr.peer", peer=ip, state=state, was=was or "")
        self.status.peers = peers
        self._changed()
