"""Rate limits on guest ports, through iproute2's `tc` and `ip` in batch mode.

Towards the guest: a tbf as the port's root qdisc. From the guest: the port's ingress
is redirected (u32 match-all + mirred) to an ifb device of its own, whose root is a tbf.
Both are shapers: a policer (nft `limit rate over ... drop`) let TCP through at about
1.8 times its rate here, a shaper holds it within a few percent.

`tc` runs in the calling thread's network namespace, like nft (nft_run.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from kvmnetd.adapters.command import run_command
from kvmnetd.model.errors import KvmnetError
from kvmnetd.model.rate import SetPortRate

TC = "tc"
IP = "ip"
# tbf's bucket: 20 ms of the rate, at least a few full-size frames; its queue: 50 ms
# more. TCP then reaches the rate without a standing queue growing latency much.
BURST_TIME = 0.02
MIN_BURST = 32 * 1024
QUEUE_TIME = 0.05
MIN_QUEUE = 64 * 1024


_FAILED_LINE = re.compile(r"^Command failed -:(\d+)", re.MULTILINE)


class TcError(KvmnetError):
    """tc or ip could not be run or refused a command; the message carries its stderr."""


def tbf_options(rate: int) -> str:
    burst = max(int(rate * BURST_TIME), MIN_BURST)
    limit = burst + max(int(rate * QUEUE_TIME), MIN_QUEUE)
    return f"tbf rate {rate}bps burst {burst} limit {limit}"


def set_commands(ifname: str, ifb: str, rate: int) -> list[str]:
    """The tc commands of a limit, each of which must succeed.

    The ingress qdisc is made anew (after `stale_commands`), so no stale redirect (to an
    ifb that was deleted) survives; for that instant the guest's traffic is not limited,
    never dropped.
    """
    tbf = tbf_options(rate)
    return [f"qdisc replace dev {ifname} root {tbf}",
             f"qdisc replace dev {ifb} root {tbf}",
             f"qdisc add dev {ifname} handle ffff: ingress",
             f"filter add dev {ifname} parent ffff: protocol all pref 1 u32 match u32 0 0 "
             f"action mirred egress redirect dev {ifb}"]


def stale_commands(ifname: str) -> list[str]:
    """Before a limit: its old redirect goes (an error here only means there was none)."""
    return [f"qdisc del dev {ifname} ingress"]


def clear_commands(ifname: str) -> list[str]:
    return [f"qdisc del dev {ifname} root", f"qdisc del dev {ifname} ingress"]


def qdiscs_by_device(qdiscs: list[dict[str, Any]]) -> dict[str, tuple[int | None, bool]]:
    """`tc -j qdisc show` -> device -> (its root tbf's rate in bytes/s, has an ingress
    qdisc), for devices with either. tc prints rates as bytes/s in JSON."""
    out: dict[str, tuple[int | None, bool]] = {}
    for q in qdiscs:
        dev = q.get("dev") if isinstance(q, dict) else None
        if not isinstance(dev, str):
            continue
        rate, ingress = out.get(dev, (None, False))
        if q.get("kind") == "tbf" and q.get("root"):
            got = (q.get("options") or {}).get("rate")
            rate = got if isinstance(got, int) else rate
        elif q.get("kind") == "ingress":
            ingress = True
        else:
            continue
        out[dev] = (rate, ingress)
    return out


class TcRates:
    """The RatePort of the reconciler (engine/interfaces.py)."""

    def __init__(self, tc: str = TC, ip: str = IP) -> None:
        self.tc = tc
        self.ip = ip
        self.writes = 0

    async def _run(self, cmd: str, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
        return await run_command(cmd, *args, stdin=stdin, error=TcError)

    async def _batch(self, cmd: str, lines: list[str]) -> dict[int, str]:
        """Run lines through `CMD -force -batch -`: index of each line that failed -> why."""
        if not lines:
            return {}
        self.writes += 1
        rc, _, err = await self._run(cmd, "-force", "-batch", "-", stdin="\n".join(lines) + "\n")
        if rc == 0:
            return {}
        failed: dict[int, str] = {}
        why: list[str] = []
        for text in err.splitlines():
            m = _FAILED_LINE.match(text)
            if m is None:
                why.append(text.strip())
            else:
                failed[int(m.group(1)) - 1] = "; ".join(w for w in why if w) or "refused"
                why = []
        # No line named: count them all as failed.
        return failed or dict.fromkeys(range(len(lines)), err.strip() or "refused")

    async def observe(self) -> dict[str, tuple[int | None, bool]]:
        rc, out, err = await self._run(self.tc, "-j", "qdisc", "show")
        if rc != 0:
            raise TcError(f"tc qdisc show failed: {err.strip()}")
        try:
            qdiscs = json.loads(out) if out.strip() else []
        except ValueError as e:
            raise TcError(f"tc printed JSON we cannot read: {e}") from e
        return qdiscs_by_device(qdiscs if isinstance(qdiscs, list) else [])

    async def apply(self, action: SetPortRate) -> None:
        err = (await self.apply_many([action]))[0]
        if err is not None:
            raise err

    async def apply_many(self, actions: Sequence[SetPortRate]) -> list[BaseException | None]:
        """Every port's limit in four batches, however many ports: a burst of 1,000 taps
        costs four processes, not 3,000."""
        sets = [a for a in actions if a.rate is not None]
        clears = [a for a in actions if a.rate is None]
        # The ifbs first: the redirects name them. "File exists" is fine (the name is
        # kvmnetd's), so their result is judged by the tc lines that need them.
        await self._batch(self.ip, [line for a in sets
                                    for line in (f"link add {a.ifb} type ifb",
                                                 f"link set {a.ifb} up")])
        harmless = [line for a in sets for line in stale_commands(a.ifname)]
        harmless += [line for a in clears for line in clear_commands(a.ifname)]
        await self._batch(self.tc, harmless)
        await self._batch(self.ip, [f"link del {a.ifb}" for a in clears])
        owner: list[int] = []  # line -> index in `sets`
        needed: list[str] = []
        for i, a in enumerate(sets):
            assert a.rate is not None
            lines = set_commands(a.ifname, a.ifb, a.rate)
            needed += lines
            owner += [i] * len(lines)
        bad: dict[int, str] = {}
        for n, why in (await self._batch(self.tc, needed)).items():
            if n < len(owner):
                bad.setdefault(owner[n], f"{needed[n]}: {why}")
        if bad:
            # Half a limit is worse than none (a redirect to a missing ifb drops all the
            # guest sends): a port that failed is left unlimited, and its ifb removed.
            await self._batch(self.tc, [line for i in sorted(bad)
                                        for line in clear_commands(sets[i].ifname)])
            await self._batch(self.ip, [f"link del {sets[i].ifb}" for i in sorted(bad)])
        errors: dict[int, BaseException] = {
            id(sets[i]): TcError(f"tc refused the rate limit of {sets[i].ifname}: {why}")
            for i, why in bad.items()}
        return [errors.get(id(a)) for a in actions]
