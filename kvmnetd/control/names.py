"""Every bus name, path, error and socket name, derived from one version constant.

Imported by kvmnetctl at start-up: stdlib only, nothing heavy.
"""

from __future__ import annotations

API_VERSION = 1

BUS_NAME = f"org.kvmnetd.Kvmnetd{API_VERSION}"
MANAGER_PATH = f"/org/kvmnetd/Kvmnetd{API_VERSION}"
MANAGER_IFACE = f"{BUS_NAME}.Manager"
NETWORK_IFACE = f"{BUS_NAME}.Network"
NETWORK_PATH_PREFIX = f"{MANAGER_PATH}/network/"
ERROR_PREFIX = f"{BUS_NAME}.Error."
INTROSPECTION_FILE = f"{BUS_NAME}.xml"

DEFAULT_RUN_DIR = "/run/kvmnetd"
SOCKET_NAME = "control.sock"
DEFAULT_SOCKET_PATH = f"{DEFAULT_RUN_DIR}/{SOCKET_NAME}"
SOCKET_ENV = "KVMNETD_SOCKET"



def error_name(short: str) -> str:
    return ERROR_PREFIX + short


def _is_plain(byte: int, first: bool) -> bool:
    return (65 <= byte <= 90) or (97 <= byte <= 122) or (not first and 48 <= byte <= 57)


def escape_label(name: str) -> str:
    """Object-path label for any string: [A-Za-z0-9] kept, other bytes become _XX."""
    if not name:
        return "_"
    raw = name.encode("utf-8", "surrogateescape")
    return "".join(
        chr(b) if _is_plain(b, i == 0) else f"_{b:02x}" for i, b in enumerate(raw)
    )


def unescape_label(label: str) -> str | None:
    if label == "_":
        return ""
    out = bytearray()
    i = 0
    while i < len(label):
        ch = label[i]
        if ch == "_":
            hexpart = label[i + 1:i + 3]
            if len(hexpart) != 2 or any(c not in "0123456789abcdefABCDEF" for c in hexpart):
                return None
            out.append(int(hexpart, 16))
            i += 3
        else:
            out.append(ord(ch))
            i += 1
    return out.decode("utf-8", "surrogateescape")


def network_path(name: str) -> str:
    return NETWORK_PATH_PREFIX + escape_label(name)


def network_name(path: str) -> str | None:
    if not path.startswith(NETWORK_PATH_PREFIX):
        return None
    return unescape_label(path[len(NETWORK_PATH_PREFIX):])
