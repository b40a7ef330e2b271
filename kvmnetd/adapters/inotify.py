"""inotify(7) on directories through libc: the kernel says when a file in them changed,
so nothing needs to poll."""

from __future__ import annotations

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
