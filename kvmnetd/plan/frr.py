"""kvmnetd's part of FRR's configuration for evpn overlays. Pure: text in, text out.

kvmnetd owns the lines it renders inside one `router bgp ASN` instance (the default
VRF's) and nothing else. FRR has no include, so the part is applied by merging it into
FRR's running configuration: every other line (route maps, other daemons, lines written
by hand inside the same instance) is carried through unchanged, and only lines kvmnetd
wrote before and no longer renders are taken out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from kvmnetd.model.desired import Network
from kvmnetd.model.overlay import HostOverlay

EVPN = "address-family l2vpn evpn"
# zebra sends bgpd MAC/IP changes in batches every coalesce-time ms (default 1,000 in
# FRR 8): 100 keeps a moved guest's route out within the live-move goal.
COALESCE_MS = 100

# A line in `router bgp`: (section, text). Section "" is the router level, else the
# address-family line that opens it.
Line = tuple[str, str]


@dataclass(frozen=True)
class FrrPart:
    """What kvmnetd wants in FRR: its lines of one BGP instance."""

    asn: int
    router_id: str
    neighbors: tuple[str, ...]
    bfd: bool
    lines: tuple[Line, ...]

    @property
    def header(self) -> str:
        return f"router bgp {self.asn}"

    def text(self) -> str:
        """The part alone, as FRR prints it (for status and a reader's eye)."""
        return render_block(self.asn, group(self.lines))

    def to_json(self) -> dict[str, object]:
        return {"asn": self.asn, "router_id": self.router_id, "neighbors": list(self.neighbors),
                "bfd": self.bfd, "lines": [list(x) for x in self.lines]}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> FrrPart:
        asn, rid, nbrs, lines = data["asn"], data["router_id"], data["neighbors"], data["lines"]
        if not (isinstance(asn, int) and isinstance(rid, str) and isinstance(nbrs, list)
                and isinstance(lines, list)):
            raise ValueError("not an FRR part record")
        return cls(asn, rid, tuple(str(n) for n in nbrs), bool(data.get("bfd")),
                   tuple((str(s), str(t)) for s, t in lines))


def evpn_networks(networks: Iterable[Network]) -> list[Network]:
    return [n for n in networks if n.overlay is not None and n.overlay.mode == "evpn"]


def frr_part(host: HostOverlay | None, networks: Iterable[Network]) -> FrrPart | None:
    """kvmnetd's part for this host, or None when no network uses evpn (then kvmnetd
    keeps nothing in FRR)."""
    if host is None or host.asn is None or not evpn_networks(networks):
        return None
    local = str(host.local)
    neighbors = tuple(str(n) for n in sorted(set(host.neighbors)) if n != host.local)
    asn = host.asn
    lines: list[Line] = [
        ("", f"bgp router-id {local}"),
        ("", "no bgp default ipv4-unicast"),
        ("", f"coalesce-time {COALESCE_MS}"),
    ]
    for n in neighbors:
        # iBGP between the hosts of one fabric (or towards route reflectors): one ASN.
        lines.append(("", f"neighbor {n} remote-as {asn}"))
        lines.append(("", f"neighbor {n} update-source {local}"))
        if host.bfd:
            lines.append(("", f"neighbor {n} bfd"))
    lines += [(EVPN, f"neighbor {n} activate") for n in neighbors]
    # Every VNI zebra sees (our VXLAN devices) is advertised: a new network needs no
    # change here.
    lines.append((EVPN, "advertise-all-vni"))
    return FrrPart(asn, local, neighbors, host.bfd, tuple(lines))


def part_problem(part: FrrPart) -> str | None:
    """Why a render must not be applied (empty or partial), or None."""
    have = set(part.lines)
    if not part.lines or part.asn <= 0:
        return "the render is empty"
    ipaddress.IPv4Address(part.router_id)
    needed = [("", f"bgp router-id {part.router_id}"), (EVPN, "advertise-all-vni")]
    for n in part.neighbors:
        needed += [("", f"neighbor {n} remote-as {part.asn}"), (EVPN, f"neighbor {n} activate")]
    missing = [t for t in needed if t not in have]
    if missing:
        return f"the render lacks {missing[0][1]!r}"
    return None


def group(lines: Iterable[Line]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"": []}
    for section, text in lines:
        out.setdefault(section, []).append(text)
    return out


def render_block(asn: int, sections: dict[str, list[str]]) -> str:
    out = [f"router bgp {asn}", *(f" {t}" for t in sections.get("", []))]
    for section, texts in sections.items():
        if section and texts:  # FRR prints no empty address-family
            out += [" !", f" {section}", *(f"  {t}" for t in texts), " exit-address-family"]
    out.append("exit")
    return "\n".join(out) + "\n"


@dataclass
class Running:
    """FRR's running configuration cut around one `router bgp ASN` block."""

    before: list[str]
    block: dict[str, list[str]] | None
    after: list[str]


def config_lines(text: str) -> list[str]:
    """The configuration proper of `show running-config` (without its banner)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Current configuration:"):
            lines = lines[i + 1:]
            break
    return [ln.rstrip() for ln in lines]


def is_config(text: str) -> bool:
    """Does this look like a whole running configuration (not an error or a fragment)?"""
    lines = [ln for ln in config_lines(text) if ln and ln != "!"]
    return bool(lines) and lines[0].startswith("frr version") and lines[-1] == "end"


def cut(lines: list[str], asn: int) -> Running:
    header = f"router bgp {asn}"
    try:
        start = lines.index(header)
    except ValueError:
        return Running(list(lines), None, [])
    end = start + 1
    while end < len(lines) and lines[end] != "exit" and not (
            lines[end] and not lines[end][0].isspace()):
        end += 1
    block: dict[str, list[str]] = {"": []}
    section = ""
    for raw in lines[start + 1:end]:
        text = raw.strip()
        if not text or text == "!":
            continue
        if text.startswith("address-family "):
            section = text
            block.setdefault(section, [])
        elif text == "exit-address-family":
            section = ""
        else:
            block.setdefault(section, []).append(text)
    tail = end + 1 if end < len(lines) and lines[end] == "exit" else end
    return Running(lines[:start], block, lines[tail:])


def merge_block(block: dict[str, list[str]] | None, new: FrrPart | None,
                previous: FrrPart | None) -> dict[str, list[str]] | None:
    """The instance's lines with ours replaced: hand-written ones kept where they were,
    ours no longer wanted removed, ours missing appended. None: no instance at all."""
    want = set(new.lines) if new is not None else set()
    stale = (set(previous.lines) - want) if previous is not None else set()
    out: dict[str, list[str]] = {s: [t for t in ts if (s, t) not in stale]
                                 for s, ts in (block or {"": []}).items()}
    for section, text in new.lines if new is not None else ():
        texts = out.setdefault(section, [])
        if text not in texts:
            texts.append(text)
    if not any(out.values()):
        return None
    return out


def merged_config(running: str, new: FrrPart | None, previous: FrrPart | None) -> str | None:
    """The whole configuration FRR should run, or None when it already does."""
    lines = config_lines(running)
    changed = False
    old_asn = previous.asn if previous is not None else None
    if old_asn is not None and (new is None or new.asn != old_asn):
        # Our instance moved to another ASN, or is no longer wanted: ours come out of
        # the old one (which goes when nothing written by hand is left in it).
        cur = cut(lines, old_asn)
        if cur.block is not None:
            left = merge_block(cur.block, None, previous)
            if left != cur.block:
                changed = True
                mid = render_block(old_asn, left).splitlines() if left else []
                lines = [*cur.before, *mid, *cur.after]
        previous = None
    if new is not None:
        cur = cut(lines, new.asn)
        merged = merge_block(cur.block, new, previous)
        if merged != cur.block:
            changed = True
            mid = render_block(new.asn, merged or {}).splitlines()
            if cur.block is None:
                # A new instance goes before `end`, after everything already there.
                body = [ln for ln in cur.before if ln != "end"]
                lines = [*body, "!", *mid, "!", "end"]
            else:
                lines = [*cur.before, *mid, *cur.after]
    if not changed:
        return None
    return "\n".join(lines) + "\n"


def part_applied(running: str, part: FrrPart | None, previous: FrrPart | None) -> bool:
    """Does the running configuration hold our part (and no stale line of ours)?"""
    return merged_config(running, part, previous) is None


def delta_outside(delta: str, asns: Iterable[int]) -> list[str]:
    """Lines of frr-reload.py's --test output whose context is not our instance: a merged
    file must never change anything else."""
    headers = {f"{no}router bgp {a}" for a in asns for no in ("", "no ")}
    bad: list[str] = []
    for line in delta.splitlines():
        if not line or line[0].isspace() or line.startswith(("Lines To", "=")):
            continue
        if line not in headers:
            bad.append(line)
    return bad
