"""One supervised dnsmasq per network: written, started, adopted, restarted, stopped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from kvmnetd.adapters.dnsmasq.conflicts import find_conflicts, is_our_dnsmasq, pids_running
from kvmnetd.adapters.dnsmasq.leases import LeaseWatcher, prepare_lease_file, read_leases
from kvmnetd.adapters.dnsmasq.proc import Digests, Proc, read_digests, read_int, user_can_reach
from kvmnetd.adapters.files import atomic_write
from kvmnetd.model.desired import Network, Settings
from kvmnetd.model.errors import InvalidArgument
from kvmnetd.model.records import CoreEvent, DhcpStatus, Lease
from kvmnetd.plan.dnsmasq import (
    DnsmasqPaths,
    config_digest,
    dnsmasq_paths,
    render_config,
    render_hosts,
)

log = structlog.get_logger()

CRASH_WINDOW = 30.0
MAX_CRASHES = 5
FIRST_BACKOFF = 0.05
READY_TIMEOUT = 5.0
STOP_TIMEOUT = 3.0
NOT_INSTALLED = "dnsmasq not installed: apt-get install dnsmasq-base"


@dataclass
class _Net:
    net: Network
    paths: DnsmasqPaths
    digests: Digests
    proc: Proc | None = None
    state: str = "off"
    reason: str = ""
    crashes: deque[float] = field(default_factory=deque)
    timer: asyncio.TimerHandle | None = None
    restart: asyncio.Task[None] | None = None


class DnsmasqSupervisor:
    def __init__(self, settings: Settings, on_event: Callable[[CoreEvent], None]) -> None:
        self.settings = settings
        self.spawns = 0
        self.signals = 0
        self._nets: dict[str, _Net] = {}
        self._refused: dict[str, str] = {}
        self._on_event = on_event
        self._leases = LeaseWatcher(on_event)
        self._lock = asyncio.Lock()
        self._swept = False

    # -- public -----------------------------------------------------------------------------

    async def sync(self, networks: list[Network]) -> None:
        async with self._lock:
            await self._sync(networks)

    async def _sync(self, networks: list[Network]) -> None:
        desired = {n.name: n for n in networks if n.needs_dnsmasq}
        if not self._swept:
            await self._sweep(set(desired))
            self._swept = True
        for name in [n for n in self._nets if n not in desired]:
            await self._stop(self._nets.pop(name), remove_files=True)
            self._leases.unwatch(name)
        for name in [n for n in self._refused if n not in desired]:
            del self._refused[name]
        for net in desired.values():
            try:
                paths = dnsmasq_paths(self.settings, net.name)
                digests = config_digest(net, paths)
            except InvalidArgument as e:
                log.error("dnsmasq.refused", network=net.name, error=str(e))
                st = self._nets.pop(net.name, None)
                if st is not None:
                    await self._stop(st, remove_files=True)
                self._refused[net.name] = str(e)
                continue
            self._refused.pop(net.name, None)
            await self._sync_one(net, paths, digests)

    def status(self, network: str) -> DhcpStatus:
        if network in self._refused:
            return DhcpStatus(state="failed", reason=self._refused[network])
        st = self._nets.get(network)
        if st is None:
            return DhcpStatus()
        pid = st.proc.pid if st.proc is not None and st.proc.alive else None
        return DhcpStatus(state=st.state, reason=st.reason, pid=pid)

    def leases(self, network: str) -> list[Lease]:
        st = self._nets.get(network)
        path = st.paths.leases if st else dnsmasq_paths(self.settings, network).leases
        return read_leases(path)

    async def reset(self, network: str) -> None:
        """Try again after `degraded` without waiting for a config change."""
        async with self._lock:
            st = self._nets.get(network)
            if st is not None and (st.proc is None or not st.proc.alive):
                await self._cancel_timer(st)
                st.crashes.clear()
                await self._start(st, check=True)

    async def restart(self, network: str) -> None:
        """Its bridge was made anew: a dnsmasq bound to the old one serves nobody."""
        async with self._lock:
            st = self._nets.get(network)
            if st is not None and st.proc is not None and st.proc.alive:
                log.info("dnsmasq.rebind", network=network, pid=st.proc.pid)
                await self._stop(st, remove_files=False)
                st.crashes.clear()
                await self._start(st, check=True)

    async def close(self, stop_children: bool = False) -> None:
        """By default dnsmasq keeps running: guests keep DHCP/DNS while the daemon restarts."""
        await self._leases.close()
        for st in self._nets.values():
            await self._cancel_timer(st)
            if stop_children:
                await self._stop(st, remove_files=True)
            elif st.proc is not None:
                st.proc.detach()
                st.proc = None
        self._nets.clear()

    # -- reconciling ------------------------------------------------------------------------

    async def _sync_one(self, net: Network, paths: DnsmasqPaths, digests: Digests) -> None:
        st = self._nets.get(net.name)
        if st is None:
            st = self._nets[net.name] = _Net(net, paths, digests)
            self._leases.watch(net.name, paths.leases)
            if not self._adopt(st):
                await self._start(st, check=True)
            return
        old, st.net, st.paths = st.digests, net, paths
        running = st.proc is not None and st.proc.alive
        pending = st.timer is not None or (st.restart is not None and not st.restart.done())
        if old == digests and (running or pending or st.state == "degraded"):
            return
        st.digests = digests
        if running and old[0] == digests[0]:
            self._reload(st)
            return
        if running:
            await self._stop(st, remove_files=False)
        await self._cancel_timer(st)
        st.crashes.clear()
        await self._start(st, check=True)

    def _adopt(self, st: _Net) -> bool:
        """Take over a dnsmasq left running by an earlier daemon, if it runs our config."""
        pid = read_int(st.paths.pid)
        recorded = read_digests(st.paths.digest)
        if pid is None or recorded is None or recorded[0] != st.digests[0]:
            return False
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return False
        # Checked after opening the pidfd, so the pid cannot be recycled under us.
        if not is_our_dnsmasq(pid, st.paths.conf):
            os.close(pidfd)
            return False
        st.proc = Proc(pid, pidfd, st.net.name, None, lambda p: self._exited(st, p))
        st.state, st.reason = "running", ""
        log.info("dnsmasq.adopted", network=st.net.name, pid=pid)
        if recorded[1] != st.digests[1]:
            self._reload(st)
        return True

    def _reload(self, st: _Net) -> None:
        atomic_write(st.paths.hosts, render_hosts(st.net), 0o644)
        atomic_write(st.paths.digest, " ".join(st.digests) + "\n", 0o644)
        assert st.proc is not None
        st.proc.send(signal.SIGHUP)
        self.signals += 1
        log.info("dnsmasq.reloaded", network=st.net.name, pid=st.proc.pid)

    def _fail(self, st: _Net, reason: str) -> None:
        st.state, st.reason = "failed", reason
        log.error("dnsmasq.failed", network=st.net.name, reason=reason)
        self._state_changed(st)

    def _state_changed(self, st: _Net) -> None:
        """The network's DHCP state is part of its own: watchers hear of it now."""
        try:
            self._on_event(CoreEvent(kind="network-changed", network=st.net.name))
        except Exception:  # a listener's bug must not stop the supervision
            log.exception("dnsmasq.listener_failed", network=st.net.name)

    async def _start(self, st: _Net, check: bool) -> None:
        binary = shutil.which(self.settings.dnsmasq_path)
        if binary is None:
            self._fail(st, f"{NOT_INSTALLED} ({self.settings.dnsmasq_path} not found)")
            return
        try:
            pwd.getpwnam(st.paths.user)
        except KeyError:
            self._fail(st, f"dnsmasq user {st.paths.user!r} does not exist: create it "
                           "(systemd-sysusers kvmnetd.conf) or set dnsmasq_user in [daemon]")
            return
        for pid in pids_running(st.paths.conf):
            await self._stop_stale(pid, st.net.name)
        if check:
            ours = {s.proc.pid for s in self._nets.values() if s.proc is not None}
            holders = find_conflicts(st.net, ours)
            if holders:
                self._fail(st, "; ".join(h.message(st.net.bridge) for h in holders))
                return
        try:
            self._write_files(st)
        except OSError as e:
            self._fail(st, f"cannot write dnsmasq files: {e}")
            return
        await self._spawn(st, binary)

    def _write_files(self, st: _Net) -> None:
        p = st.paths
        os.makedirs(os.path.dirname(p.conf), mode=0o755, exist_ok=True)
        os.makedirs(os.path.dirname(p.leases), mode=0o755, exist_ok=True)
        atomic_write(p.conf, render_config(st.net, p), 0o640)
        atomic_write(p.hosts, render_hosts(st.net), 0o644)
        prepare_lease_file(p.leases, p.user)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p.pid)
        st.reason = ""
        if not user_can_reach(p.hosts, p.user):
            # dnsmasq reads the hosts file only after dropping root.
            st.reason = f"user {p.user} cannot read {p.hosts}: static hosts will be ignored"
            log.warning("dnsmasq.hosts_unreadable", network=st.net.name, path=p.hosts)

    async def _spawn(self, st: _Net, binary: str) -> None:
        argv = [binary, f"--conf-file={st.paths.conf}", "--keep-in-foreground"]
        r, w = os.pipe()
        try:
            pid = os.posix_spawn(binary, argv, {**os.environ, "LC_ALL": "C"}, setsid=True,
                                 file_actions=[
                                     (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                                     (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                                     (os.POSIX_SPAWN_DUP2, w, 2),
                                 ])
        except OSError as e:
            os.close(r)
            self._fail(st, f"cannot start {binary}: {e}")
            return
        finally:
            os.close(w)
        self.spawns += 1
        # A child stays a zombie until reaped, so this pidfd names exactly it.
        proc = st.proc = Proc(pid, os.pidfd_open(pid), st.net.name, r,
                               lambda p: self._exited(st, p))
        atomic_write(st.paths.digest, " ".join(st.digests) + "\n", 0o644)
        st.state = "starting"
        log.info("dnsmasq.spawned", network=st.net.name, pid=pid)
        await self._wait_ready(st, proc)

    async def _wait_ready(self, st: _Net, proc: Proc) -> None:
        """dnsmasq writes its pid file once its sockets are bound: that means serving."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READY_TIMEOUT
        while proc.alive and read_int(st.paths.pid) != proc.pid and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if proc.alive and st.proc is proc:
            st.state = "running"
            log.info("dnsmasq.started", network=st.net.name, pid=proc.pid)
            self._state_changed(st)

    # -- supervision ------------------------------------------------------------------------

    def _exited(self, st: _Net, proc: Proc) -> None:
        if st.proc is not proc:
            return  # stopped on purpose
        st.proc = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        st.crashes.append(now)
        while st.crashes and st.crashes[0] < now - CRASH_WINDOW:
            st.crashes.popleft()
        what = proc.describe()
        log.warning("dnsmasq.exited", network=st.net.name, pid=proc.pid, status=what)
        n = len(st.crashes)
        if n > MAX_CRASHES:
            st.state = "degraded"
            st.reason = (f"dnsmasq quit {n} times within {CRASH_WINDOW:.0f} s, last {what}; "
                         "not restarted until its configuration changes or it is reset")
            log.error("dnsmasq.degraded", network=st.net.name, reason=st.reason)
            self._state_changed(st)
            return
        delay = FIRST_BACKOFF * 2 ** (n - 1)
        st.state, st.reason = "starting", f"restarting in {delay:.2f} s after {what}"
        st.timer = loop.call_later(delay, self._restart_later, st)

    def _restart_later(self, st: _Net) -> None:
        st.timer = None
        st.restart = asyncio.get_running_loop().create_task(self._start(st, check=False))

    async def _cancel_timer(self, st: _Net) -> None:
        """Drop a pending restart, also one already under way."""
        if st.timer is not None:
            st.timer.cancel()
            st.timer = None
        task, st.restart = st.restart, None
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _terminate(self, proc: Proc) -> None:
        proc.send(signal.SIGTERM)
        self.signals += 1
        try:
            await asyncio.wait_for(asyncio.shield(proc.exited), STOP_TIMEOUT)
        except TimeoutError:
            log.warning("dnsmasq.kill", network=proc.network, pid=proc.pid)
            proc.send(signal.SIGKILL)
            self.signals += 1
            await asyncio.wait_for(asyncio.shield(proc.exited), STOP_TIMEOUT)

    async def _stop(self, st: _Net, remove_files: bool) -> None:
        await self._cancel_timer(st)
        proc, st.proc = st.proc, None
        if proc is not None and proc.alive:
            await self._terminate(proc)
            log.info("dnsmasq.stopped", network=st.net.name, pid=proc.pid)
        st.state, st.reason = "off", ""
        if remove_files:
            p = st.paths
            for path in (p.conf, p.hosts, p.pid, p.digest):  # the lease file stays
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    async def _sweep(self, desired: set[str]) -> None:
        """First sync after a start: stop our dnsmasq of networks that are gone since."""
        try:
            names = [f[:-5] for f in os.listdir(self.settings.run_dir) if f.endswith(".conf")]
        except FileNotFoundError:
            return
        for name in sorted(set(names) - desired):
            try:
                paths = dnsmasq_paths(self.settings, name)
            except InvalidArgument:
                continue  # not a file of ours
            for pid in pids_running(paths.conf):
                await self._stop_stale(pid, name)
            for path in (paths.conf, paths.hosts, paths.pid, paths.digest):  # leases stay
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            log.info("dnsmasq.swept", network=name)

    async def _stop_stale(self, pid: int, network: str) -> None:
        """A dnsmasq of ours (same config file) from an earlier run that we did not adopt."""
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return
        proc = Proc(pid, pidfd, network, None, None)
        log.info("dnsmasq.replacing", network=network, pid=pid)
        await self._terminate(proc)
