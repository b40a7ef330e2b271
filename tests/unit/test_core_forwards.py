"""Runtime port forwards in the core, over in-memory fakes: add, list, remove, kept in
state_dir, refused with typed errors, and left out when a reload takes their port."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmnetd.adapters.forward_store import ForwardFile
from kvmnetd.model.errors import Conflict, InvalidArgument, NoSuchNetwork, PermissionDenied
from kvmnetd.model.forward import Forward
from kvmnetd.model.records import ROOT, Caller
from tests.support.core import CoreRig, make_core
from tests.support.toml import network_toml

STRANGER = Caller(uid=4321, gids=(4321,))
CONFIG = (network_toml("nat", "nat", "kv-nat", "10.77.1.1/24", dhcp=True,
                       hosts=[("52:54:00:00:00:05", "10.77.1.5", "web")])
          + '[[network.nat.forward]]\nproto = "tcp"\nport = 8080\nto = "web"\n'
          + network_toml("iso", "isolated", "kv-iso", "10.77.2.1/24", dns=False))


@pytest.fixture
async def rig(tmp_path: Path) -> CoreRig:
    rig = await make_core(tmp_path, CONFIG)
    rig.core._init_forwards(ForwardFile())
    return rig


def state_dir(rig: CoreRig) -> str:
    return rig.core.config.settings.state_dir


async def test_added_listed_rendered_kept_and_removed(rig: CoreRig) -> None:
    core = rig.core
    await core.add_forward(ROOT, "nat", "udp", "5000-5010", "10.77.1.6", False)
    await core.add_forward(ROOT, "nat", "tcp", "2222", "web:22", False)
    rows = [r.to_json() for r in core.list_forwards("nat")]
    assert rows == [
        {"network": "nat", "proto": "tcp", "port": "8080", "to": "web", "to_port": None,
         "runtime": False},
        {"network": "nat", "proto": "udp", "port": "5000-5010", "to": "10.77.1.6",
         "to_port": None, "runtime": True},
        {"network": "nat", "proto": "tcp", "port": "2222", "to": "web", "to_port": 22,
         "runtime": True}]
    # Through the one write path: the desired state the loop plans from has them.
    assert len(core.rec.desired.networks["nat"].port_forwards) == 3
    # A restart reads them back from state_dir.
    kept = ForwardFile().read(state_dir(rig))
    assert kept == {"nat": (Forward("udp", 5000, 5010, "10.77.1.6"),
                            Forward("tcp", 2222, 2222, "web", 22))}
    await core.remove_forward(ROOT, "nat", "udp", "5000")
    await core.remove_forward(ROOT, "nat", "tcp", "2222")
    assert [r.port for r in core.list_forwards()] == ["8080"]
    assert ForwardFile().read(state_dir(rig)) == {}


@pytest.mark.parametrize(("args", "error", "part"), [
    (("nope", "tcp", "80", "10.77.1.5"), NoSuchNetwork, "no network named"),
    (("nat", "sctp", "80", "10.77.1.5"), InvalidArgument, "tcp or udp"),
    (("nat", "tcp", "http", "10.77.1.5"), InvalidArgument, "must be a number"),
    (("nat", "tcp", "8080", "10.77.1.6"), Conflict, "overlaps tcp 8080 -> web"),
    (("nat", "tcp", "8000-8100", "10.77.1.6"), Conflict, "overlaps"),
    (("nat", "udp", "67", "10.77.1.6"), InvalidArgument, "DHCP (dnsmasq)"),
    (("nat", "tcp", "53", "10.77.1.6"), InvalidArgument, "DNS (dnsmasq)"),
    (("nat", "tcp", "80", "10.77.9.6"), InvalidArgument, "not a guest address"),
    (("nat", "tcp", "80", "web:0"), InvalidArgument, "outside 1..65535"),
    (("nat", "tcp", "80-81", "web:90"), InvalidArgument, "keeps its ports"),
    (("iso", "tcp", "80", "10.77.2.5"), InvalidArgument, "need a nat or routed network"),
])
async def test_refused_with_typed_errors(rig: CoreRig, args: tuple[str, ...],
                                         error: type[Exception], part: str) -> None:
    with pytest.raises(error) as e:
        await rig.core.add_forward(ROOT, *args, False)
    assert part in str(e.value)
    assert len(rig.core.list_forwards()) == 1


async def test_only_admins_change_forwards(rig: CoreRig) -> None:
    with pytest.raises(PermissionDenied):
        await rig.core.add_forward(STRANGER, "nat", "tcp", "80", "web", False)
    with pytest.raises(PermissionDenied):
        await rig.core.remove_forward(STRANGER, "nat", "tcp", "8080")
    assert [r.port for r in rig.core.list_forwards()] == ["8080"]


async def test_a_reload_that_takes_the_port_leaves_the_runtime_one_out(rig: CoreRig) -> None:
    await rig.core.add_forward(ROOT, "nat", "tcp", "9090", "10.77.1.6", False)
    rig.write_config(CONFIG + '[[network.nat.forward]]\nproto = "tcp"\nport = 9090\n'
                              'to = "10.77.1.7"\n')
    await rig.core.reload(ROOT)
    assert [(r.port, r.to, r.runtime) for r in rig.core.list_forwards()] == [
        ("8080", "web", False), ("9090", "10.77.1.7", False)]
    # Still kept: it comes back once the config gives the port up.
    rig.write_config(CONFIG)
    await rig.core.reload(ROOT)
    assert [(r.port, r.runtime) for r in rig.core.list_forwards()] == [
        ("8080", False), ("9090", True)]


async def test_remove_of_a_forward_in_the_main_file_names_it(rig: CoreRig) -> None:
    with pytest.raises(Conflict, match=r"kvmnetd.toml:\d+"):
        await rig.core.remove_forward(ROOT, "nat", "tcp", "8080")
    with pytest.raises(InvalidArgument, match="no tcp forward on port 9"):
        await rig.core.remove_forward(ROOT, "nat", "tcp", "9")


async def test_runtime_forwards_go_with_an_undefined_network(rig: CoreRig) -> None:
    text = network_toml("tmp", "nat", "kv-tmp", "10.77.3.1/24", dns=False)
    await rig.core.define_network(ROOT, text, False)
    await rig.core.add_forward(ROOT, "tmp", "tcp", "7000", "10.77.3.5", False)
    assert [r.network for r in rig.core.list_forwards()] == ["nat", "tmp"]
    await rig.core.undefine_network(ROOT, "tmp", False)
    await rig.core.define_network(ROOT, text, False)
    assert [r.network for r in rig.core.list_forwards()] == ["nat"]
    assert ForwardFile().read(state_dir(rig)) == {}
