"""IPv6 forwarding under a host that learned its IPv6 default route from router adverts."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from kvmnetd.app.doctor import DoctorInput, run_checks
from kvmnetd.engine.reconciler import Reconciler
from kvmnetd.model import actions as A
from kvmnetd.model.desired import DesiredState, Mode, Network
from kvmnetd.model.observed import RTPROT_RA, Link, ObservedState, Route
from kvmnetd.model.owned import Owned
from kvmnetd.plan.planner import plan, ra_blockers
from tests.support.fakes import FakeDhcp, FakeFirewall, FakeNetlink, FakeSysctl

ETH = Link(2, "eth0", None, up=True)
DEFAULT6 = Route(ipaddress.ip_network("::/0"), oif=2, gateway="fe80::1", proto=RTPROT_RA)
V6NAT = Network("six", Mode.NAT, "kvbr6", ipv4=ipaddress.IPv4Interface("10.0.6.1/24"),
                ipv6=ipaddress.IPv6Interface("fd00:6::1/64"))
V4NAT = Network("four", Mode.NAT, "kvbr4", ipv4=ipaddress.IPv4Interface("10.0.4.1/24"))


def obs(accept_ra: int | None, forwarding6: bool = False, proto: int = RTPROT_RA
        ) -> ObservedState:
    o = ObservedState(links={2: ETH}, forwarding={4: True, 6: forwarding6},
                      routes={Route(DEFAULT6.dst, oif=2, gateway="fe80::1", proto=proto)})
    if accept_ra is not None:
        o.accept_ra["eth0"] = accept_ra
    return o


def desired(*nets: Network) -> DesiredState:
    return DesiredState(networks={n.name: n for n in nets}, active=frozenset(n.name for n in nets))


def forwarding6(p: object) -> list[A.Action]:
    return [a for a in p.actions  # type: ignore[attr-defined]
            if isinstance(a, A.SetForwarding) and a.family == 6]


def test_refuses_ipv6_forwarding_while_the_kernel_takes_ras() -> None:
    p = plan(desired(V6NAT, V4NAT), obs(accept_ra=1), Owned())
    assert forwarding6(p) == []
    assert "four" not in p.problems, "a network without IPv6 is not concerned"
    why = p.problems["six"]
    assert "eth0" in why and "accept_ra=1" in why
    assert "sysctl -w net.ipv6.conf.eth0.accept_ra=2" in why


@pytest.mark.parametrize(("accept_ra", "forwarding", "proto"), [
    (2, False, RTPROT_RA),  # accepts RAs with forwarding on too
    (0, False, RTPROT_RA),  # a daemon (NetworkManager, networkd) handles RAs itself
    (None, False, RTPROT_RA),  # not known: no claim
    (1, False, 4),  # a static default route: nothing to lose
    (1, True, RTPROT_RA),  # already on: kvmnetd changes nothing (doctor warns)
])
def test_no_refusal(accept_ra: int | None, forwarding: bool, proto: int) -> None:
    p = plan(desired(V6NAT), obs(accept_ra, forwarding, proto), Owned())
    assert "six" not in p.problems
    assert len(forwarding6(p)) == (0 if forwarding else 1)


def test_blockers_are_named_by_device() -> None:
    assert ra_blockers(obs(accept_ra=1)) == ["eth0"]
    assert ra_blockers(obs(accept_ra=2)) == []


async def test_reconciler_reads_accept_ra_and_recovers_when_it_is_fixed(tmp_path: Path) -> None:
    nl, sc = FakeNetlink(ETH), FakeSysctl()
    nl.observed.routes.add(DEFAULT6)
    sc.accept_ra_values["eth0"] = 1
    rec = Reconciler(nl, FakeFirewall(), sc, FakeDhcp(), str(tmp_path / "owned.json"))
    await rec.set_desired(desired(V6NAT))
    assert rec.states["six"].state == "failed" and "accept_ra" in rec.states["six"].reason
    assert sc.values[6] is False
    sc.accept_ra_values["eth0"] = 2
    rec._sysctl_known = False  # what the periodic verification does
    await rec.converge()
    assert rec.states["six"].state == "active" and sc.values[6] is True


def test_doctor_finding_before_and_after_forwarding() -> None:
    key = "net.ipv6.conf.eth0.accept_ra"
    o = obs(accept_ra=1)
    inp = DoctorInput(networks=[V6NAT], observed=o,
                      sysctls={key: "1", "net.ipv6.conf.all.forwarding": "0"})
    [f] = [f for f in run_checks(inp) if f.check == "accept-ra-forwarding"]
    assert f.severity == "error" and f.network == "six" and f.subject == key
    assert f.fix.startswith(f"sysctl -w {key}=2")
    inp = DoctorInput(networks=[V4NAT], observed=o,
                      sysctls={key: "1", "net.ipv6.conf.all.forwarding": "1"})
    [f] = [f for f in run_checks(inp) if f.check == "accept-ra-forwarding"]
    assert f.severity == "warning" and "forwarding is on" in f.message
    inp = DoctorInput(networks=[V6NAT], observed=o,
                      sysctls={key: "2", "net.ipv6.conf.all.forwarding": "1"})
    assert "accept-ra-forwarding" not in [f.check for f in run_checks(inp)]
