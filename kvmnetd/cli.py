"""kvmnetctl: one verb, one call to kvmnetd.

Transport: the control socket when it is there (no D-Bus library to load, so a qemu
ifup hook stays fast), else the system bus. --bus-address or --bus forces the bus,
--socket (or KVMNETD_SOCKET) forces the socket. Only bus names are imported up front.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import Any

from kvmnetd import __version__
from kvmnetd.control import names

SOCKET_TIMEOUT = 300.0
PROPERTY_KEYS = {
    "Name": "name", "Mode": "mode", "Bridge": "bridge", "Addresses": "addresses",
    "State": "state", "StateReason": "reason", "Ports": "ports", "DhcpState": "dhcp_state",
    "Autostart": "autostart", "IsolatePorts": "isolate_ports", "AntiSpoofing": "anti_spoofing",
    "PortRate": "port_rate",
}


class Unavailable(Exception):
    """This transport cannot reach kvmnetd; another one may."""


class CallFailed(Exception):
    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error


# -- transports ---------------------------------------------------------------

def socket_call(path: str, method: str, args: list[Any]) -> Any:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.connect(path)
        except OSError as exc:
            raise Unavailable(f"no control socket at {path} ({exc.strerror})") from None
        sock.settimeout(SOCKET_TIMEOUT)
        sock.sendall(json.dumps({"method": method, "args": args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise CallFailed(names.error_name("Failed"), "kvmnetd closed the connection")
            buf += chunk
    finally:
        sock.close()
    reply = json.loads(buf)
    if not reply.get("ok"):
        raise CallFailed(str(reply.get("error")), str(reply.get("message")))
    return reply.get("result")


def bus_call(address: str | None, method: str, args: list[Any]) -> Any:
    import asyncio
    return asyncio.run(_bus_call(address, method, args))


def _bus_message(method: str, args: list[Any]) -> tuple[str, str, str, str, list[Any]]:
    """(path, interface, member, signature, body) for a socket-style method name."""
    if method == "Network":  # the network object's properties
        return (names.network_path(args[0]), "org.freedesktop.DBus.Properties", "GetAll", "s",
                [names.NETWORK_IFACE])
    if method == "Leases":
        return names.network_path(args[0]), names.NETWORK_IFACE, "Leases", "", []
    if method == "Version":
        return (names.MANAGER_PATH, "org.freedesktop.DBus.Properties", "Get", "ss",
                [names.MANAGER_IFACE, "Version"])
    # Only the bus needs the signatures: the socket path (a qemu hook's) never loads the table.
    from kvmnetd.control.methods import BY_NAME

    return names.MANAGER_PATH, names.MANAGER_IFACE, method, BY_NAME[method].signature, args


async def _bus_call(address: str | None, method: str, args: list[Any]) -> Any:
    from dbus_fast import BusType, Message, MessageType
    from dbus_fast.aio import MessageBus

    path, iface, member, sig, body = _bus_message(method, args)
    try:
        bus = await MessageBus(bus_address=address, bus_type=BusType.SYSTEM).connect()
    except Exception as exc:
        raise Unavailable(f"no system bus ({str(exc) or type(exc).__name__})") from None
    try:
        reply = await bus.call(Message(destination=names.BUS_NAME, path=path, interface=iface,
                                       member=member, signature=sig, body=body))
    finally:
        bus.disconnect()
    if reply.message_type is MessageType.ERROR:
        error = reply.error_name or ""
        text = str(reply.body[0]) if reply.body else error
        if error in ("org.freedesktop.DBus.Error.ServiceUnknown",
                     "org.freedesktop.DBus.Error.NameHasNoOwner"):
            raise Unavailable(f"{names.BUS_NAME} is not on the bus")
        if path != names.MANAGER_PATH and error in ("org.freedesktop.DBus.Error.UnknownObject",
                                                    "org.freedesktop.DBus.Error.UnknownMethod"):
            raise CallFailed(names.error_name("NoSuchNetwork"), f"no network named {args[0]!r}")
        if error == "org.freedesktop.DBus.Error.AccessDenied":
            # The bus daemon's own text is a dump of its matching rules.
            text = f"permission denied: the bus policy does not let you call {member}"
        raise CallFailed(error, text)
    if method == "Network":
        return {k: v.value for k, v in reply.body[0].items()}
    if method == "Version":
        return reply.body[0].value
    return reply.body[0] if reply.body else None


class Client:
    def __init__(self, opts: argparse.Namespace) -> None:
        self.bus_address: str | None = opts.bus_address
        self.socket_path: str = (opts.socket or os.environ.get(names.SOCKET_ENV)
                                 or names.DEFAULT_SOCKET_PATH)
        if opts.bus_address or opts.bus:
            self.order = ["bus"]
        elif opts.socket or os.environ.get(names.SOCKET_ENV):
            self.order = ["socket"]
        else:
            self.order = ["socket", "bus"]

    def call(self, method: str, *args: Any) -> Any:
        reasons = []
        for transport in self.order:
            try:
                if transport == "socket":
                    return socket_call(self.socket_path, method, list(args))
                return bus_call(self.bus_address, method, list(args))
            except Unavailable as exc:
                reasons.append(str(exc))
        raise CallFailed(names.error_name("Failed"),
                         "kvmnetd is not reachable: " + "; ".join(reasons))


# -- output -------------------------------------------------------------------

def table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    cells = [[c.upper() for c in cols]]
    cells += [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _cell(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    if value is None or value == "":
        return "-"
    return str(value)


def emit(opts: argparse.Namespace, data: Any, human: Any) -> None:
    if getattr(opts, "json", False):
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        human()


# -- verbs --------------------------------------------------------------------

def do_status(c: Client, o: argparse.Namespace) -> None:
    state = json.loads(c.call("Describe"))

    def human() -> None:
        print(f"kvmnetd {state.get('version', '?')}")
        nets = state.get("networks", [])
        print(f"networks: {len(nets)}  ports: {len(state.get('ports', []))}")
        if nets:
            table(nets, ["name", "mode", "bridge", "state", "reason"])
        for net in nets:
            if net.get("overlay"):
                print(f"overlay {net['name']}:")
                _overlay_lines(net["overlay"])
        _libvirt_status_lines(state.get("libvirt") or {})
        _frr_status_lines(state.get("frr") or {})
    emit(o, state, human)


def _frr_status_lines(frr: dict[str, Any]) -> None:
    if frr.get("state", "off") == "off":
        return
    where = f" (pathspace {frr['pathspace']})" if frr.get("pathspace") else ""
    reason = f": {frr['reason']}" if frr.get("reason") else ""
    print(f"frr{where}: {frr['state']}{reason}, as {frr.get('asn')}")
    for peer, st in sorted((frr.get("peers") or {}).items()):
        print(f"  bgp neighbour {peer}: {st}")


def _overlay_lines(ov: dict[str, Any], indent: str = "  ") -> None:
    under = ov.get("underlay") or "none"
    print(f"{indent}vni {ov.get('vni')} ({ov.get('mode')}), device {ov.get('device')} "
          f"{ov.get('device_state')}, local {ov.get('local')} on {under} "
          f"(MTU {ov.get('underlay_mtu')}), guest MTU {ov.get('mtu')}")
    for peer in ov.get("peers", []):
        print(f"{indent}peer {peer['address']}: {peer['state']}")
    macs = ov.get("remote_macs", [])
    print(f"{indent}remote MACs: {len(macs)}" + (f" ({', '.join(macs[:8])}"
                                                 f"{', ...' if len(macs) > 8 else ''})"
                                                 if macs else ""))
    for problem in ov.get("problems", []):
        print(f"{indent}problem: {problem}")


def _libvirt_status_lines(lv: dict[str, Any]) -> None:
    for name in lv.get("clashes", []):
        print(f"libvirt: its own network {name!r} (not kvmnetd's) has the name of ours; "
              f"rename ours, or move libvirt's over (kvmnetctl network adopt-libvirt {name}, "
              "see docs/libvirt.md)")


def do_doctor(c: Client, o: argparse.Namespace) -> None:
    findings = json.loads(c.call("Doctor"))

    def human() -> None:
        if not findings:
            print("no problems found")
        for f in findings:
            where = f" [{f['network']}]" if f.get("network") else ""
            print(f"{f['severity'].upper()} {f['check']}{where}: {f['subject']}")
            print(f"  {f['message']}")
            print(f"  fix: {f['fix']}")
    emit(o, findings, human)
    if any(f["severity"] == "error" for f in findings):
        raise SystemExit(1)


def do_network_list(c: Client, o: argparse.Namespace) -> None:
    cols = ["name", "mode", "bridge", "state"]
    rows = [dict(zip(cols, r, strict=True)) for r in c.call("ListNetworks")]
    emit(o, rows, lambda: table(rows, cols))


def do_network_show(c: Client, o: argparse.Namespace) -> None:
    props = c.call("Network", o.name)
    data = {PROPERTY_KEYS.get(k, k): v for k, v in props.items()}
    if str(data.get("mode")) in ("nat", "routed", "isolated"):
        # The overlay part is no bus property: it comes with Describe.
        rows = json.loads(c.call("Describe")).get("networks", [])
        ov = next((r.get("overlay") for r in rows if r.get("name") == o.name), None)
        if ov:
            data["overlay"] = ov

    def human() -> None:
        for key in PROPERTY_KEYS.values():
            print(f"{key + ':':12} {_cell(data.get(key))}")
        if data.get("overlay"):
            print("overlay:")
            _overlay_lines(data["overlay"])
    emit(o, data, human)


def done(o: argparse.Namespace, data: dict[str, Any], line: str) -> None:
    """One line saying what changed (or the same as an object); nothing with --quiet."""
    if not _quiet(o):
        emit(o, data, lambda: print(line))


def _persistence(persistent: bool) -> str:
    return "persistent" if persistent else "runtime"


def _port_network(c: Client, ifname: str) -> str | None:
    return next((r[1] for r in c.call("ListPorts") if r[0] == ifname), None)


def _bridge(c: Client, network: str) -> str:
    return str(c.call("Network", network).get("Bridge", ""))


def _quiet(o: argparse.Namespace) -> bool:
    return bool(getattr(o, "quiet", False) or getattr(o, "quiet_all", False))


def do_network_start(c: Client, o: argparse.Namespace) -> None:
    c.call("StartNetwork", o.name)
    done(o, {"network": o.name, "action": "started"}, f"{o.name}: started")


def do_network_stop(c: Client, o: argparse.Namespace) -> None:
    c.call("StopNetwork", o.name)
    done(o, {"network": o.name, "action": "stopped"}, f"{o.name}: stopped")


def do_network_undefine(c: Client, o: argparse.Namespace) -> None:
    c.call("UndefineNetwork", o.name, not o.runtime)
    kept = _persistence(not o.runtime)
    done(o, {"network": o.name, "action": "undefined", "persistent": not o.runtime},
         f"{o.name}: undefined ({kept})")


def do_port_attach(c: Client, o: argparse.Namespace) -> None:
    c.call("AttachPort", o.ifname, o.network, o.force)
    if _quiet(o):
        return  # no look-ups: qemu hooks pass --quiet and stay fast
    network = o.network or _port_network(c, o.ifname) or ""
    bridge = _bridge(c, network) if network else ""
    done(o, {"ifname": o.ifname, "network": network, "bridge": bridge, "action": "attached"},
         f"{o.ifname}: attached to {network} ({bridge})")


def do_port_move(c: Client, o: argparse.Namespace) -> None:
    before = None if _quiet(o) else _port_network(c, o.ifname)
    c.call("MovePort", o.ifname, o.network)
    if _quiet(o):
        return
    bridge = _bridge(c, o.network)
    done(o, {"ifname": o.ifname, "from": before, "network": o.network, "bridge": bridge,
             "action": "moved"},
         f"{o.ifname}: moved from {before or '?'} to {o.network} ({bridge})")


def do_port_detach(c: Client, o: argparse.Namespace) -> None:
    before = None if _quiet(o) else _port_network(c, o.ifname)
    c.call("DetachPort", o.ifname)
    done(o, {"ifname": o.ifname, "network": before, "action": "detached"},
         f"{o.ifname}: detached from {before or '?'}")


def do_port_limit(c: Client, o: argparse.Namespace) -> None:
    c.call("LimitPort", o.ifname, o.rate)
    if _quiet(o):
        return
    row: dict[str, Any] = next((p for p in json.loads(c.call("Describe")).get("ports", [])
                if p.get("ifname") == o.ifname), {})
    rate = row.get("rate", "?")
    done(o, {"ifname": o.ifname, "network": row.get("network"), "rate": rate,
             "action": "limited"},
         f"{o.ifname}: limit {rate} each way" if rate != "none" else f"{o.ifname}: no limit")


def do_network_define(c: Client, o: argparse.Namespace) -> None:
    try:
        if o.file == "-":
            text = sys.stdin.read()
        else:
            with open(o.file, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise CallFailed("", f"cannot read {o.file}: {exc}") from None
    path = c.call("DefineNetwork", text, not o.runtime)
    name = names.network_name(path) or path
    done(o, {"network": name, "action": "defined", "persistent": not o.runtime},
         f"{name}: defined ({_persistence(not o.runtime)})")


def do_leases(c: Client, o: argparse.Namespace) -> None:
    cols = ["mac", "ip", "hostname", "client_id", "expires"]
    rows = [dict(zip(cols, r, strict=True)) for r in c.call("Leases", o.network)]
    # JSON keeps epoch seconds (stable); people read a local time.
    shown = [{**r, "expires": _when(r["expires"])} for r in rows]
    emit(o, rows, lambda: table(shown, ["mac", "ip", "hostname", "expires"]))


def _when(epoch: int) -> str:
    import time

    return "never" if not epoch else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def do_port_list(c: Client, o: argparse.Namespace) -> None:
    # Describe carries each port's libvirt domain too; ListPorts' row type stays as it is.
    cols = ["ifname", "network", "state", "rate", "domain"]
    ports = json.loads(c.call("Describe")).get("ports", [])
    rows = [{k: p.get(k, "") for k in cols} for p in ports]
    emit(o, rows, lambda: table(rows, cols))


STATS_COLS = ["ifname", "network", "rx_bytes", "tx_bytes", "rx_packets", "tx_packets",
              "drops", "spoof_drops"]


def do_port_stats(c: Client, o: argparse.Namespace) -> None:
    rows = [dict(zip(STATS_COLS, r, strict=True)) for r in c.call("PortStats", o.ifname or "")]
    emit(o, rows, lambda: table(rows, STATS_COLS))


# -- port forwards --------------------------------------------------------------

FORWARD_COLS = ["network", "proto", "port", "to", "to_port"]


def do_forward_list(c: Client, o: argparse.Namespace) -> None:
    rows = [{"network": r[0], "proto": r[1], "port": r[2], "to": r[3], "to_port": r[4] or None,
             "runtime": r[5]} for r in c.call("ListForwards", o.network or "")]
    shown = [{**r, "from": "runtime" if r["runtime"] else "config"} for r in rows]
    emit(o, rows, lambda: table(shown, [*FORWARD_COLS, "from"]))


def do_forward_add(c: Client, o: argparse.Namespace) -> None:
    c.call("AddForward", o.network, o.proto, o.port, o.to, o.persist)
    done(o, {"network": o.network, "proto": o.proto, "port": o.port, "to": o.to,
             "action": "added", "persistent": o.persist},
         f"{o.network}: {o.proto} {o.port} -> {o.to} ({_persistence(o.persist)})")


def do_forward_remove(c: Client, o: argparse.Namespace) -> None:
    c.call("RemoveForward", o.network, o.proto, o.port)
    done(o, {"network": o.network, "proto": o.proto, "port": o.port, "action": "removed"},
         f"{o.network}: {o.proto} {o.port} removed")


def _forward_verbs(fwd: Any, verb: Any) -> None:
    a = verb(fwd, "add", do_forward_add, "forward a host port (or range) to a guest",
             change=True)
    a.add_argument("network")
    a.add_argument("proto", choices=["tcp", "udp"])
    a.add_argument("port", help='a port or a range such as "8000-8010"')
    a.add_argument("to", metavar="TO[:TO_PORT]",
                   help="guest address or static DHCP host name, optional guest port "
                        "([IPV6]:PORT for IPv6)")
    a.add_argument("--persist", action="store_true",
                   help="write it into the network's file (default: kept until removed)")
    r = verb(fwd, "remove", do_forward_remove, "remove a port forward", change=True)
    r.add_argument("network")
    r.add_argument("proto", choices=["tcp", "udp"])
    r.add_argument("port", help="its (first) host port")
    verb(fwd, "list", do_forward_list, "list port forwards", True).add_argument(
        "network", nargs="?", help="one network (default: all)")


def do_version(c: Client, o: argparse.Namespace) -> None:
    print(c.call("Version"))


def simple(method: str, *attrs: str) -> Any:
    def run(c: Client, o: argparse.Namespace) -> None:
        c.call(method, *[getattr(o, a) for a in attrs])
    return run


def _network_verbs(net: Any, verb: Any) -> None:
    verb(net, "list", do_network_list, "list networks", True)
    verb(net, "show", do_network_show, "show one network", True).add_argument("name")
    verb(net, "start", do_network_start, "start a network", change=True).add_argument("name")
    verb(net, "stop", do_network_stop, "stop a network", change=True).add_argument("name")
    d = verb(net, "define", do_network_define, "define a network from a TOML file ('-': stdin)",
             change=True)
    d.add_argument("file")
    d.add_argument("--runtime", action="store_true", help="until the next restart only")
    u = verb(net, "undefine", do_network_undefine, "remove a network", change=True)
    u.add_argument("name")
    u.add_argument("--runtime", action="store_true", help="keep the persistent definition")
    from kvmnetd.cli_libvirt import add_verbs as add_libvirt_verbs

    add_libvirt_verbs(net, verb)


def _port_verbs(port: Any, verb: Any) -> None:
    a = verb(port, "attach", do_port_attach, "attach an interface to a network", change=True)
    a.add_argument("ifname")
    a.add_argument("network")
    a.add_argument("--force", action="store_true", help="take it from another network")
    verb(port, "detach", do_port_detach, "detach an interface", change=True).add_argument(
        "ifname")
    m = verb(port, "move", do_port_move, "move to another network", change=True)
    m.add_argument("ifname")
    m.add_argument("network")
    lim = verb(port, "limit", do_port_limit,
               "limit a port's rate each way (kept across restarts and moves)", change=True)
    lim.add_argument("ifname")
    lim.add_argument("rate", help='e.g. 20mbit; "none": no limit; "default": the '
                                  "network's port_rate")
    verb(port, "list", do_port_list, "list ports (with the rate limit in effect)", True)
    verb(port, "stats", do_port_stats,
         "traffic counters per port, from the guest's side (tx: sent by the guest)",
         True).add_argument("ifname", nargs="?", help="one port (default: all)")


def parser(only: str | None = None) -> argparse.ArgumentParser:
    """kvmnetctl's arguments. only: the verb the command line names; the other verb
    groups are listed with their help but not filled in: a call builds its own group's
    parsers, not all ~40 (5 ms of every call)."""
    p = argparse.ArgumentParser(prog="kvmnetctl", description="Control kvmnetd.")
    p.add_argument("--bus-address", metavar="ADDR", help="use the D-Bus bus at ADDR")
    p.add_argument("--bus", action="store_true", help="use the system bus only")
    p.add_argument("-q", "--quiet", dest="quiet_all", action="store_true",
                   help="print nothing on success (errors still go to stderr)")
    p.add_argument("--socket", metavar="PATH",
                   help=f"use the control socket only (default {names.DEFAULT_SOCKET_PATH}, "
                        f"env {names.SOCKET_ENV})")
    p.add_argument("--version", action="version", version=f"kvmnetctl {__version__}")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(sub: Any, name: str, fn: Any, help: str, json_out: bool = False,
             change: bool = False) -> Any:
        v = sub.add_parser(name, help=help)
        v.set_defaults(fn=fn)
        if json_out or change:
            v.add_argument("--json", action="store_true", help="machine-readable output")
        if change:  # verbs that change something say what, in one line
            v.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
        return v

    def group(name: str, help: str) -> Any | None:
        g = verbs.add_parser(name, help=help)
        if only is not None and only != name:
            return None
        return g.add_subparsers(dest="sub", required=True, metavar="ACTION")

    verb(verbs, "status", do_status, "daemon and network overview", True)
    if (net := group("network", "networks")) is not None:
        _network_verbs(net, verb)
    if (port := group("port", "guest ports")) is not None:
        _port_verbs(port, verb)
    if (fwd := group("forward", "port forwards from the host to guests")) is not None:
        _forward_verbs(fwd, verb)
    verb(verbs, "leases", do_leases, "DHCP leases of a network", True).add_argument("network")
    verb(verbs, "doctor", do_doctor, "explain why a guest may have no network", True)
    verb(verbs, "reload", simple("Reload"), "re-read the configuration")
    verb(verbs, "log-level", simple("SetLogLevel", "level"),
         "change the daemon's verbosity until the next reload or restart").add_argument(
        "level", choices=["debug", "info", "warning", "error"])
    verb(verbs, "version", do_version, "daemon version")
    return p


def verb_of(argv: list[str]) -> str | None:
    """The verb a command line names: its first word that is neither an option nor an
    option's value; None if it has none (then every verb is built, for --help)."""
    value_next = False
    for arg in argv:
        if value_next:
            value_next = False
        elif arg in ("--bus-address", "--socket"):
            value_next = True
        elif not arg.startswith("-"):
            return arg
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    opts = parser(verb_of(args)).parse_args(args)
    try:
        opts.fn(Client(opts), opts)
    except CallFailed as exc:
        if exc.error == names.error_name("ConfigInvalid"):
            # One FILE:LINE: key: message a line, as --check-config prints them.
            print("kvmnetctl: the configuration has errors; nothing was changed:",
                  file=sys.stderr)
            print(str(exc), file=sys.stderr)
        else:
            print(f"kvmnetctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
