"""The built-in default network's subnet: kept by the loader's store, and the state file."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from kvmnetd.adapters.default_subnet import FILE_NAME, DefaultSubnetFile
from kvmnetd.config.host_routes import load_config
from kvmnetd.model.observed import Link, ObservedState, Route

N = ipaddress.IPv4Network


class MemoryStore:
    def __init__(self, kept: N | None = None) -> None:
        self.kept = kept
        self.writes: list[tuple[str, N]] = []

    def read(self, state_dir: str) -> N | None:
        return self.kept

    def write(self, state_dir: str, subnet: N) -> None:
        self.writes.append((state_dir, subnet))
        self.kept = subnet


def observed(*routes: tuple[str, str]) -> ObservedState:
    """Routes (subnet, device); every device a veth of its own."""
    obs = ObservedState()
    for i, (dst, dev) in enumerate(routes, start=2):
        obs.links[i] = Link(i, dev, "veth")
        obs.routes.add(Route(ipaddress.ip_network(dst), oif=i))
    return obs


def load(tmp_path: Path, obs: ObservedState, store: MemoryStore | None) -> ipaddress.IPv4Network:
    conf = load_config(str(tmp_path / "none.toml"), str(tmp_path / "none.d"),
                       {"state_dir": str(tmp_path / "state")}, obs, store)
    v4 = conf.networks["default"].ipv4
    assert v4 is not None
    return v4.network


def test_chosen_once_then_kept_whatever_the_routes(tmp_path: Path) -> None:
    store = MemoryStore()
    first = load(tmp_path, observed(("10.88.0.0/16", "podman0"), ("10.80.0.0/24", "tun0")),
                 store)
    assert first == N("10.80.1.0/24")
    assert store.writes == [(str(tmp_path / "state"), first)]
    # Routes gone, or one over it now: the same subnet, nothing written again.
    assert load(tmp_path, observed(), store) == first
    assert load(tmp_path, observed(("10.80.0.0/12", "tun0")), store) == first
    assert len(store.writes) == 1


def test_routes_on_our_own_bridge_do_not_count(tmp_path: Path) -> None:
    # A restart after the state file was lost: kvbr0 still carries the subnet's route.
    assert load(tmp_path, observed(("10.80.0.0/24", "kvbr0")), MemoryStore()) == \
        N("10.80.0.0/24")


def test_no_store_no_persistence_and_declared_networks_untouched(tmp_path: Path) -> None:
    assert load(tmp_path, observed(("10.80.0.0/24", "tun0")), None) == N("10.80.1.0/24")
    main = tmp_path / "main.toml"
    main.write_text('[network.nat]\nipv4 = "10.80.0.1/24"\n')
    store = MemoryStore(N("10.80.9.0/24"))
    conf = load_config(str(main), None, {"state_dir": str(tmp_path)}, observed(), store)
    assert list(conf.networks) == ["nat"] and store.writes == []


def test_state_file_round_trip_and_what_an_admin_reads(tmp_path: Path) -> None:
    f = DefaultSubnetFile()
    state = str(tmp_path / "lib")
    assert f.read(state) is None
    f.write(state, N("10.80.3.0/24"))
    assert f.read(state) == N("10.80.3.0/24")
    path = tmp_path / "lib" / FILE_NAME
    text = path.read_text()
    assert text.startswith("# The subnet kvmnetd chose for its built-in default network")
    assert "delete this file" in text and 'subnet = "10.80.3.0/24"\n' in text
    assert path.stat().st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path / "lib") == [FILE_NAME]  # no temporary file left


@pytest.mark.parametrize("text", ["", "subnet = 1\n", 'subnet = "10.80.0.0/33"\n',
                                  'subnet = "8.8.8.0/24"\n', 'subnet = "10.80.0.0/31"\n',
                                  "not toml [\n", 'subnet = "fd00::/64"\n'])
def test_unusable_state_is_ignored_and_chosen_again(tmp_path: Path, text: str) -> None:
    (tmp_path / FILE_NAME).write_text(text)
    assert DefaultSubnetFile().read(str(tmp_path)) is None


def test_read_only_store_and_unwritable_dir_never_fail(tmp_path: Path) -> None:
    DefaultSubnetFile(writable=False).write(str(tmp_path), N("10.80.0.0/24"))
    assert not (tmp_path / FILE_NAME).exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    DefaultSubnetFile().write(str(blocker / "sub"), N("10.80.0.0/24"))  # logged, not raised
