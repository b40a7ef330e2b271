"""Who may administer: root, group kvmnet, then polkit; without polkit, only the first two."""

from __future__ import annotations

import pytest

from kvmnetd import access
from kvmnetd.access import MANAGE, authorize
from kvmnetd.bus.polkit import PolkitAuthority, check_message
from kvmnetd.errors import PermissionDenied
from kvmnetd.status import Caller

GID = 4242


class FakeAuthority:
    def __init__(self, answer: bool | None) -> None:
        self.answer = answer
        self.asked: list[tuple[Caller, str]] = []

    async def check(self, caller: Caller, action: str) -> bool | None:
        self.asked.append((caller, action))
        return self.answer


@pytest.fixture(autouse=True)
def admin_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(access, "admin_gid", lambda: GID)


USER = Caller(uid=1000, gids=(1000,), bus_name=":1.7")
MEMBER = Caller(uid=1001, gids=(1001, GID), bus_name=":1.8")


async def test_root_and_members_pass_without_asking_polkit() -> None:
    polkit = FakeAuthority(False)
    await authorize(Caller(uid=0), "start networks", polkit)
    await authorize(MEMBER, "start networks", polkit)
    assert polkit.asked == []


async def test_polkit_decides_for_anyone_else() -> None:
    yes = FakeAuthority(True)
    await authorize(USER, "start networks", yes)
    assert yes.asked == [(USER, MANAGE)]
    with pytest.raises(PermissionDenied, match="polkit does not allow uid 1000 to reload"):
        await authorize(USER, "reload", FakeAuthority(False))


@pytest.mark.parametrize("authority", [None, FakeAuthority(None)], ids=["none", "absent"])
async def test_without_polkit_only_root_and_the_group(authority: FakeAuthority | None) -> None:
    with pytest.raises(PermissionDenied, match="only root and members of group kvmnet may"):
        await authorize(USER, "stop networks", authority)
    await authorize(MEMBER, "stop networks", authority)


async def test_polkit_adapter_has_nothing_to_ask_without_bus_or_bus_name() -> None:
    assert await PolkitAuthority(lambda: None).check(USER, MANAGE) is None
    socket_caller = Caller(uid=1000, gids=(1000,), pid=123)
    assert await PolkitAuthority(lambda: None).check(socket_caller, MANAGE) is None


def test_check_authorization_message() -> None:
    msg = check_message(":1.7", MANAGE)
    assert (msg.destination, msg.path, msg.member) == (
        "org.freedesktop.PolicyKit1", "/org/freedesktop/PolicyKit1/Authority",
        "CheckAuthorization")
    subject, action, details, flags, cancel = msg.body
    assert subject[0] == "system-bus-name" and subject[1]["name"].value == ":1.7"
    assert (action, details, flags, cancel) == (MANAGE, {}, 1, "")


def test_kvmnetctl_asks_the_bus_when_the_socket_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from kvmnetd import cli
    from kvmnetd.bus.names import error_name

    monkeypatch.delenv("KVMNETD_SOCKET", raising=False)
    denied = cli.CallFailed(error_name("PermissionDenied"), "only root and members of ...")
    asked: list[str] = []

    def socket_call(path: str, method: str, args: list[object]) -> object:
        asked.append("socket")
        raise denied

    def bus_call(address: str | None, method: str, args: list[object]) -> object:
        asked.append("bus")
        if bus_answer is None:
            raise cli.Unavailable("no system bus")
        return bus_answer

    monkeypatch.setattr(cli, "socket_call", socket_call)
    monkeypatch.setattr(cli, "bus_call", bus_call)
    client = cli.Client(argparse.Namespace(bus_address=None, bus=False, socket=None))
    bus_answer: object = "polkit said yes"
    assert client.call("StartNetwork", "lab") == "polkit said yes"
    assert asked == ["socket", "bus"]
    bus_answer = None  # no bus: the socket's refusal is the answer
    with pytest.raises(cli.CallFailed) as exc:
        client.call("StartNetwork", "lab")
    assert exc.value is denied
