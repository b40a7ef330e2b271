"""The checked-in XML is what the code exports; path escaping round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmnetd.control import names
from kvmnetd.control.introspect import introspection_xml

REPO = Path(__file__).resolve().parents[2]


def test_checked_in_xml_matches_code() -> None:
    path = REPO / "dbus" / names.INTROSPECTION_FILE
    assert path.read_text() == introspection_xml(), (
        f"regenerate: python -m kvmnetd.control.introspect > dbus/{names.INTROSPECTION_FILE}")


def test_names_derive_from_one_version() -> None:
    v = str(names.API_VERSION)
    for value in (names.BUS_NAME, names.MANAGER_PATH, names.MANAGER_IFACE, names.NETWORK_IFACE,
                  names.ERROR_PREFIX, names.error_name("Failed")):
        assert v in value
    assert names.MANAGER_IFACE.startswith(names.BUS_NAME)


@pytest.mark.parametrize("name", ["default", "", "a_b", "0net", "x-y.z", "../etc", "é",
                                  "with space\n", "\x01", "9"])
def test_network_path_round_trip(name: str) -> None:
    path = names.network_path(name)
    label = path.rsplit("/", 1)[1]
    assert label and all(c.isascii() and (c.isalnum() or c == "_") for c in label)
    assert not label[0].isdigit()
    assert names.network_name(path) == name


def test_escaping_matches_systemd_style() -> None:
    assert names.escape_label("default") == "default"
    assert names.escape_label("my-net") == "my_2dnet"
    assert names.escape_label("0a") == "_30a"
    assert names.escape_label("") == "_"
    assert names.unescape_label("_zz") is None
    assert names.network_name("/elsewhere/x") is None


def test_policy_file_lets_everyone_call_the_manager() -> None:
    # The daemon checks every caller itself (root, group kvmnet, polkit), as networkd does.
    policy = (REPO / "dbus" / "kvmnetd.conf").read_text()
    assert f'own="{names.BUS_NAME}"' in policy
    default = policy[policy.index('<policy context="default">'):]
    assert (f'send_destination="{names.BUS_NAME}"\n           '
            f'send_interface="{names.MANAGER_IFACE}"/>') in default
    assert '<policy group=' not in policy
