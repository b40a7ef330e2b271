"""Running a tool kvmnetd drives (nft, tc, ip): its status and output, never a traceback.

The child inherits the calling thread's network namespace, which is how the
integration tests point a tool at a namespace.
"""

from __future__ import annotations

import asyncio

from kvmnetd.model.errors import KvmnetError


async def run_command(cmd: str, *args: str, stdin: str | None = None,
                      timeout: float | None = None,
                      error: type[KvmnetError] = KvmnetError) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `cmd ARGS`, with `stdin` as its input.

    A refusal is the caller's to judge from the status; only a missing binary or a
    timeout raises `error` here.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            cmd, *args,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    except OSError as e:
        raise error(f"cannot run {cmd}: {e}") from e
    data = stdin.encode() if stdin is not None else None
    try:
        out, err = await asyncio.wait_for(proc.communicate(data), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise error(f"{cmd} did not answer within {timeout:g}s") from None
    rc = proc.returncode if proc.returncode is not None else -1
    return rc, out.decode(errors="replace"), err.decode(errors="replace")
