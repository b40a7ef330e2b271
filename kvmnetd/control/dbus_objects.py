"""Bus objects: the manager and one object per network, mirroring the core through its events."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from contextvars import ContextVar
from typing import Annotated, Any, ParamSpec, TypeVar

import structlog
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import DBusBool, DBusSignature, DBusStr
from dbus_fast.constants import PropertyAccess
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property, dbus_signal

from kvmnetd.control.api import CoreAPI
from kvmnetd.control.connection import SteadyBus
from kvmnetd.control.credentials import BusCallers
from kvmnetd.control.errors import to_dbus_error
from kvmnetd.control.methods import METHODS, Method, lease_rows, network_properties
from kvmnetd.control.names import (
    MANAGER_IFACE,
    MANAGER_PATH,
    NETWORK_IFACE,
    NETWORK_PATH_PREFIX,
    network_name,
    network_path,
)
from kvmnetd.model.errors import NoSuchNetwork, PermissionDenied
from kvmnetd.model.records import Caller, CoreEvent, NetworkStatus

log = structlog.get_logger("kvmnetd.bus")

LeaseRows = Annotated[list[list[Any]], DBusSignature("a(sssst)")]
StrList = Annotated[list[str], DBusSignature("as")]
TwoStr = Annotated[list[str], DBusSignature("ss")]
ThreeStr = Annotated[list[str], DBusSignature("sss")]
FourStr = Annotated[list[str], DBusSignature("ssss")]

# The method call being dispatched. Set by a message handler that runs just before
# dispatch; a coroutine method's task copies it when it is created, so concurrent
# calls each keep their own.
_current_call: ContextVar[Message | None] = ContextVar("kvmnetd_current_call", default=None)

P = ParamSpec("P")
R = TypeVar("R")


def _mapped(fn: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise to_dbus_error(exc, fn.__name__) from None
    return wrapper


class NetworkObject(ServiceInterface):
    def __init__(self, core: CoreAPI, status: NetworkStatus) -> None:
        super().__init__(NETWORK_IFACE)
        self._core = core
        self.status = status
        self.props = network_properties(status)

    def update(self, status: NetworkStatus) -> None:
        new = network_properties(status)
        changed = {k: v for k, v in new.items() if self.props.get(k) != v}
        self.status, self.props = status, new
        if changed:
            self.emit_properties_changed(changed)

    def variants(self) -> dict[str, Variant]:
        sigs = {p.name: p.signature for p in self.introspect().properties}
        return {k: Variant(sigs[k], v) for k, v in self.props.items()}

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> DBusStr:
        return str(self.props["Name"])

    @dbus_property(access=PropertyAccess.READ)
    def Mode(self) -> DBusStr:
        return str(self.props["Mode"])

    @dbus_property(access=PropertyAccess.READ)
    def Bridge(self) -> DBusStr:
        return str(self.props["Bridge"])

    @dbus_property(access=PropertyAccess.READ)
    def Addresses(self) -> StrList:
        return list(self.props["Addresses"])

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> DBusStr:
        return str(self.props["State"])

    @dbus_property(access=PropertyAccess.READ)
    def StateReason(self) -> DBusStr:
        return str(self.props["StateReason"])

    @dbus_property(access=PropertyAccess.READ)
    def Ports(self) -> StrList:
        return list(self.props["Ports"])

    @dbus_property(access=PropertyAccess.READ)
    def DhcpState(self) -> DBusStr:
        return str(self.props["DhcpState"])

    @dbus_property(access=PropertyAccess.READ)
    def Autostart(self) -> DBusBool:
        return bool(self.props["Autostart"])

    @dbus_property(access=PropertyAccess.READ)
    def IsolatePorts(self) -> DBusBool:
        return bool(self.props["IsolatePorts"])

    @dbus_property(access=PropertyAccess.READ)
    def AntiSpoofing(self) -> DBusBool:
        return bool(self.props["AntiSpoofing"])

    @dbus_property(access=PropertyAccess.READ)
    def PortRate(self) -> DBusStr:
        return str(self.props["PortRate"])

    @dbus_method()
    @_mapped
    def Leases(self) -> LeaseRows:
        return lease_rows(self._core, self.status.name)


class Manager(ServiceInterface):
    """The manager object; its methods are made from control.methods.METHODS (below)."""

    def __init__(self, service: BusService) -> None:
        super().__init__(MANAGER_IFACE)
        self._svc = service

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> DBusStr:
        return str(self._svc.core.version)

    @dbus_signal()
    def PortAttached(self, ifname: str, network: str) -> TwoStr:
        return [ifname, network]

    @dbus_signal()
    def PortDetached(self, ifname: str, network: str) -> TwoStr:
        return [ifname, network]

    @dbus_signal()
    def NetworkStateChanged(self, name: str, state: str, reason: str) -> ThreeStr:
        return [name, state, reason]

    @dbus_signal()
    def LeaseAdded(self, network: str, mac: str, ip: str, hostname: str) -> FourStr:
        return [network, mac, ip, hostname]

    @dbus_signal()
    def LeaseRemoved(self, network: str, mac: str, ip: str, hostname: str) -> FourStr:
        return [network, mac, ip, hostname]


def _bus_method(m: Method) -> Callable[..., Any]:
    """A Manager method for one row of the table, typed for dbus-fast by its signature."""
    needs_caller = m.access != "read"

    async def call(self: Manager, *args: Any) -> Any:
        try:
            caller = await self._svc.caller(m.name) if needs_caller else None
            result = m.run(self._svc.core, caller, list(args))
            if inspect.isawaitable(result):
                result = await result
            self._svc.after(m, list(args), result)
        except Exception as exc:
            raise to_dbus_error(exc, m.name) from None
        return result

    def call_now(self: Manager, *args: Any) -> Any:
        # A read that waits for nothing: answered in its own dispatch, no task.
        try:
            return m.run(self._svc.core, None, list(args))
        except Exception as exc:
            raise to_dbus_error(exc, m.name) from None

    if not needs_caller and not inspect.iscoroutinefunction(m.run):
        call = call_now
    call.__name__ = call.__qualname__ = m.name
    # dbus-fast reads the D-Bus types from the annotations, as signature strings.
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(arg, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=code)
               for arg, code in m.args]
    call.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        params, return_annotation=m.returns or inspect.Signature.empty)
    return dbus_method(name=m.name)(call)


for _m in METHODS:
    if _m.on_bus:
        setattr(Manager, _m.name, _bus_method(_m))


class ServiceBus(SteadyBus):
    """A bus connection whose ObjectManager signals come from the manager path.

    dbus-fast sends InterfacesAdded/Removed from the object's own path; ObjectManager
    clients listen on the manager's path.
    """

    def _emit_interface_added(self, path: str, interface: ServiceInterface) -> None:
        if self._disconnected or not isinstance(interface, NetworkObject):
            return
        self.send(Message.new_signal(
            MANAGER_PATH, "org.freedesktop.DBus.ObjectManager", "InterfacesAdded",
            "oa{sa{sv}}", [path, {interface.name: interface.variants()}]))

    def _emit_interface_removed(self, path: str, removed_interfaces: list[str]) -> None:
        if self._disconnected or not path.startswith(NETWORK_PATH_PREFIX):
            return
        self.send(Message.new_signal(
            MANAGER_PATH, "org.freedesktop.DBus.ObjectManager", "InterfacesRemoved",
            "oas", [path, removed_interfaces]))


class BusService:
    """Keeps one object per network in step with the core; survives bus reconnects."""

    def __init__(self, core: CoreAPI) -> None:
        self.core = core
        self.callers = BusCallers()
        self.manager = Manager(self)
        self.networks: dict[str, NetworkObject] = {}
        self.bus: MessageBus | None = None
        # Subscribe first, then list: no event falls between.
        core.subscribe(self._on_event)
        self.sync_all()

    def attach(self, bus: MessageBus) -> None:
        self.bus = bus
        self.callers.clear()
        bus.add_message_handler(self._before_dispatch)
        bus.export(MANAGER_PATH, self.manager)
        for name, obj in self.networks.items():
            bus.export(network_path(name), obj)

    def detach(self) -> None:
        bus, self.bus = self.bus, None
        if bus is None:
            return
        bus.remove_message_handler(self._before_dispatch)
        bus.unexport(MANAGER_PATH)
        for name in self.networks:
            bus.unexport(network_path(name))

    def _before_dispatch(self, msg: Message) -> None:
        if msg.message_type is MessageType.METHOD_CALL:
            _current_call.set(msg)
        else:
            self.callers.on_message(msg)

    async def caller(self, member: str) -> Caller:
        msg = _current_call.get()
        bus = self.bus
        # Fail closed if the recorded call is not the one being served.
        if (bus is None or msg is None or msg.member != member or msg.path != MANAGER_PATH
                or not msg.sender):
            raise PermissionDenied("cannot identify the caller of this request")
        return await self.callers.resolve(bus, msg.sender)

    def after(self, m: Method, args: list[Any], result: Any) -> None:
        """Bring the network objects a successful call changed up to date."""
        if m.refresh == "arg":
            self.refresh(args[0])
        elif m.refresh == "result":
            name = network_name(result)
            if name is not None:
                self.refresh(name)
        elif m.refresh == "all":
            self.sync_all()

    def sync_all(self) -> None:
        current = {n.name: n for n in self.core.list_networks()}
        for name in list(self.networks):
            if name not in current:
                self._remove(name)
        for st in current.values():
            self._put(st)

    def refresh(self, name: str) -> None:
        try:
            st = self.core.network(name)
        except NoSuchNetwork:
            self._remove(name)
            return
        self._put(st)

    def _put(self, st: NetworkStatus) -> None:
        obj = self.networks.get(st.name)
        if obj is None:
            obj = self.networks[st.name] = NetworkObject(self.core, st)
            if self.bus is not None:
                self.bus.export(network_path(st.name), obj)
            return
        before = (obj.status.state, obj.status.reason)
        obj.update(st)
        if (st.state, st.reason) != before:
            self.manager.NetworkStateChanged(st.name, st.state, st.reason)

    def _remove(self, name: str) -> None:
        if self.networks.pop(name, None) is not None and self.bus is not None:
            self.bus.unexport(network_path(name))

    def _on_event(self, ev: CoreEvent) -> None:
        try:
            self._handle_event(ev)
        except Exception:
            log.exception("bus event handling failed", kind=ev.kind, network=ev.network)

    def _handle_event(self, ev: CoreEvent) -> None:
        if ev.kind == "network-changed":
            self.refresh(ev.network)
        elif ev.kind in ("port-attached", "port-detached"):
            if ev.network:
                self.refresh(ev.network)
            signal = (self.manager.PortAttached if ev.kind == "port-attached"
                      else self.manager.PortDetached)
            signal(ev.ifname, ev.network)
        elif ev.kind in ("lease-added", "lease-removed") and ev.lease is not None:
            le = ev.lease
            emit = (self.manager.LeaseAdded if ev.kind == "lease-added"
                    else self.manager.LeaseRemoved)
            emit(ev.network, le.mac, le.ip, le.hostname)
