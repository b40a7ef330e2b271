"""inotify(7) on directories through libc: the kernel says when a file in them changed,
so nothing needs to poll."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import struct
from collections.abc import Callable

IN_MODIFY = 0x2
IN_CLOSE_WRITE = 0x8
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
CHANGES = IN_MODIFY | IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then the name, NUL-padded


class DirWatch:
    """Calls on_change(directory, name) for each change to a file in a watched directory."""

    def __init__(self, on_change: Callable[[str, str], None]) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
        self._rm = libc.inotify_rm_watch
        self._rm.argtypes = (ctypes.c_int, ctypes.c_int)
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.fd: int = fd
        self._on_change = on_change
        self._dirs: dict[int, str] = {}

    def add(self, directory: str) -> None:
        if directory in self._dirs.values():
            return
        wd = self._add(self.fd, os.fsencode(directory), CHANGES)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), directory)
        self._dirs[wd] = directory

    def remove(self, directory: str) -> None:
        for wd, d in list(self._dirs.items()):
            if d == directory:
                del self._dirs[wd]
                self._rm(self.fd, wd)

    def readable(self) -> None:
        """Read what the kernel queued (the event loop calls this when the fd is readable)."""
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            pos = 0
            while pos + _EVENT.size <= len(data):
                wd, _mask, _cookie, size = _EVENT.unpack_from(data, pos)
                name = data[pos + _EVENT.size:pos + _EVENT.size + size].rstrip(b"\0")
                pos += _EVENT.size + size
                directory = self._dirs.get(wd)
                if directory is not None:
                    self._on_change(directory, os.fsdecode(name))

    def close(self) -> None:
        os.close(self.fd)


def _deepest_dir(path: str) -> str:
    d = os.path.dirname(path) or "/"
    while not os.path.isdir(d):
        d = os.path.dirname(d) or "/"
    return d


async def wait_for_path(path: str) -> None:
    """Return once `path` exists. Its nearest existing directory is watched, deeper as
    directories appear (/run/libvirt is made by the daemon that makes the socket)."""
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    watch = DirWatch(lambda _d, _n: changed.set())
    loop.add_reader(watch.fd, watch.readable)
    try:
        watched = ""
        while not os.path.exists(path):
            d = _deepest_dir(path)
            if d != watched:
                if watched:
                    watch.remove(watched)
                watch.add(d)
                watched = d
                continue  # look again: it may have appeared before the watch was there
            changed.clear()
            await changed.wait()
    finally:
        loop.remove_reader(watch.fd)
        watch.close()
