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
FRR's run directory is watched (inotify) for the daemons' vty sockets and pid files, and
each daemon's exit through a pidfd: FRR stopping or being killed is reported at once, and
once it is back the part is applied again. Nothing runs on a timer at rest: FRR has no
push for BGP peer states, so they are read after an apply (a few times, until the
sessions are up), when a caller asks (status, doctor), and on a slow sweep. A lost peer
is reported within a sweep, and at once when asked.
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
from kvmnetd.adapters.frr.daemons import DAEMONS, DaemonWatch
from kvmnetd.adapters.frr.vtysh import NOT_INSTALLED, Vtysh
from kvmnetd.adapters.inotify import DirWatch, wait_for_path
from kvmnetd.plan.frr import (
    FrrPart,
    config_lines,
    delta_outside,
    is_config,
    merged_config,
    part_problem,
)

log = structlog.get_logger("kvmnetd.frr")

# The BGP peers' states are read this often at rest, so a lost peer is reported within
# a minute; the daemon passes the reconciler's SWEEP_INTERVAL.
PEER_SWEEP = 60.0
# After an apply or FRR's return the sessions take a few seconds to come up: read again
# after these delays, until every peer is Established, then only on the sweep.
PEER_FOLLOW = (1.0, 2.0, 4.0, 8.0, 16.0)
ASKED_READ = 2.0  # a caller (status, doctor) waits this long for a fresh read at most
RETRY_BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)  # after a failed apply
SETTLE = 0.2  # after a vty socket appears: the daemon reads its own config first
WATCHED = {f"{d}.{kind}" for d in DAEMONS for kind in ("vty", "pid")}


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
                 on_change: Callable[[FrrStatus], None] | None = None,
                 sweep: float = PEER_SWEEP) -> None:
        self.vtysh = vtysh
        self.sweep = sweep
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
        self._dir_wait: asyncio.Task[None] | None = None  # FRR's run directory not there yet
        self._daemons = DaemonWatch(self._daemon_exited)
        self._exits: dict[str, int] = {}  # daemons whose pidfd said they exited, and pids
        self._failures = 0
        self._peers_due = asyncio.Event()  # read the peers now: an apply was verified
        self._follow: int | None = None  # reads since that apply, while sessions come up
        self._reading: asyncio.Task[None] | None = None  # the read running, shared

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

    async def refresh(self, timeout: float = ASKED_READ) -> None:
        """A caller asks (status, doctor): the peers are read now, or the read already
        running is joined; after `timeout` the last value read stands."""
        if self.status.state != "applied" or self.wanted is None:
            return
        await asyncio.wait({self._peer_read()}, timeout=timeout)

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
        if self._dir_wait is not None:
            self._dir_wait.cancel()
            self._dir_wait = None
        if self._watch is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._watch.fd)
            self._watch.close()
            self._watch = None
        self._daemons.disarm()

    async def close(self) -> None:
        for task in (self._task, self._peers_task, self._reading, self._dir_wait):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._dir_wait = None
        self._stop_watch()

    # -- the loop -----------------------------------------------------------------------------

    def _start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
            self._peers_task = asyncio.ensure_future(self._watch_peers())
            self._start_watch()

    def _start_watch(self) -> None:
        if self._watch is not None:
            return
        run_dir = self.vtysh.run_dir
        if not os.path.isdir(run_dir):
            if self._dir_wait is None or self._dir_wait.done():
                self._dir_wait = asyncio.ensure_future(self._wait_dir(run_dir))
            return
        try:
            watch = DirWatch(self._on_file)
            watch.add(run_dir)
        except OSError as e:
            log.warning("frr.watch_failed", dir=run_dir, error=str(e))
            return
        self._watch = watch
        asyncio.get_running_loop().add_reader(watch.fd, watch.readable)

    async def _wait_dir(self, run_dir: str) -> None:
        """FRR's run directory appears when FRR first starts: then watch it."""
        try:
            await wait_for_path(run_dir)
        except OSError as e:
            log.warning("frr.watch_failed", dir=run_dir, error=str(e))
            return
        if run_dir == self.vtysh.run_dir:
            self._kick.set()  # the loop starts the watch and looks

    def _on_file(self, _directory: str, name: str) -> None:
        if name in WATCHED:
            # A socket gone: FRR stopped (reported by the next look). A socket or pid
            # file new: a daemon (re)started, our part again and its new pid watched.
            self._verified = False
            self._kick.set()

    def _daemon_exited(self, name: str, pid: int) -> None:
        if self.wanted is None and self.applied is None:
            return
        self._verified = False
        self.status.peers = {}
        self._exits[name] = pid
        self._set("down", " and ".join(f"{n} exited (pid {p})" for n, p in self._exits.items()))
        self._kick.set()

    async def _run(self) -> None:
        while True:
            timeout = None
            if self.status.state == "failed":
                timeout = RETRY_BACKOFF[min(self._failures, len(RETRY_BACKOFF)) - 1]
            elif self._watch is None and (self._dir_wait is None or self._dir_wait.done()):
                timeout = self.sweep  # no inotify here: look again on the sweep
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
            self._daemons.disarm()
            self._set("off")
            return
        if not self.vtysh.installed():
            self._set("failed", NOT_INSTALLED)
            return
        if not self._daemons_answer():
            return
        if self.status.state == "down":
            await asyncio.sleep(SETTLE)
        self._daemons.arm(self.vtysh.run_dir)
        if self._verified and self.wanted == self.applied:
            return
        self._set("applying")
        err = await self._apply(self.wanted, self.applied)
        if err is None:
            self._failures = 0
            self._verified = True
            self._set("applied" if self.wanted is not None else "off")
            self._follow = 0
            self._peers_due.set()
        else:
            self._failures += 1
            self._set("failed", err)

    def _daemons_answer(self) -> bool:
        """Both daemons answer on their vty sockets; if not, FRR is reported down."""
        zebra, bgpd = self.vtysh.daemons_up()
        if zebra and bgpd:
            self._exits.clear()
            return True
        if self._watch is not None and not os.path.isdir(self.vtysh.run_dir):
            self._stop_watch()  # its directory went: wait for it anew
            self._start_watch()
        gone = [n for n, up in (("zebra", zebra), ("bgpd", bgpd)) if not up]
        self.status.peers = {}
        if set(gone) <= set(self._exits):  # keep the reason its pidfd gave
            reason = " and ".join(f"{n} exited (pid {self._exits[n]})" for n in gone)
        else:
            reason = (f"{' and '.join(gone)} not running (no answer on the vty socket in "
                      f"{self.vtysh.run_dir})")
        self._set("down", reason)
        return False

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
        """Reads after an apply until the sessions are up, then one per sweep."""
        while True:
            delay = self.sweep if self._follow is None else PEER_FOLLOW[self._follow]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._peers_due.wait()
            due = self._peers_due.is_set()
            self._peers_due.clear()
            await asyncio.wait({self._peer_read()})
            if self._follow is not None and not due:
                self._follow += 1
            peers = self.status.peers
            if self._follow is not None and (
                    self._follow >= len(PEER_FOLLOW)
                    or (peers and all(st == "Established" for st in peers.values()))):
                self._follow = None

    def _peer_read(self) -> asyncio.Task[None]:
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(self._read_peers())
        return self._reading

    async def _read_peers(self) -> None:
        if self.status.state != "applied" or self.wanted is None:
            return
        try:
            data = await self.vtysh.show_json("show bgp l2vpn evpn summary json")
        except OSError as e:
            # A daemon killed where pidfds are not to be had: no event, but no answer.
            log.debug("frr.peers_unread", error=str(e))
            self._verified = False
            self._daemons_answer()
            self._kick.set()
            return
        except Exception:
            log.exception("frr.peers_unread")
            return
        if self.status.state == "applied":  # not gone down while it was read
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
