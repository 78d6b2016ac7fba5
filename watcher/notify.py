"""systemd's notify protocol: READY=1, WATCHDOG=1, STATUS=..., STOPPING=1.

Written by hand because it is one datagram on a Unix socket; the libraries that wrap it
(systemd-python) need systemd's headers and a compiler to install.
"""

from __future__ import annotations

import os
import socket


def _address() -> str | None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return None
    return "\0" + address[1:] if address.startswith("@") else address


def notify(message: str) -> bool:
    """Send one notification; False where the service is not run by systemd."""
    address = _address()
    if address is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(message.encode("utf-8", "replace"), address)
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd set, in seconds: how often to ping."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000
