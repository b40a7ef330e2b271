"""The core: desired state, access control and the port API, over one reconciler. No bus here."""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

import structlog

from kvmnetd import __version__, logsetup
from kvmnetd.adapters.counters import GuestCounters, read_port_counters
from kvmnetd.adapters.fdb import bridge_fdb
from kvmnetd.adapters.files import atomic_write
from kvmnetd.adapters.forward_store import ForwardFile
from kvmnetd.adapters.port_guard import read_spoof_drops
from kvmnetd.adapters.port_limits import load_port_limits, save_port_limits
from kvmnetd.app.access import Authority, authorize
from kvmnetd.app.forwards import ForwardsMixin
from kvmnetd.app.port_identity import PortIdentities
from kvmnetd.config import load as cfg
from kvmnetd.config.host_routes import DefaultSubnetStore, load_config
from kvmnetd.config.write import render_network_toml
from kvmnetd.engine.reconciler import NetState, Reconciler
from kvmnetd.model.desired import DesiredState, Mode, Network, is_ifname
from kvmnetd.model.errors import (
    Conflict,
    InvalidArgument,
    NoSuchNetwork,
    NoSuchPort,
    PermissionDenied,
)
from kvmnetd.model.guard import PortIdentity
from kvmnetd.model.policy import AttachPolicy
from kvmnetd.model.rate import DEFAULT, NO_LIMIT, format_rate, parse_rate
from kvmnetd.model.records import (
    Caller,
    CoreEvent,
    DhcpStatus,
    Lease,
    NetworkStatus,
    PortCounters,
    PortStatus,
)
from kvmnetd.plan.planner import PORT_KINDS
from kvmnetd.plan.rate import effective_rate

log = structlog.get_logger("kvmnetd.app.core")


class DhcpView(Protocol):
    def status(self, network: str) -> DhcpStatus: ...
    def leases(self, network: str) -> list[Lease]: ...


class FrrView(Protocol):
    @property
    def status(self) -> Any: ...

    async def refresh(self) -> None: ...  # the BGP peers read now, bounded in time


