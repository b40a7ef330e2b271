"""A command runner that lives inside a benchmark's namespaces and times what it runs.

Reads one JSON request a line: {"argv": [...], "env": {...}}; answers
{"rc": N, "ms": wall ms of spawn + run + reap, "err": stderr tail}. Both sides of a
comparison are spawned the same way, so the spawn cost is the same on each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time


def main() -> None:
    err = tempfile.TemporaryFile()
    for line in sys.stdin:
        req = json.loads(line)
        err.seek(0)
        err.truncate()
        env = {**os.environ, **req.get("env", {})}
        t0 = time.perf_counter()
        # stdout/stderr not piped: a daemon the command starts must not hold our pipe.
        rc = subprocess.call(req["argv"], env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=err)
        ms = (time.perf_counter() - t0) * 1000
        err.seek(0)
        tail = err.read()[-400:].decode(errors="replace")
        sys.stdout.write(json.dumps({"rc": rc, "ms": ms, "err": tail}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
