"""kvmnetd's entry point: the command line, --check-config and signals; runs in the foreground.

service.Service is the composition root: it builds the adapters and wires their events.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import sys

import structlog

from kvmnetd import __version__, logsetup
from kvmnetd.config import load as cfg
from kvmnetd.model.errors import ConfigError

log = structlog.get_logger("kvmnetd")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmnetd", description="Guest networks for KVM hosts.")
    p.add_argument("--config", help="main config file (default /etc/kvmnetd/kvmnetd.toml)")
    p.add_argument("--networks-dir", help="directory of *.toml network files")
    p.add_argument("--run-dir", help="runtime state (default /run/kvmnetd)")
    p.add_argument("--state-dir", help="persistent data such as leases (default /var/lib/kvmnetd)")
    p.add_argument("--bus-address", help="D-Bus address instead of the system bus")
    p.add_argument("--no-bus", action="store_true", help="serve the control socket only")
    p.add_argument("--log-format", choices=["kv", "json", "journal"])
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--check-config", metavar="FILE", nargs="?", const="",
                   help="validate the config and exit (non-zero on errors)")
    p.add_argument("--apply-once", action="store_true", help="converge, then exit")
    p.add_argument("--print-introspection", action="store_true",
                   help="print the D-Bus introspection XML and exit")
    p.add_argument("--version", action="version", version=f"kvmnetd {__version__}")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parser().parse_args(argv)


def overrides_from(args: argparse.Namespace) -> dict[str, str]:
    pairs = {"run_dir": args.run_dir, "state_dir": args.state_dir,
             "bus_address": args.bus_address, "log_format": args.log_format,
             "log_level": args.log_level, "networks_dir": args.networks_dir}
    return {k: v for k, v in pairs.items() if v is not None}


def config_paths(args: argparse.Namespace) -> tuple[str, str | None]:
    config_file = args.config or "/etc/kvmnetd/kvmnetd.toml"
    return config_file, args.networks_dir


SWITCH_INTERVAL = 0.0005


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_introspection:
        from kvmnetd.control.introspect import introspection_xml

        sys.stdout.write(introspection_xml())
        return 0
    if args.check_config is not None:
        return check_config(args)
    if args.config and not os.path.exists(args.config):
        # Only the default path may be absent (the built-in default network then).
        print(f"kvmnetd: {args.config}: no such config file", file=sys.stderr)
        return 1
    # Until the config is read; then its [daemon] log settings apply (the command line wins).
    logsetup.setup(args.log_format or logsetup.default_format(), args.log_level or "info")
    # The netlink sender thread needs the GIL for a moment after each wake-up; while the
    # loop reads a burst of events it would otherwise wait up to the default 5 ms for it.
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        return asyncio.run(run(args))
    except ConfigError as e:
        print(f"kvmnetd: refusing to start, the configuration has errors:\n{e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def check_config(args: argparse.Namespace) -> int:
    config_file, networks_dir = config_paths(args)
    if args.check_config:
        config_file = args.check_config
    if (args.check_config or args.config) and not os.path.exists(config_file):
        print(f"{config_file}: no such config file", file=sys.stderr)
        return 1
    try:
        conf = asyncio.run(_load_with_routes(config_file, networks_dir, overrides_from(args)))
    except ConfigError as e:
        for issue in e.issues:
            print(issue, file=sys.stderr)
        return 1
    names = ", ".join(sorted(conf.networks)) or "none"
    print(f"{config_file}: ok ({len(conf.networks)} networks: {names})")
    return 0


async def _load_with_routes(config_file: str, networks_dir: str | None,
                           overrides: dict[str, str]) -> cfg.Config:
    from kvmnetd.adapters.default_subnet import DefaultSubnetFile
    from kvmnetd.adapters.rtnl.adapter import NetlinkAdapter
    from kvmnetd.config.host_routes import load_config

    nl = NetlinkAdapter()
    await nl.open(lambda: None)
    try:
        # The default subnet a running daemon would use; checking never writes state.
        return load_config(config_file, networks_dir, overrides, nl.observed,
                           DefaultSubnetFile(writable=False))
    finally:
        await nl.close()


async def run(args: argparse.Namespace) -> int:
    from kvmnetd.service import Service

    config_file, networks_dir = config_paths(args)
    svc = Service(config_file, networks_dir, overrides_from(args), no_bus=args.no_bus)
    # Handlers first: a SIGTERM right after READY must stop us cleanly, not kill us.
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, svc.request_reload)
    await svc.start()
    if args.apply_once:
        failed = svc.failed_networks()
        await svc.close(teardown=False)
        if failed:
            print(f"kvmnetd: failed networks: {', '.join(failed)}", file=sys.stderr)
        return 1 if failed else 0
    # What start-up made (modules, config, the mirror) lives as long as the process:
    # the collector's full passes stop walking it (16 ms each, and they fell in bursts).
    gc.freeze()
    runner = asyncio.create_task(svc.run())
    await stop.wait()
    runner.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await runner
    await svc.close(teardown=svc.core.config.settings.teardown_on_stop)
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
