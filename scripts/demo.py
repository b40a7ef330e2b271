"""The demo: kvmnetd with its built-in default network, two real guests, an upstream host.

Everything runs in throwaway network namespaces; the machine's own network is never touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.dbus import start_bus, stop_bus  # noqa: E402
from tests.support.guest import Guest, guest_images  # noqa: E402
from tests.support.rig import FAR_HOST, Sandbox  # noqa: E402


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def show(box: Sandbox, *args: str) -> str:
    cmd = ["ip", "netns", "exec", box.host, *box.cli_argv(), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    print("$ kvmnetctl " + " ".join(args))
    print(out.rstrip())
    return out


def main() -> int:
    say("building the tiny guest (Debian kernel + busybox initramfs; cached after the first run)")
    images = guest_images()
    scratch = Path(tempfile.mkdtemp(prefix="kvmnetd-demo-", dir="/tmp"))
    os.chmod(scratch, 0o755)
    with Sandbox(scratch) as box:
        bus = start_bus(str(scratch))
        try:
            say(f"host namespace {box.host}: uplink 198.51.100.1/24 to an upstream router; "
                f"far host {FAR_HOST}")
            t0 = time.monotonic()
            box.start_daemon("--bus-address", bus.address)  # no config file: built-in default
            print(f"kvmnetd ready in {time.monotonic() - t0:.2f} s with its built-in default "
                  "network")
            show(box, "network", "list")
            env = {"DBUS_SYSTEM_BUS_ADDRESS": bus.address,
                   "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
            ifup, ifdown = str(REPO / "contrib/qemu-ifup"), str(REPO / "contrib/qemu-ifdown")
            say("booting two guests with script=contrib/qemu-ifup (qemu under TCG)")
            with Guest.boot("guest1", box.host, "vnet1", "52:54:00:de:00:01", ifup=ifup,
                            ifdown=ifdown, images=images, env=env, hostname="guest1") as g1, \
                 Guest.boot("guest2", box.host, "vnet2", "52:54:00:de:00:02", ifup=ifup,
                            ifdown=ifdown, images=images, env=env, hostname="guest2") as g2:
                l1, l2 = g1.lease(timeout=60), g2.lease(timeout=60)
                print(f"guest1 leased {l1['ip']}/{l1['mask']} router {l1['router']}")
                print(f"guest2 leased {l2['ip']}/{l2['mask']} router {l2['router']}")
                say("guests reach each other, the gateway and the upstream host")
                for g, name, target in ((g1, "guest1", l2["ip"]), (g2, "guest2", l1["ip"]),
                                        (g1, "guest1", l1["router"]), (g1, "guest1", FAR_HOST),
                                        (g2, "guest2", FAR_HOST)):
                    print(f"{name} -> {target}: {'ok' if g.ping(target) else 'FAILED'}")
                for g, name in ((g1, "guest1"), (g2, "guest2")):
                    rc, out = g.run(f"nc -w 3 {FAR_HOST} 9999 </dev/null")
                    seen = out[0].strip() if rc == 0 and out else "nothing"
                    print(f"the upstream host sees {name} as {seen} (the host's uplink: NAT)")
                say("what kvmnetd reports")
                show(box, "status")
                show(box, "port", "list")
                show(box, "leases", "default")
                leases = json.loads(show(box, "leases", "default", "--json"))
                ok = len(leases) >= 2
            print("\ndemo finished: namespaces, guests and processes are being removed")
            return 0 if ok else 1
        finally:
            stop_bus(bus)


if __name__ == "__main__":
    sys.exit(main())
