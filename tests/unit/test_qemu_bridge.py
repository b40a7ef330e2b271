"""qemu-bridge-helper's include file: only networks open to every user; `*` in allow_users."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmnetd.app.core import _allowed
from kvmnetd.config import load as cfg
from kvmnetd.model.errors import ConfigError
from kvmnetd.model.records import Caller
from kvmnetd.plan.qemu_bridge import bridge_acl

CONF = """
[daemon]
qemu_bridge_conf = "/etc/qemu/kvmnetd.conf"

[network.open]
mode = "isolated"
bridge = "kvopen0"
ipv4 = "10.0.7.1/24"
allow_users = ["*"]

[network.some]
mode = "isolated"
bridge = "kvsome0"
ipv4 = "10.0.8.1/24"
allow_users = ["root"]
allow_groups = ["kvm"]
"""


def load(tmp_path: Path, text: str) -> cfg.Config:
    f = tmp_path / "kvmnetd.toml"
    f.write_text(text)
    nd = tmp_path / "networks.d"
    nd.mkdir(exist_ok=True)
    return cfg.load(str(f), str(nd), {})


def test_only_networks_open_to_every_user_are_listed(tmp_path: Path) -> None:
    conf = load(tmp_path, CONF)
    assert conf.settings.qemu_bridge_conf == "/etc/qemu/kvmnetd.conf"
    text = bridge_acl(conf.networks.values(), "/etc/qemu/kvmnetd.conf")
    assert [ln for ln in text.splitlines() if not ln.startswith("#")] == ["allow kvopen0"]
    assert "include /etc/qemu/kvmnetd.conf" in text
    assert "\nallow " not in bridge_acl([], "/x")


def test_star_admits_every_caller(tmp_path: Path) -> None:
    nets = load(tmp_path, CONF).networks
    nobody = Caller(uid=65534, gids=(65534,))
    assert _allowed(nobody, nets["open"]) and not _allowed(nobody, nets["some"])


@pytest.mark.parametrize("bad", ['qemu_bridge_conf = "relative.conf"'])
def test_bad_setting(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, f"[daemon]\n{bad}\n")
    assert "qemu_bridge_conf" in str(exc.value.issues[0])


def test_star_is_not_a_group_or_pattern(tmp_path: Path) -> None:
    for text in ('allow_groups = ["*"]', 'allow_users = ["a*"]'):
        with pytest.raises(ConfigError):
            load(tmp_path, CONF.replace('allow_users = ["*"]', text))
