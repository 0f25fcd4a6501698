"""The service manager told how the node's service is doing (`sd_notify`): a unit of
Type=notify is started once the snapshotter says READY=1."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify_systemd(message: bytes) -> None:
    """Tell the service manager `message` (`READY=1`: a unit of Type=notify is started, and
    the units ordered after it, containerd, may start), when it asks ($NOTIFY_SOCKET)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.sendto(message, address)
    except OSError as exc:
        log.warning("cannot tell systemd %s at %s: %s", message.decode(), address, exc.strerror)