class Core(ForwardsMixin):
    version = __version__

    def __init__(self, reconciler: Reconciler, config: cfg.Config,
                 dhcp: DhcpView | None = None, overrides: dict[str, str] | None = None,
                 default_subnets: DefaultSubnetStore | None = None,
                 forward_store: ForwardFile | None = None,
                 identities: PortIdentities | None = None) -> None:
        self.rec = reconciler
        self.default_subnets = default_subnets
        self.config = config
        self.overrides = dict(overrides or {})  # command-line settings, kept across reloads
        self.dhcp = dhcp
        self.authority: Authority | None = None  # polkit, once the bus is there
        self.runtime: dict[str, Network] = {}  # defined at runtime only (not on disk)
        self.started: set[str] = set()  # runtime start/stop overrides
        self.stopped: set[str] = set()
        self._listeners: list[Callable[[CoreEvent], None]] = []
        self._attached: dict[str, str] = {}
        # Taps of libvirt domains: ifname -> domain name. Those of <interface type='network'>
        # are libvirt's to plug and unplug (ifname in libvirt_managed): never detached or moved.
        self.port_domains: dict[str, str] = {}
        self.libvirt_managed: set[str] = set()
        self.libvirt: Any = None  # the libvirt watcher, when there is one
        self.frr: FrrView | None = None  # FRR's agent (evpn overlays)
        self._policy = AttachPolicy(config.rules)
        self._rows: dict[str, PortStatus] | None = None  # see _port_rows
        self._by_net: dict[str, set[str]] = {}
        self._port_list: list[PortStatus] | None = None
        # The kernel's counters of a port, from the guest's side (replaceable in tests).
        self.read_counters: Callable[[str], GuestCounters | None] = read_port_counters
        # Anti-spoofing: the guest behind each port, and the drops counted per port.
        self.identities = identities or PortIdentities(bridge_fdb)
        table = config.settings.firewall_table
        self.read_spoof_drops: Callable[[], dict[str, int]] = lambda: read_spoof_drops(table)
        self._tasks: set[asyncio.Task[None]] = set()
        self._identities_due = False
        self.on_reload: list[Callable[[], None]] = []  # called after a reload took effect
        # Per-port rate overrides (ifname -> bytes/s, 0: none), kept in state_dir.
        self.port_limits = load_port_limits(config.settings.state_dir)
        reconciler.on_state(self._state_changed)
        reconciler.on_ports(self._emit_port_changes)
        self._init_forwards(forward_store)  # runtime port forwards (app/forwards.py)

    # ---- desired state -------------------------------------------------------------------

    def networks(self) -> dict[str, Network]:
        return self.with_runtime_forwards({**self.config.networks, **self.runtime})

    def build_desired(self, ports: dict[str, str] | None = None) -> DesiredState:
        nets = self.networks()
        active = {n.name for n in nets.values() if n.autostart} | self.started
        active = (active - self.stopped) & set(nets)
        ports = dict(self.rec.desired.ports if ports is None else ports)
        return DesiredState(networks=nets, active=frozenset(active), ports=ports,
                            rules=self.config.rules, policy=self.policy,
                            rates=dict(self.port_limits),
                            overlay=self.config.settings.overlay,
                            identities=self._identities(nets))

    def _identities(self, nets: dict[str, Network]) -> dict[str, PortIdentity]:
        """The guests behind the ports of networks with anti_spoofing (none: nothing)."""
        if not any(n.anti_spoofing for n in nets.values()):
            return {}
        observed = self.rec.netlink.observed
        self.identities.prune(observed)
        for net in nets.values():
            if net.anti_spoofing:
                for port in self.identities.learn_from_leases(
                        net, self.leases_of(net.name), self.rec.last_plan.ports, observed):
                    log.info("port.mac_learned", network=net.name, ifname=port,
                             mac=self.identities.mac_of(port), source="lease")
        return self.identities.build(nets.values(), self.leases_of)

    def leases_of(self, network: str) -> list[Lease]:
        return self.dhcp.leases(network) if self.dhcp else []

    def _refresh_identities(self) -> None:
        """The loop's desired state with what is known now of each port's guest."""
        ids = self._identities(self.networks())
        if ids != self.rec.desired.identities:
            self.rec.desired = replace(self.rec.desired, identities=ids)

    def lease_changed(self, event: CoreEvent) -> None:
        """A lease came or went: on a network with anti_spoofing its port may send from
        that address now (or no more), and a first lease names the port's MAC."""
        net = self.networks().get(event.network)
        if net is None or not net.anti_spoofing or event.lease is None:
            return
        if event.kind == "lease-added":
            port = self.identities.learn_from_lease(net, event.lease, self.rec.last_plan.ports,
                                                    self.rec.netlink.observed)
            if port is not None:
                log.info("port.mac_learned", network=net.name, ifname=port,
                         mac=event.lease.mac)
        if not self._identities_due:
            # One apply for a burst of lease events: it reads them all when it runs.
            self._identities_due = True
            task = asyncio.ensure_future(self._apply_identities())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _apply_identities(self) -> None:
        await asyncio.sleep(0)
        self._identities_due = False
        try:
            await self.apply()
        except Exception:  # the lease watcher's callback has no caller to tell
            log.exception("port.identities_apply_failed")

    @property
    def policy(self) -> AttachPolicy:
        """The attach policy of the config loaded now: one object per load."""
        if self._policy.rules is not self.config.rules:
            self._policy = AttachPolicy(self.config.rules)
        return self._policy

    async def apply(self, ports: dict[str, str] | None = None) -> None:
        await self.rec.set_desired(self.build_desired(ports))

    # ---- reads ---------------------------------------------------------------------------

    def list_networks(self) -> list[NetworkStatus]:
        return [self.network(name) for name in sorted(self.networks())]

    def network(self, name: str) -> NetworkStatus:
        net = self._net(name)
        state, reason, dhcp = self._state_of(net)
        addrs = tuple(str(a) for a in (net.ipv4, net.ipv6) if a is not None)
        self._port_rows()
        ports = tuple(sorted(self._by_net.get(name, ())))
        return NetworkStatus(name=name, mode=str(net.mode), bridge=net.bridge, addresses=addrs,
                             state=state, reason=reason, ports=ports, dhcp=dhcp,
                             autostart=net.autostart, isolate_ports=net.isolate_ports,
                             anti_spoofing=net.anti_spoofing,
                             port_rate=format_rate(net.port_rate) if net.port_rate else "none")

    def _state_of(self, net: Network) -> tuple[str, str, DhcpStatus]:
        st = self.rec.states.get(net.name, NetState("inactive"))
        dhcp = self.dhcp.status(net.name) if self.dhcp and net.needs_dnsmasq else DhcpStatus()
        if st.state == "active" and dhcp.state in ("degraded", "failed"):
            return "degraded", f"dhcp: {dhcp.reason}", dhcp
        return st.state, st.reason, dhcp

    def summary(self) -> tuple[int, int, int]:
        """(networks up, ports attached, networks failed or degraded), cheap enough to
        follow every event: no port list is built."""
        states = [self._state_of(net)[0] for net in self.networks().values()]
        return (states.count("active"), len(self._attached),
                states.count("failed") + states.count("degraded"))

    def list_ports(self) -> list[PortStatus]:
        if self._port_list is None:
            rows = self._port_rows()
            self._port_list = [rows[i] for i in sorted(rows)]
        return self._port_list

    def _port_rows(self) -> dict[str, PortStatus]:
        """ifname -> its row: rebuilt after a full pass, kept current port by port after
        the loop's single-port work, so an event costs O(1), not O(ports)."""
        if self._rows is None:
            self._rows, self._by_net = {}, {}
            for ifname in self.rec.last_plan.ports:
                self._put_row(ifname)
        return self._rows

    def _put_row(self, ifname: str) -> None:
        assert self._rows is not None
        old = self._rows.pop(ifname, None)
        if old is not None:
            self._by_net.get(old.network, set()).discard(ifname)
        row = self._row(ifname)
        if row is not None:
            self._rows[ifname] = row
            self._by_net.setdefault(row.network, set()).add(ifname)
        self._port_list = None

    def _row(self, ifname: str) -> PortStatus | None:
        netname = self.rec.last_plan.ports.get(ifname)
        net = self.networks().get(netname) if netname else None
        if net is None:
            return None  # not a port, or dropped by a reload: the next pass forgets it
        obs = self.rec.netlink.observed
        link, br = obs.link(ifname), obs.link(net.bridge)
        if link is None:
            state = "missing"
        elif br is not None and link.master == br.index:
            state = "attached"
        elif ifname in self.rec.port_errors:
            state = "failed"
        else:
            state = "pending"
        rate = effective_rate(self.rec.desired, net, ifname)
        return PortStatus(ifname=ifname, network=net.name, bridge=net.bridge, state=state,
                          domain=self.port_domains.get(ifname, ""),
                          rate=format_rate(rate) if rate else NO_LIMIT)

    def port_stats(self, ifname: str = "") -> list[PortCounters]:
        """Counters of every port that is there, or of the one named (NoSuchPort if it is
        not a port of a network, or its device is gone)."""
        ports = self.list_ports()
        if ifname:
            ports = [p for p in ports if p.ifname == ifname]
            if not ports:
                raise NoSuchPort(f"{ifname} is not a port of any network")
        out = []
        guarded = {n.name for n in self.networks().values() if n.anti_spoofing}
        spoofed = self.read_spoof_drops() if any(p.network in guarded for p in ports) else {}
        for p in ports:
            counters = self.read_counters(p.ifname)
            if counters is not None:
                out.append(PortCounters(p.ifname, p.network, *counters,
                                        spoof_drops=spoofed.get(p.ifname, 0)))
            elif ifname:
                raise NoSuchPort(f"{ifname}: no such device")
        return out

    def leases(self, network: str) -> list[Lease]:
        self._net(network)
        return self.dhcp.leases(network) if self.dhcp else []

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "networks": [self._with_overlay(n.to_json()) for n in self.list_networks()],
            "ports": [p.to_json() for p in self.list_ports()],
            "owned": self.rec.owned.to_json(),
            "libvirt": self.libvirt_status(),
            "frr": self.frr_status(),
        }

    async def refresh_frr(self) -> None:
        """Before an answer that shows FRR's BGP peers: FRR pushes no peer state, so it is
        read when asked (bounded: a slow FRR leaves the last value read)."""
        if self.frr is not None:
            await self.frr.refresh()

    def frr_status(self) -> dict[str, Any]:
        """kvmnetd's part in FRR: applied or not and why, and the BGP peers' states."""
        if self.frr is None:
            return {"state": "off"}
        out: dict[str, Any] = self.frr.status.to_json()
        return out

    def _with_overlay(self, row: dict[str, Any]) -> dict[str, Any]:
        from kvmnetd.app.overlay import overlay_status

        net = self.networks().get(row["name"])
        if net is not None and net.overlay is not None:
            ov = overlay_status(net, self.config.settings.overlay, self.rec.netlink.observed)
            if ov is not None and net.overlay.mode == "evpn":
                # evpn's peers are FRR's BGP neighbours, in the states bgpd gives them.
                frr = self.frr_status()
                ov["peers"] = [{"address": ip, "state": f"bgp {st}"}
                               for ip, st in sorted((frr.get("peers") or {}).items())]
                ov["frr"] = frr.get("state", "off")
            row["overlay"] = ov
        return row

    def libvirt_status(self) -> dict[str, Any]:
        """Whether libvirt is followed, and foreign libvirt networks named like ours."""
        lv = self.libvirt
        if lv is None:
            return {"connected": False, "clashes": []}
        return {"connected": bool(lv.connected), "clashes": list(lv.clashes)}

    async def doctor(self) -> list[dict[str, Any]]:
        """Why a guest may have no network: findings, each with what to do."""
        from kvmnetd.app.doctor import doctor

        await self.refresh_frr()
        nets = self.build_desired().active_networks()
        findings = await doctor(
            nets, self.rec.netlink.observed,
            {p.ifname: p.network for p in self.list_ports()},
            {n.name: self.leases(n.name) for n in nets if n.dhcp is not None},
            [self.network(n.name) for n in nets],
            table=self.config.settings.firewall_table, settings=self.config.settings)
        from kvmnetd.app.doctor_libvirt import libvirt_clash_findings
        from kvmnetd.app.overlay import overlay_findings

        findings = [*findings, *libvirt_clash_findings(self.libvirt_status()["clashes"]),
                    *overlay_findings(nets, self.config.settings.overlay,
                                      self.rec.netlink.observed)]
        from kvmnetd.app.doctor_frr import frr_findings

        findings = [*findings, *frr_findings(self.frr_status())]
        return [f.to_json() for f in findings]

    # ---- writes --------------------------------------------------------------------------

    async def define_network(self, caller: Caller, toml_text: str, persist: bool) -> str:
        await self.authorize_admin(caller, "define networks")
        # A host route over its subnet does not refuse it: the planner reports that.
        net = cfg.parse_network_text(toml_text, "<define>", self.config)
        if net.name in self.networks():
            raise Conflict(f"network {net.name} already exists; undefine it first")
        if persist:
            if not self.config.files and "default" in self.config.networks:
                # The built-in default exists only while no file does: keep it as one.
                _write_network_file(self.config.settings.networks_dir,
                                    self.config.networks["default"])
            _write_network_file(self.config.settings.networks_dir, net)
            self.config = replace(self.config, networks={**self.config.networks, net.name: net})
        else:
            self.runtime[net.name] = net
        await self.apply()
        return net.name

    async def undefine_network(self, caller: Caller, name: str, persist: bool) -> None:
        await self.authorize_admin(caller, "undefine networks")
        self._net(name)
        if name in self.runtime:
            del self.runtime[name]
        elif persist:
            path = os.path.join(self.config.settings.networks_dir, f"{name}.toml")
            if not os.path.exists(path):
                raise Conflict(f"network {name} comes from {self._origin(name)}; "
                               "remove it there and reload")
            os.unlink(path)
            nets = dict(self.config.networks)
            del nets[name]
            self.config = replace(self.config, networks=nets)
        else:
            raise InvalidArgument(f"network {name} is defined on disk; undefine it with persist")
        if name in self.runtime_forwards:  # they went with the network
            self._set_runtime(name, ())
        ports = {i: n for i, n in self.rec.desired.ports.items() if n != name}
        self.started.discard(name)
        self.stopped.discard(name)
        await self.apply(ports)

    async def start_network(self, caller: Caller, name: str) -> None:
        await self.authorize_admin(caller, "start networks")
        self._net(name)
        self.stopped.discard(name)
        self.started.add(name)
        await self.apply()
        st = self.rec.states.get(name)
        if st is not None and (st.state == "failed" or name in self.rec.last_plan.problems):
            raise Conflict(f"network {name} could not start: {st.reason}")

    async def stop_network(self, caller: Caller, name: str) -> None:
        await self.authorize_admin(caller, "stop networks")
        self._net(name)
        self.started.discard(name)
        self.stopped.add(name)
        await self.apply()

    async def attach_port(self, caller: Caller, ifname: str, network: str,
                          force: bool = False) -> None:
        if not caller.is_root and is_ifname(ifname):
            # A tap's owner is not always announced by events: ask the kernel.
            await self.rec.netlink.tap_info(ifname)
        if not network:
            network = self.network_by_policy(ifname)
        net = self._check_port_request(caller, ifname, network, force)
        if net.anti_spoofing:
            self._refresh_identities()
        # This port alone, through the loop's queue: no pass over every port.
        await self.rec.request_port(ifname, net.name)
        self._check_attached(ifname, net)

    def network_by_policy(self, ifname: str) -> str:
        """The network the attach policy gives this device, else the built-in default."""
        desired = self.rec.desired
        link = self.rec.netlink.observed.link(ifname)
        if link is not None:
            net = self.policy.network_for(link, desired.active)
            if net is not None:
                return net
        if "default" in desired.active:
            return "default"
        raise InvalidArgument(f"no network chosen for {ifname}: name one (qemu-ifup@NET or "
                              "KVMNET_NETWORK=NET) or add an [[attach]] rule that matches it")

    async def move_port(self, caller: Caller, ifname: str, network: str) -> None:
        self._refuse_libvirt_managed(ifname, "move")
        if ifname not in {p.ifname for p in self.list_ports()}:
            raise NoSuchPort(f"{ifname} is not attached to any network; use attach")
        await self.attach_port(caller, ifname, network)

    async def detach_port(self, caller: Caller, ifname: str) -> None:
        self._refuse_libvirt_managed(ifname, "detach")
        current = {p.ifname: p.network for p in self.list_ports()}
        if ifname not in current:
            raise NoSuchPort(f"{ifname} is not attached by kvmnetd")
        self._authorize_port(caller, ifname, current[ifname])
        # "": explicitly detached, so policy rules leave it alone too.
        await self.rec.request_port(ifname, "")

    async def limit_port(self, caller: Caller, ifname: str, rate: str) -> None:
        """A port's own rate limit: a rate, "none" (no limit, whatever its network's
        port_rate says) or "default" (its network's port_rate again). Kept across restarts
        and moves; it ends with the port's device."""
        await self.authorize_admin(caller, "limit ports")
        if ifname not in {p.ifname for p in self.list_ports()}:
            raise NoSuchPort(f"{ifname} is not a port of any network")
        word = rate.strip().lower()
        limits = dict(self.port_limits)
        if word == DEFAULT:
            limits.pop(ifname, None)
        elif word == NO_LIMIT:
            limits[ifname] = 0
        else:
            try:
                limits[ifname] = parse_rate(word)
            except ValueError as e:
                raise InvalidArgument(f"{e}; or {NO_LIMIT!r} or {DEFAULT!r}") from None
        if limits != self.port_limits:
            save_port_limits(self.config.settings.state_dir, limits)
            self.port_limits = limits
        await self.apply()
        if ifname in self.rec.port_errors:
            raise Conflict(f"{ifname}: the limit could not be set: "
                           f"{self.rec.port_errors[ifname]}")

    def forget_gone_limits(self) -> None:
        """Overrides end with their device, like port requests: a tap name reused by
        another guest (qemu's vnetN) starts with its network's default."""
        obs = self.rec.netlink.observed
        gone = [i for i in self.port_limits if obs.link(i) is None]
        if not gone:
            return
        self.port_limits = {i: r for i, r in self.port_limits.items() if i not in gone}
        self.rec.desired = replace(self.rec.desired, rates=dict(self.port_limits))
        try:
            save_port_limits(self.config.settings.state_dir, self.port_limits)
        except OSError as e:
            log.warning("port_limits.save_failed", error=str(e))

    async def set_log_level(self, caller: Caller, level: str) -> None:
        """Verbosity from now on, until the next reload or restart."""
        await self.authorize_admin(caller, "change the log level")
        if level not in logsetup.LEVELS:
            raise InvalidArgument(f"log level {level!r} must be one of "
                                  f"{', '.join(logsetup.LEVELS)}")
        logsetup.set_level(level)
        log.warning("log.level_changed", level=level, uid=caller.uid)

    def _refuse_libvirt_managed(self, ifname: str, what: str) -> None:
        if ifname in self.libvirt_managed:
            dom = self.port_domains.get(ifname, "?")
            raise InvalidArgument(
                f"{ifname} belongs to libvirt domain {dom} (<interface type='network'>): "
                f"libvirt plugs it; to {what} it, change the domain's interface "
                "(virsh edit, or detach-interface/attach-interface)")

    async def adopt_libvirt_port(self, ifname: str, network: str, domain: str) -> None:
        """A tap libvirt plugged into our bridge itself: list it as a port, change nothing."""
        self.port_domains[ifname] = domain
        self.libvirt_managed.add(ifname)
        self._net(network)
        ports = dict(self.rec.desired.ports)
        ports[ifname] = network
        await self.apply(ports)

    async def forget_libvirt_port(self, ifname: str) -> None:
        """Its domain stopped and libvirt removed the tap: drop it from the port list."""
        self.port_domains.pop(ifname, None)
        self.libvirt_managed.discard(ifname)
        ports = dict(self.rec.desired.ports)
        if ports.pop(ifname, None) is not None:
            await self.apply(ports)

    async def reload(self, caller: Caller) -> None:
        await self.authorize_admin(caller, "reload")
        s = self.config.settings
        new = load_config(s.config_file, s.networks_dir, self.overrides,
                          self.rec.netlink.observed, self.default_subnets)
        # Paths stay as started; behaviour settings follow the file.
        self.config = replace(new, settings=replace(
            s, teardown_on_stop=new.settings.teardown_on_stop,
            log_level=new.settings.log_level, metrics_file=new.settings.metrics_file,
            overlay=new.settings.overlay))
        logsetup.set_level(new.settings.log_level)
        await self.apply()
        log.info("config.reloaded", networks=len(self.networks()))
        for callback in self.on_reload:
            callback()

    def subscribe(self, listener: Callable[[CoreEvent], None]) -> None:
        self._listeners.append(listener)

    def emit(self, event: CoreEvent) -> None:
        # After the current call has replied: signals are for watchers, not the caller.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        for listener in self._listeners:
            if loop is not None:
                loop.call_soon(listener, event)
            else:
                listener(event)

    # ---- checks --------------------------------------------------------------------------

    def _net(self, name: str) -> Network:
        net = self.networks().get(name)
        if net is None:
            known = ", ".join(sorted(self.networks())) or "none"
            raise NoSuchNetwork(f"no network named {name!r} (known: {known})")
        return net

    def _origin(self, name: str) -> str:
        src = self.networks()[name].source
        return f"{src.file}:{src.line}" if src else "the configuration"

    async def authorize_admin(self, caller: Caller, what: str) -> None:
        """Root, group kvmnet, or polkit's yes (PermissionDenied otherwise)."""
        await authorize(caller, what, self.authority)

    def _check_port_request(self, caller: Caller, ifname: str, network: str,
                            force: bool) -> Network:
        if not is_ifname(ifname):
            raise InvalidArgument(f"{ifname!r} is not a valid interface name")
        net = self._net(network)
        if network not in self.rec.desired.active:
            raise Conflict(f"network {network} is not started; start it first")
        obs = self.rec.netlink.observed
        link = obs.link(ifname)
        if link is None:
            raise NoSuchPort(f"no device named {ifname}")
        if link.kind not in PORT_KINDS:
            kind = link.kind or "physical"
            raise InvalidArgument(f"{ifname} is a {kind} device; only tap and veth devices "
                                  "can be attached")
        uplinks = {n.uplink for n in self.networks().values() if n.uplink}
        if ifname in uplinks or ifname in self.rec.owned.uplinks:
            raise Conflict(f"{ifname} is a host uplink; it cannot join network {network}")
        if net.mode is Mode.ISOLATED and obs.routes_via(ifname) and any(
                r.gateway for r in obs.routes_via(ifname)):
            raise Conflict(f"{ifname} carries the host's routes; it cannot join an isolated "
                           "network")
        master = obs.name_of(link.master)
        ours = {n.bridge for n in self.networks().values()}
        if master is not None and master not in ours and not force:
            raise Conflict(f"{ifname} is a port of bridge {master}, which kvmnetd does not "
                           "manage; detach it there first or pass force")
        self._authorize_port(caller, ifname, network, link.tun_owner)
        return net

    def _authorize_port(self, caller: Caller, ifname: str, network: str,
                        owner: int | None = None) -> None:
        if caller.is_root:
            return
        net = self._net(network)
        if not _allowed(caller, net):
            raise PermissionDenied(f"uid {caller.uid} may not use network {network}; "
                                   "add the user to its allow_users or allow_groups")
        if owner is None:
            link = self.rec.netlink.observed.link(ifname)
            owner = link.tun_owner if link else None
        if owner is None or owner < 0 or owner != caller.uid:
            raise PermissionDenied(f"{ifname} is not a tap owned by uid {caller.uid}")

    def _check_attached(self, ifname: str, net: Network) -> None:
        st = self.rec.states.get(net.name)
        if st is not None and (st.state == "failed" or net.name in self.rec.last_plan.problems):
            raise Conflict(f"network {net.name} is {st.state}: {st.reason}")
        obs = self.rec.netlink.observed
        link, br = obs.link(ifname), obs.link(net.bridge)
        if link is None or br is None or link.master != br.index:
            why = self.rec.port_errors.get(ifname, "see the log")
            raise Conflict(f"{ifname} could not be attached to {net.bridge}: {why}")

    # ---- events --------------------------------------------------------------------------

    def _state_changed(self, name: str, st: NetState) -> None:
        self.emit(CoreEvent(kind="network-changed", network=name))

    def _emit_port_changes(self, names: set[str] | None = None) -> None:
        """Pushed by the loop after its writes: these ports (None: every port) may have
        been attached or detached."""
        if self.port_limits and (names is None or not names.isdisjoint(self.port_limits)):
            self.forget_gone_limits()
        if names is None:
            self._rows = self._port_list = None
            now = {p.ifname: p.network for p in self.list_ports() if p.state == "attached"}
            names = set(now) | set(self._attached)
        else:
            if self._rows is not None:
                for ifname in names:
                    self._put_row(ifname)
            rows = self._port_rows()
            now = {i: row.network for i in names
                   if (row := rows.get(i)) is not None and row.state == "attached"}
        for ifname in sorted(names):
            was, net = self._attached.get(ifname), now.get(ifname)
            if was is not None and was != net:
                del self._attached[ifname]
                self.emit(CoreEvent(kind="port-detached", network=was, ifname=ifname))
            if net is not None and was != net:
                self._attached[ifname] = net
                self.emit(CoreEvent(kind="port-attached", network=net, ifname=ifname))


def _allowed(caller: Caller, net: Network) -> bool:
    try:
        user = pwd.getpwuid(caller.uid).pw_name
    except KeyError:
        user = None
    if "*" in net.allow_users or (user is not None and user in net.allow_users):
        return True
    for gid in caller.gids:
        try:
            if grp.getgrgid(gid).gr_name in net.allow_groups:
                return True
        except KeyError:
            continue
    return False


def _write_network_file(directory: str, net: Network) -> None:
    atomic_write(os.path.join(directory, f"{net.name}.toml"), render_network_toml(net),
                 durable=True, make_dir=True)
