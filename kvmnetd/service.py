"""The running daemon: adapters, reconciler, core and control server, wired together."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Coroutine
from typing import Any

import structlog

from kvmnetd import logsetup
from kvmnetd.adapters.coexist import ForeignForwardAdapter
from kvmnetd.adapters.default_subnet import DefaultSubnetFile
from kvmnetd.adapters.dirs import check_writable_dirs
from kvmnetd.adapters.fdb import bridge_fdb
from kvmnetd.adapters.files import atomic_write
from kvmnetd.adapters.forward_store import ForwardFile
from kvmnetd.adapters.inotify import wait_for_path
from kvmnetd.adapters.nftables import NftablesAdapter
from kvmnetd.adapters.nftmonitor import NftMonitor
from kvmnetd.adapters.notify import Notifier
from kvmnetd.adapters.port_guard import PortGuardAdapter
from kvmnetd.adapters.rate.monitor import TcMonitor
from kvmnetd.adapters.rate.tc import TcRates
from kvmnetd.adapters.rtnl.adapter import NetlinkAdapter
from kvmnetd.adapters.sysctl import SysctlAdapter
from kvmnetd.app.core import Core
from kvmnetd.app.port_identity import PortIdentities
from kvmnetd.config import load as cfg
from kvmnetd.config.host_routes import load_config
from kvmnetd.engine.reconciler import SWEEP_INTERVAL, Reconciler
from kvmnetd.model.errors import ConfigError
from kvmnetd.model.records import ROOT, CoreEvent
from kvmnetd.plan.metrics import render_metrics

log = structlog.get_logger("kvmnetd")
# STATUS= after port events waits this long, so a burst of them sends one line.
PORT_STATUS_DELAY = 0.1

METRICS_INTERVAL = 5.0  # seconds between rewrites of [daemon] metrics_file while ports exist


def libvirt_socket(uri: str) -> str | None:
    """The local socket a qemu:/// URI connects to, or None when it cannot be told."""
    scheme, _, rest = uri.partition("://")
    if "+" in scheme or not rest.startswith("/"):
        return None  # remote or tunnelled: let libvirt find out
    query = rest.partition("?")[2]
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if key == "socket" and value:
            return value
    if rest.startswith("/system"):
        # The monolithic daemon's socket; the modular virtqemud has its own.
        for path in ("/run/libvirt/libvirt-sock", "/run/libvirt/virtqemud-sock"):
            if os.path.exists(path):
                return path
        return "/run/libvirt/libvirt-sock"
    return None


