"""A state machine against one real daemon, driven by kvmnetctl over the control socket.

Rules define, undefine, start and stop networks and attach, move and detach veth
ports; a model says what must hold. After every step: each port is on its network's
bridge (or none), our table equals the rendering of the active networks, only active
networks have a bridge, one dnsmasq per active DHCP network, and a foreign nft table
plus an iptables rule are byte-identical. Refusals exit 1 and change nothing.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from kvmnetd import cli
from kvmnetd.config import load as cfg
from kvmnetd.model.desired import Settings
from kvmnetd.plan.nft import fingerprint, render_ruleset
from tests.support.netns import netns, sh, veth_into
from tests.support.rig import Sandbox

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TABLE = "kvmnetd"
TEMPLATES = {
    "sa": ("nat", "kvsa0", "10.81.0.1/24", True, False),
    "sb": ("isolated", "kvsb0", "10.82.0.1/24", False, False),
    "sc": ("routed", "kvsc0", "10.83.0.1/24", True, False),
    "sd": ("nat", "kvsd0", "10.84.0.1/24", False, True),
}
PORTS = ("sp0", "sp1", "sp2", "sp3")
NAMES = (*TEMPLATES, "nosuch")

FOREIGN = """
table inet foreign {
    chain guard {
        type filter hook forward priority 10; policy accept;
        ip saddr 192.0.2.0/24 counter accept comment "someone else's"
    }
}
"""


def template(name: str) -> str:
    mode, bridge, ipv4, autostart, dhcp = TEMPLATES[name]
    text = (f'[network.{name}]\nmode = "{mode}"\nbridge = "{bridge}"\nipv4 = "{ipv4}"\n'
            f"autostart = {'true' if autostart else 'false'}\n")
    if dhcp:
        text += f"[network.{name}.dhcp]\n"
    return text + f"[network.{name}.dns]\nenabled = false\n"


EMPTY = cfg.Config(settings=Settings(), networks={}, rules=(), files=())
NETS = {n: cfg.parse_network_text(template(n), "<t>", EMPTY) for n in TEMPLATES}
_listing: dict[frozenset[str], str] = {}


def expected_table(active: frozenset[str]) -> str:
    """What `nft list table` prints for the rendering of these networks."""
    if active not in _listing:
        with netns("r") as ns:
            nets = [NETS[n] for n in sorted(active)]
            sh("nft", "-f", "-", ns=ns, input=render_ruleset(nets, TABLE))
            _listing[active] = sh("nft", "list", "table", "inet", TABLE, ns=ns).stdout
    return _listing[active]


def foreign_state(ns: str) -> tuple[str, str]:
    table = sh("nft", "list", "table", "inet", "foreign", ns=ns).stdout
    ipt = sh("iptables-save", ns=ns).stdout
    return table, "\n".join(ln for ln in ipt.splitlines() if not ln.startswith("#"))


def dnsmasq_confs(run_dir: Path) -> list[str]:
    prefix = f"--conf-file={run_dir}/"
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode() for a in f.read().split(b"\0") if a]
            out += [a[len(prefix):-5] for a in argv[1:] if a.startswith(prefix)
                    and os.path.basename(argv[0]) == "dnsmasq"]
    return sorted(out)


class Daemon(RuleBasedStateMachine):
    box: Sandbox
    foreign: tuple[str, str]
    steps = 0

    def __init__(self) -> None:
        super().__init__()
        box = self.box
        box.write_config("")
        box.start_daemon("--no-bus")
        self.defined: dict[str, bool] = {}  # name -> persisted
        self.active: set[str] = set()
        self.requests: dict[str, str] = {}  # port -> network asked for (explicit)

    # ---- the client ----------------------------------------------------------------------

    def ctl(self, *args: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(["--socket", str(self.box.run_dir / "control.sock"), *args])
        type(self).steps += 1
        return rc, out.getvalue(), err.getvalue()

    def ok(self, *args: str) -> str:
        rc, out, err = self.ctl(*args)
        assert rc == 0, (args, err)
        return out

    def refused(self, *args: str, says: str) -> None:
        before = self.snapshot()
        rc, _, err = self.ctl(*args)
        assert rc == 1, (args, rc, err)
        assert says in err, (args, err)
        assert self.snapshot() == before

    def snapshot(self) -> tuple[Any, ...]:
        return (self.ok("network", "list", "--json"), self.ok("port", "list", "--json"),
                sorted((lk["ifname"], lk.get("master")) for lk in json.loads(
                    sh("ip", "-j", "link", ns=self.box.host).stdout)),
                sh("nft", "list", "ruleset", ns=self.box.host).stdout)

    def attached(self) -> dict[str, str]:
        return {p: n for p, n in self.requests.items() if n in self.active}

    # ---- rules ---------------------------------------------------------------------------

    @rule(name=st.sampled_from(list(TEMPLATES)), persist=st.booleans())
    def define(self, name: str, persist: bool) -> None:
        path = self.box.tmp / f"{name}.toml"
        path.write_text(template(name))
        args = ["network", "define", str(path)] + ([] if persist else ["--runtime"])
        if name in self.defined:
            self.refused(*args, says="already exists")
            return
        kept = "persistent" if persist else "runtime"
        assert self.ok(*args).strip() == f"{name}: defined ({kept})"
        self.defined[name] = persist
        if TEMPLATES[name][3]:
            self.active.add(name)

    @rule(name=st.sampled_from(NAMES), persist=st.booleans())
    def undefine(self, name: str, persist: bool) -> None:
        args = ["network", "undefine", name] + ([] if persist else ["--runtime"])
        if name not in self.defined:
            self.refused(*args, says="no network named")
        elif self.defined[name] and not persist:
            self.refused(*args, says="undefine it with persist")
        else:
            self.ok(*args)
            del self.defined[name]
            self.active.discard(name)
            self.requests = {p: n for p, n in self.requests.items() if n != name}

    @rule(name=st.sampled_from(NAMES))
    def start(self, name: str) -> None:
        if name not in self.defined:
            self.refused("network", "start", name, says="no network named")
            return
        self.ok("network", "start", name)
        self.active.add(name)

    @rule(name=st.sampled_from(NAMES))
    def stop(self, name: str) -> None:
        if name not in self.defined:
            self.refused("network", "stop", name, says="no network named")
            return
        self.ok("network", "stop", name)
        self.active.discard(name)

    def _attach_refusal(self, name: str) -> str | None:
        if name not in self.defined:
            return "no network named"
        if name not in self.active:
            return "not started"
        return None

    @rule(port=st.sampled_from(PORTS), name=st.sampled_from(NAMES))
    def attach(self, port: str, name: str) -> None:
        why = self._attach_refusal(name)
        if why:
            self.refused("port", "attach", port, name, says=why)
            return
        self.ok("port", "attach", port, name)
        self.requests[port] = name

    @rule(port=st.sampled_from(PORTS), name=st.sampled_from(NAMES))
    def move(self, port: str, name: str) -> None:
        why = "not attached" if port not in self.attached() else self._attach_refusal(name)
        if why:
            self.refused("port", "move", port, name, says=why)
            return
        self.ok("port", "move", port, name)
        self.requests[port] = name

    @rule(port=st.sampled_from(PORTS))
    def detach(self, port: str) -> None:
        if port not in self.attached():
            self.refused("port", "detach", port, says="not attached")
            return
        self.ok("port", "detach", port)
        del self.requests[port]

    # ---- invariants ----------------------------------------------------------------------

    @invariant()
    def host_matches_model(self) -> None:
        host = self.box.host
        links = {lk["ifname"]: lk for lk in json.loads(
            sh("ip", "-j", "-d", "link", ns=host).stdout)}
        attached = self.attached()
        for port in PORTS:
            want = NETS[attached[port]].bridge if port in attached else None
            assert links[port].get("master") == want, (port, links[port].get("master"), want)
        bridges = {n for n, v in links.items()
                   if v.get("linkinfo", {}).get("info_kind") == "bridge"}
        assert bridges == {NETS[n].bridge for n in self.active}
        active = frozenset(self.active)
        r = sh("nft", "list", "table", "inet", TABLE, ns=host, check=False)
        if active:
            assert r.stdout == expected_table(active)
            fp = fingerprint([NETS[n] for n in sorted(active)], TABLE)
            assert f'comment "kvmnetd {fp}"' in r.stdout
        else:
            assert r.returncode != 0, "our table outlived every network"
        assert foreign_state(host) == self.foreign
        want_dns = sorted(n for n in active if TEMPLATES[n][4])
        assert dnsmasq_confs(self.box.run_dir) == want_dns

    @invariant()
    def daemon_agrees(self) -> None:
        nets = json.loads(self.ok("network", "list", "--json"))
        assert {n["name"]: n["state"] for n in nets} == {
            n: "active" if n in self.active else "inactive" for n in self.defined}
        ports = json.loads(self.ok("port", "list", "--json"))
        assert {p["ifname"]: (p["network"], p["state"]) for p in ports} == {
            p: (n, "attached") for p, n in self.attached().items()}
        on_disk = {p.stem for p in self.box.networks_dir.glob("*.toml")}
        assert on_disk == {n for n, persisted in self.defined.items() if persisted}

    def teardown(self) -> None:
        try:
            for name in list(self.defined):
                self.undefine(name, True)
            self.host_matches_model()
        finally:
            self.box.stop_daemon()


@pytest.fixture
def machine_box(scratch_dir: Path) -> Iterator[Sandbox]:
    with Sandbox(scratch_dir) as box:
        peers = box.stack.enter_context(netns("p"))
        for i, port in enumerate(PORTS):
            veth_into(box.host, peers, port, f"eth{i}")
        sh("nft", "-f", "-", ns=box.host, input=FOREIGN)
        sh("iptables", "-A", "FORWARD", "-s", "192.0.2.0/24", "-j", "ACCEPT", ns=box.host)
        yield box


def test_daemon_follows_its_model(machine_box: Sandbox) -> None:
    Daemon.box = machine_box
    Daemon.foreign = foreign_state(machine_box.host)
    Daemon.steps = 0
    run_state_machine_as_test(Daemon, settings=settings(
        max_examples=int(os.environ.get("KVMNETD_STATEFUL_EXAMPLES", "10")),
        stateful_step_count=15, deadline=None, database=None,
        phases=[Phase.explicit, Phase.generate]))  # no shrinking: it costs minutes here
    print(f"STATEFUL kvmnetctl calls={Daemon.steps}")
