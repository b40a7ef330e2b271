"""The one way kvmnetd runs `nft`: our table, the foreign chains, the monitor and the doctor.

nft runs in the network namespace of the thread that calls these functions (the child
inherits it), which is how the integration tests point it at a namespace.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from kvmnetd.adapters.command import run_command
from kvmnetd.model.errors import KvmnetError

NFT = "nft"


class NftablesError(KvmnetError):
    """nft could not be run or refused a command; the message carries its stderr."""


async def run_nft(*args: str, stdin: str | None = None, nft: str = NFT,
                  timeout: float | None = None,
                  error: type[NftablesError] = NftablesError) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `nft ARGS`, with `stdin` as its input (`-f -`).

    A refusal is the caller's to judge from the status; only a missing binary or a
    timeout raises `error` here.
    """
    return await run_command(nft, *args, stdin=stdin, timeout=timeout, error=error)


async def nft_json(*args: str, nft: str = NFT, timeout: float | None = None,
                   error: type[NftablesError] = NftablesError) -> Any:
    """`nft -j ARGS` parsed; `error` when nft fails or prints what is not JSON."""
    rc, out, err = await run_nft("-j", *args, nft=nft, timeout=timeout, error=error)
    if rc != 0:
        raise error(f"nft -j {' '.join(args)} failed: {err.strip()}")
    try:
        return json.loads(out) if out.strip() else {}
    except ValueError as e:
        raise error(f"nft printed JSON we cannot read: {e}") from e


async def spawn_monitor(nft: str = NFT) -> asyncio.subprocess.Process:
    """`nft monitor ruleset`, its lines on stdout; OSError when nft cannot be run."""
    return await asyncio.create_subprocess_exec(
        nft, "monitor", "ruleset", stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
