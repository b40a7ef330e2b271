"""The Debian package as scripts/build-deb makes it: control fields, the file list, and
the installed tree working from Debian's /usr/bin/python3 alone (no .venv)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# A version string other than the source's: the override is what upgrade tests rely on.
VERSION = "9.8.7~test1"

pytestmark = pytest.mark.network  # pip downloads the pinned wheels from PyPI

EXPECTED_FILES = [
    "usr/sbin/kvmnetd",
    "usr/bin/kvmnetctl",
    "usr/lib/kvmnetd/python/kvmnetd/daemon.py",
    "usr/lib/kvmnetd/python/dbus_fast/__init__.py",
    "usr/lib/kvmnetd/python/structlog/__init__.py",
    "usr/lib/kvmnetd/python/tomli_w/__init__.py",
    "usr/lib/systemd/system/kvmnetd.service",
    "usr/lib/sysusers.d/kvmnetd.conf",
    "usr/lib/tmpfiles.d/kvmnetd.conf",
    "usr/share/dbus-1/system.d/org.kvmnetd.Kvmnetd1.conf",
    "usr/share/dbus-1/interfaces/org.kvmnetd.Kvmnetd1.xml",
    "usr/share/polkit-1/actions/org.kvmnetd.policy",
    "usr/share/kvmnetd/qemu-ifup",
    "usr/lib/kvmnetd/kvmnet-hook",
    "usr/share/kvmnetd/qemu-ifdown",
    "usr/share/man/man8/kvmnetd.8.gz",
    "usr/share/man/man1/kvmnetctl.1.gz",
    "usr/share/man/man5/kvmnetd.toml.5.gz",
    "usr/share/doc/kvmnetd/config.md",
    "usr/share/doc/kvmnetd/kvmnetd.example.toml",
    "usr/share/doc/kvmnetd/stability.md",
    "usr/share/doc/kvmnetd/CHANGELOG.md",
    "usr/share/doc/kvmnetd/copyright",
    "usr/share/bash-completion/completions/kvmnetctl",
]


def run(*cmd: str | Path, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          check=True, **kw)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def deb() -> Iterator[Path]:
    out = Path(tempfile.mkdtemp(prefix="kvmnetd-deb-"))
    try:
        env = {**os.environ, "KVMNETD_VERSION": VERSION, "KVMNETD_BUILD_DIR": str(out)}
        path = run(REPO / "scripts/build-deb", env=env, cwd="/").stdout.strip().splitlines()[-1]
        yield Path(path)
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="module")
def tree(deb: Path) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="kvmnetd-root-"))
    try:
        run("dpkg-deb", "-x", deb, root)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def field(deb: Path, name: str) -> str:
    return run("dpkg-deb", "-f", deb, name).stdout.strip()


def bare(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
    """Run with an empty environment: no venv on PATH, no PYTHONPATH."""
    return run(*cmd, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, cwd="/")


def test_control_fields(deb: Path) -> None:
    assert deb.name == f"kvmnetd_{VERSION}_{field(deb, 'Architecture')}.deb"
    assert field(deb, "Package") == "kvmnetd"
    assert field(deb, "Version") == VERSION
    depends = [d.strip() for d in field(deb, "Depends").split(",")]
    for dep in ["python3 (>= 3.11)", "python3 (<< 3.12)", "python3-systemd",
                "dnsmasq-base", "nftables", "iproute2", "dbus"]:
        assert dep in depends
    assert "python3-libvirt" in field(deb, "Suggests")
    assert int(field(deb, "Installed-Size")) > 0
    # kvmnet-hook is linked statically: the glibc it carries is named.
    assert field(deb, "Built-Using").startswith("glibc (= ")


def test_file_list(deb: Path) -> None:
    listing = run("dpkg-deb", "-c", deb).stdout.splitlines()
    paths = {line.split()[-1].removeprefix("./") for line in listing}
    modes = {line.split()[-1].removeprefix("./"): line.split()[0] for line in listing}
    missing = [f for f in EXPECTED_FILES if f not in paths]
    assert not missing
    for exe in ["usr/sbin/kvmnetd", "usr/bin/kvmnetctl", "usr/share/kvmnetd/qemu-ifup",
                "usr/lib/kvmnetd/kvmnet-hook"]:
        assert modes[exe] == "-rwxr-xr-x"
    assert all(line.split()[1] == "root/root" for line in listing)
    # kvmnetctl and the qemu hooks run as any user: everything must be readable.
    assert all(mode[7] == "r" for mode in modes.values()), modes
    # Byte-compiled at build time: /usr is read-only to the unit.
    assert "usr/lib/kvmnetd/python/kvmnetd/__pycache__/daemon.cpython-311.pyc" in paths
    # Nothing of pip's own or any library's command-line tools, nothing in /etc or /usr/local.
    assert not any(p.startswith(("usr/lib/kvmnetd/python/bin", "etc/", "usr/local"))
                   for p in paths)


def test_maintainer_scripts(tree: Path, deb: Path) -> None:
    ctl = Path(tempfile.mkdtemp(prefix="kvmnetd-ctl-"))
    try:
        run("dpkg-deb", "-e", deb, ctl)
        for name in ["postinst", "prerm", "postrm"]:
            script = ctl / name
            assert os.access(script, os.X_OK)
            run("sh", "-n", script)
            assert "@" not in script.read_text().replace("org.freedesktop", "")
        postinst = (ctl / "postinst").read_text()
        assert "systemd-sysusers kvmnetd.conf" in postinst
        assert "systemd-tmpfiles --create kvmnetd.conf" in postinst
        assert "rm -rf /etc/kvmnetd /var/lib/kvmnetd" in (ctl / "postrm").read_text()
    finally:
        shutil.rmtree(ctl, ignore_errors=True)


def test_wrappers_run_from_the_tree_on_debian_python(tree: Path) -> None:
    for wrapper in ["usr/sbin/kvmnetd", "usr/bin/kvmnetctl"]:
        first = (tree / wrapper).read_text().splitlines()[0]
        assert first == "#!/usr/bin/python3 -I"
    assert bare(tree / "usr/sbin/kvmnetd", "--version").stdout == f"kvmnetd {VERSION}\n"
    assert bare(tree / "usr/bin/kvmnetctl", "--version").stdout == f"kvmnetctl {VERSION}\n"
    # dbus-fast from the private directory serves the interface the repo documents.
    xml = bare(tree / "usr/sbin/kvmnetd", "--print-introspection").stdout
    assert xml == (REPO / "dbus/org.kvmnetd.Kvmnetd1.xml").read_text()


def test_private_libraries_come_first(tree: Path) -> None:
    private = tree / "usr/lib/kvmnetd/python"
    code = ("import sys; sys.path.insert(0, sys.argv[1]);"
            "import dbus_fast, structlog, tomli_w, kvmnetd.daemon;"
            "print(dbus_fast.__file__, structlog.__file__, tomli_w.__file__,"
            " kvmnetd.daemon.__file__, sep='\\n')")
    files = bare("/usr/bin/python3", "-I", "-c", code, private).stdout.split()
    assert all(f.startswith(str(private)) for f in files), files
    pins = (REPO / "packaging/requirements.txt").read_text()
    for dist in private.glob("*.dist-info"):
        name, version = dist.name.removesuffix(".dist-info").split("-")
        assert f"{name.replace('_', '-')}=={version}" in pins


def test_unit_verifies_as_installed(tree: Path) -> None:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze not installed")
    # The tree plus the host's units (targets the unit refers to); ExecStart= and
    # ExecReload= must then exist in the tree.
    root = Path(tempfile.mkdtemp(prefix="kvmnetd-verify-"))
    try:
        shutil.copytree(tree, root, dirs_exist_ok=True, symlinks=True)
        units = root / "usr/lib/systemd/system"
        for unit in Path("/usr/lib/systemd/system").iterdir():
            if not (units / unit.name).exists() and not unit.is_dir():
                shutil.copy2(unit, units / unit.name, follow_symlinks=False)
        r = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "--man=no",
                            "kvmnetd.service"], capture_output=True, text=True)
        assert r.returncode == 0 and "kvmnetd.service" not in r.stderr, r.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("page", ["kvmnetctl", "kvmnetd", "kvmnetd.toml"])
def test_man_pages_render(tree: Path, page: str) -> None:
    if not shutil.which("man"):
        pytest.skip("man-db not installed")
    env = {"PATH": "/usr/bin:/bin", "MANPATH": str(tree / "usr/share/man"),
           "MANWIDTH": "80", "MAN_DISABLE_SECCOMP": "1"}
    where = run("man", "-w", page, env=env).stdout.strip()
    assert where.startswith(str(tree))
    text = run("man", "-P", "cat", page, env=env).stdout
    assert "NAME" in text and page in text


def test_stage_lays_out_what_the_package_holds(deb: Path) -> None:
    """scripts/build-deb --stage (and DESTDIR=... scripts/install) for packagers."""
    stage = Path(tempfile.mkdtemp(prefix="kvmnetd-stage-"))
    try:
        run(REPO / "scripts/build-deb", "--stage", stage,
            env={**os.environ, "KVMNETD_VERSION": VERSION}, cwd="/")
        staged = {str(p.relative_to(stage)) for p in stage.rglob("*") if not p.is_dir()}
        listing = run("dpkg-deb", "-c", deb).stdout.splitlines()
        packaged = {line.split()[-1].removeprefix("./") for line in listing
                    if not line.startswith("d")}
        assert staged == packaged
    finally:
        shutil.rmtree(stage, ignore_errors=True)
