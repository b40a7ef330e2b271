"""Who may administer: root, group kvmnet, then polkit; without polkit, only the first two."""

from __future__ import annotations

import pytest

from kvmnetd.app import access
from kvmnetd.app.access import MANAGE, authorize
from kvmnetd.control.credentials import process_start_time
from kvmnetd.control.polkit import PolkitAuthority, check_message, subject_of
from kvmnetd.model.errors import PermissionDenied
from kvmnetd.model.records import Caller
from tests.support.fakes import FakeAuthority

GID = 4242


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


async def test_polkit_adapter_has_nothing_to_ask_without_bus_or_subject() -> None:
    assert await PolkitAuthority(lambda: None).check(USER, MANAGE) is None
    assert subject_of(Caller(uid=1000, pid=123)) is None  # no start time: no safe subject


def test_subjects_bus_name_then_process() -> None:
    kind, fields = subject_of(USER)  # type: ignore[misc]
    assert kind == "system-bus-name" and fields["name"].value == ":1.7"
    sock = Caller(uid=1000, gids=(1000,), pid=4321, start_time=98765)
    kind, fields = subject_of(sock)  # type: ignore[misc]
    assert kind == "unix-process"
    assert {k: v.value for k, v in fields.items()} == {"pid": 4321, "start-time": 98765,
                                                       "uid": 1000}
    assert [v.signature for v in fields.values()] == ["u", "t", "i"]


def test_process_start_time_is_field_22_of_stat() -> None:
    import os

    with open("/proc/self/stat") as f:
        want = int(f.read().rsplit(")", 1)[1].split()[19])
    assert process_start_time(os.getpid()) == want
    assert process_start_time(2**22 + 1) is None


def test_check_authorization_message() -> None:
    subject = subject_of(USER)
    assert subject is not None
    msg = check_message(subject, MANAGE)
    assert (msg.destination, msg.path, msg.member, msg.signature) == (
        "org.freedesktop.PolicyKit1", "/org/freedesktop/PolicyKit1/Authority",
        "CheckAuthorization", "(sa{sv})sa{ss}us")
    _subject, action, details, flags, cancel = msg.body
    assert (action, details, flags, cancel) == (MANAGE, {}, 1, "")