class Service:
    def __init__(self, config_file: str | None, networks_dir: str | None,
                 overrides: dict[str, str], no_bus: bool = False) -> None:
        self.config_file = config_file
        self.networks_dir = networks_dir
        self.overrides = overrides
        self.no_bus = no_bus
        self.netlink = NetlinkAdapter()
        self.notifier = Notifier()
        self.nftmon = NftMonitor()
        self.tcmon = TcMonitor()
        self.libvirt: Any = None
        self.firewalld: Any = None
        self.control: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._status_sent = ""
        self._wired = False  # rec and core exist: events may reach them
        self._reload_pending = False
        self._metrics: asyncio.Task[None] | None = None
        self._ports_changed = asyncio.Event()

    async def start(self) -> None:
        await self.netlink.open(self._on_netlink)
        subnets = DefaultSubnetFile()
        conf = load_config(self.config_file, self.networks_dir, self.overrides,
                           self.netlink.observed, subnets)
        self.settings = s = conf.settings
        logsetup.setup(logsetup.format_for(s.log_format, "log_format" in self.overrides),
                       s.log_level)
        check_writable_dirs(s, self.config_file, self.overrides)
        self.dhcp = self._make_dhcp(conf)
        self.frr = self._make_frr(conf)
        nft = NftablesAdapter(s.firewall_table,
                              state_path=os.path.join(s.run_dir, "firewall.listing"))
        self.rec = Reconciler(self.netlink, nft, SysctlAdapter(),
                              self.dhcp, os.path.join(s.run_dir, "owned.json"),
                              table=s.firewall_table,
                              coexist=ForeignForwardAdapter(s.firewall_table),
                              coexist_mode=s.coexist, rate=TcRates(), frr=self.frr,
                              guard=PortGuardAdapter(
                                  s.firewall_table,
                                  state_path=os.path.join(s.run_dir, "port-guard.json")))
        identities = PortIdentities(bridge_fdb, os.path.join(s.run_dir, "port-macs.json"))
        self.core = Core(self.rec, conf, self.dhcp, self.overrides, default_subnets=subnets,
                         forward_store=ForwardFile(), identities=identities)
        self.core.frr = self.frr
        self._wired = True
        self.rec.desired = self.core.build_desired({})
        self.rec.restore_ports()
        self.core.forget_gone_limits()
        # Qdisc changes (ours healed, a `tc qdisc del`) come as rtnetlink tc events.
        self.tcmon.start(self.rec.rates_changed)
        self.netlink.on_links_added = self.rec.links_added
        # Listen first, then observe: no ruleset change falls between.
        self.nftmon.table = s.firewall_table
        await self.nftmon.start(self.rec.firewall_changed)
        # Foreign chains then change only with an event: the timer reads just our table.
        self.rec.foreign_events = self.nftmon.listening
        if not self.no_bus:
            from kvmnetd.adapters.firewalld import FirewalldWatcher

            self.firewalld = FirewalldWatcher(s.bus_address,
                                              lambda _why: self.rec.firewall_changed())
            await self.firewalld.start()
        await self.rec.converge()
        await self._watch_libvirt()
        self.control = await self._serve_control()
        if self.control is not None and self.control.bus_expected():
            # READY means reachable: with a bus present, that includes owning our name.
            await self.control.wait_for_bus(10.0)
        self._status_sent = self.status_line()
        log.info("daemon.ready", networks=len(self.core.networks()), status=self._status_sent,
                 writes=self.rec.writes)
        self.notifier.ready(self._status_sent)

    def _make_dhcp(self, conf: cfg.Config) -> Any:
        from kvmnetd.adapters.dnsmasq.supervisor import DnsmasqSupervisor

        return DnsmasqSupervisor(conf.settings, self._on_dhcp_event)

    def _frr_pathspace_check(self) -> None:
        overlay = self.core.config.settings.overlay
        self.frr.use_pathspace(overlay.frr_pathspace if overlay is not None else "")

    def _make_frr(self, conf: cfg.Config) -> Any:
        """FRR's agent: it runs nothing until a network uses evpn."""
        from kvmnetd.adapters.frr.agent import FrrAgent
        from kvmnetd.adapters.frr.vtysh import Vtysh

        s = conf.settings
        pathspace = s.overlay.frr_pathspace if s.overlay is not None else ""
        return FrrAgent(Vtysh(pathspace), os.path.join(s.state_dir, "frr-part.json"),
                        s.run_dir, sweep=SWEEP_INTERVAL)

    async def _serve_control(self) -> Any:
        try:
            from kvmnetd.control.server import serve
        except ImportError:  # the bus layer is optional for --apply-once style use
            return None
        from kvmnetd.control.polkit import PolkitAuthority

        sock = os.path.join(self.settings.run_dir, "control.sock")
        server = await serve(self.core, self.settings.bus_address, sock, use_bus=not self.no_bus)
        self.core.authority = PolkitAuthority(lambda: server.bus)
        return server

    async def _watch_libvirt(self) -> None:
        """Domains' taps follow their lifecycle; without libvirt the daemon runs on."""
        uri = self.settings.libvirt_uri
        if not uri:
            return
        sock = libvirt_socket(uri)
        if sock is not None and not os.path.exists(sock):
            # libvirt-python costs ~12 MB once imported: wait for libvirtd to exist first.
            log.info("libvirt.waiting", uri=uri, socket=sock)
            self.spawn(self._libvirt_when_present(uri, sock))
            return
        await self._start_libvirt(uri)

    async def _libvirt_when_present(self, uri: str, sock: str) -> None:
        await wait_for_path(sock)  # inotify: libvirt may start much later, or never
        await self._start_libvirt(uri)

    async def _start_libvirt(self, uri: str) -> None:
        from kvmnetd.adapters.libvirt.watcher import LibvirtWatcher
        from kvmnetd.app.domains import domain_changed

        def on_event(ev: Any) -> None:
            self.spawn(domain_changed(self.core, ev.name, ev.uuid, ev.started, ev.nics))

        networks = self.libvirt_networks if self.settings.libvirt_networks else None
        self.libvirt = LibvirtWatcher(uri, on_event, networks=networks)
        self.core.libvirt = self.libvirt
        await self.libvirt.start()

    def libvirt_networks(self) -> dict[str, str]:
        """The networks libvirt should list: every active one, by name, with its bridge."""
        return {n.name: n.bridge for n in self.rec.desired.active_networks()}

    def _libvirt_networks_check(self) -> None:
        """A network started, stopped, defined or undefined means a libvirt sync."""
        if self.libvirt is None or not self.settings.libvirt_networks:
            return
        now = self.libvirt_networks()
        if now != self._libvirt_seen:
            self._libvirt_seen = now
            self.libvirt.networks_changed()

    _libvirt_seen: dict[str, str] | None = None

    def _qemu_bridge_check(self) -> None:
        """qemu-bridge-helper's include file follows the open active networks."""
        path = self.settings.qemu_bridge_conf
        if not path:
            return
        from kvmnetd.plan.qemu_bridge import bridge_acl

        text = bridge_acl(self.rec.desired.active_networks(), path)
        if text != self._qemu_bridge_text:
            from kvmnetd.adapters.qemu_bridge_file import write_if_changed

            write_if_changed(path, text)
            self._qemu_bridge_text = text

    _qemu_bridge_text: str | None = None

    def _on_netlink(self) -> None:
        self.rec.links_changed()

    def _on_dhcp_event(self, event: CoreEvent) -> None:
        # Leases, and a dnsmasq going degraded or serving again: pushed as they happen.
        if self._wired:
            if event.kind in ("lease-added", "lease-removed"):
                self.core.lease_changed(event)  # anti-spoofing follows the leases
            self.core.emit(event)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self) -> None:
        self.spawn(self._watchdog())
        if self._reload_pending:
            self.spawn(self.reload_from_signal())
        self.rec.on_state(lambda *_: self.refresh_status())
        self.core.subscribe(self._on_core_event)
        self.core.on_reload.append(self._metrics_check)  # metrics_file follows the file
        self.core.on_reload.append(self._frr_pathspace_check)
        self._metrics_check()
        # What start-up brought up happened before these listeners: one look now.
        self.refresh_status()
        loop_task = asyncio.ensure_future(self.rec.run())
        try:
            # Everything from here on is pushed: the loop's listeners and core events.
            await loop_task
        finally:
            loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task

    async def _watchdog(self) -> None:
        # Fed from the event loop itself: a stuck loop stops the pings and systemd restarts us.
        if not self.notifier.watchdog_usec:
            return
        period = self.notifier.watchdog_usec / 2e6
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(period)

    def request_reload(self) -> None:
        """SIGHUP: reload once started; a signal during start-up is kept for afterwards."""
        if self._wired:
            self.spawn(self.reload_from_signal())
        else:
            self._reload_pending = True

    async def reload_from_signal(self) -> None:
        self.notifier.reloading()
        try:
            await self.core.reload(ROOT)
        except ConfigError as e:
            log.error("config.reload_refused", errors=[str(i) for i in e.issues])
        finally:
            self._status_sent = self.status_line()
            self.notifier.ready(self._status_sent)

    def _on_core_event(self, event: CoreEvent) -> None:
        if event.kind == "network-changed":
            self.refresh_status()
            self._ports_changed.set()
        elif event.kind in ("port-attached", "port-detached"):
            # Only the port count changes: a burst of taps makes one datagram, not one per
            # turn of the loop (each wakes the supervisor, on the CPUs the taps need).
            self.refresh_status(PORT_STATUS_DELAY)
            self._ports_changed.set()

    def _metrics_check(self) -> None:
        if self._metrics is None and self.core.config.settings.metrics_file is not None:
            self._metrics = asyncio.ensure_future(self._write_metrics())
            self._tasks.add(self._metrics)

    async def _write_metrics(self) -> None:
        """Counters change without events, so while there are ports the file is rewritten
        every few seconds; with none it is written once and waits for a port. Without
        metrics_file this task does not exist."""
        written = None
        failed = ""  # the last failure, logged once until it changes
        try:
            while (path := self.core.config.settings.metrics_file) is not None:
                self._ports_changed.clear()
                ports = bool(self.core.list_ports())
                text = render_metrics(self.core.port_stats() if ports else [])
                if (path, text) != written:
                    try:
                        atomic_write(path, text)
                        written, failed = (path, text), ""
                    except OSError as exc:
                        if str(exc) != failed:
                            failed = str(exc)
                            log.warning("metrics.write_failed", path=path, error=failed)
                if ports:
                    await asyncio.sleep(METRICS_INTERVAL)
                else:
                    await self._ports_changed.wait()
        finally:
            if self._metrics is not None:
                self._tasks.discard(self._metrics)
            self._metrics = None

    def refresh_status(self, delay: float = 0.0) -> None:
        """After the events of this turn of the event loop (a burst of port events makes one
        update): STATUS= when its line changed, and libvirt's and qemu-bridge-helper's view
        of the active networks."""
        if self._status_due is not None:
            if delay or self._status_due.when() <= self._status_now():
                return
            self._status_due.cancel()  # a network changed: now, not after the ports' delay
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._send_status()
            return
        self._status_due = loop.call_at(loop.time() + delay, self._send_status)

    _status_due: asyncio.TimerHandle | None = None

    @staticmethod
    def _status_now() -> float:
        return asyncio.get_running_loop().time()

    def _send_status(self) -> None:
        self._status_due = None
        # The same burst of events may have started, stopped or removed networks.
        self._libvirt_networks_check()
        self._qemu_bridge_check()
        line = self.status_line()
        if line != self._status_sent:
            self._status_sent = line
            self.notifier.status(line)

    def status_line(self) -> str:
        up, ports, bad = self.core.summary()
        return f"{up} networks up, {ports} ports, {bad} degraded"

    def failed_networks(self) -> list[str]:
        return [n.name for n in self.core.list_networks() if n.state in ("failed", "degraded")]

    async def close(self, teardown: bool) -> None:
        self.notifier.stopping()
        if teardown:
            self.rec.desired = self.rec.desired.__class__()
            await self.rec.converge()
            await self.frr.settle(10.0)  # our part out of FRR too
        for task in list(self._tasks):
            task.cancel()
        if self.control is not None:
            with contextlib.suppress(Exception):
                await self.control.close()
        await self.nftmon.close()
        self.tcmon.close()
        if self.firewalld is not None:
            await self.firewalld.close()
        if self.libvirt is not None:
            await self.libvirt.close()
        if self.dhcp is not None:
            await self.dhcp.close(stop_children=teardown)
        await self.frr.close()
        await self.netlink.close()
