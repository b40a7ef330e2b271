"""Run every benchmark; one JSON document on stdout, progress on stderr.

    bench/run [--quick] [--only NAME[,NAME...]]      (as root, from anywhere)
"""

from __future__ import annotations

import argparse
import compileall
import importlib
import json
import os
import sys
import time
import traceback
from typing import Any

from bench.common import log, machine

ORDER = ("tap_attach", "hook", "first_lease", "restart", "scale", "control", "heal", "idle",
         "api_burst", "rate_cost", "forwards", "overlay", "evpn", "spoof_cost", "frr_rest")
TAKES_PORTS = ("hook",)  # benchmarks with a --ports parameter


def main() -> int:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer repetitions (about 2 minutes)")
    p.add_argument("--only", help="comma-separated subset of: " + ", ".join(ORDER))
    p.add_argument("--ports", type=int, default=0,
                   help="guest ports already attached while " + ", ".join(TAKES_PORTS) + " runs")
    args = p.parse_args()
    if os.geteuid() != 0:
        p.error("run as root: the benchmarks make network namespaces")
    names = args.only.split(",") if args.only else list(ORDER)
    # Children must not write into the JSON document: fd 1 goes to stderr meanwhile.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    doc: dict[str, Any] = {"machine": machine(), "quick": args.quick,
                           "command": " ".join(["bench/run", *sys.argv[1:]]),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": {}}
    # An installed package comes byte-compiled (scripts/build-deb), so the tree the daemon
    # runs from here is too: where PYTHONDONTWRITEBYTECODE is set, every start would
    # otherwise compile the sources first, and start-up figures would count that.
    compileall.compile_dir(os.path.join(os.path.dirname(__file__), "..", "kvmnetd"),
                           quiet=1, workers=0)
    t_all = time.perf_counter()
    failed = False
    for name in names:
        log(f"== {name}")
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(f"bench.{name}")
            extra = {"ports": args.ports} if name in TAKES_PORTS else {}
            res = mod.run(args.quick, **extra)
        except Exception as e:
            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}"}
            failed = True
        res["seconds"] = round(time.perf_counter() - t0, 1)
        doc["results"][name] = res
        log(f"== {name} done in {res['seconds']} s")
    doc["seconds"] = round(time.perf_counter() - t_all, 1)
    doc["goals"] = {n: doc["results"][n].get("goal_met", doc["results"][n].get("goal_rss_met"))
                    for n in names}
    json.dump(doc, out, indent=2)
    out.write("\n")
    out.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
