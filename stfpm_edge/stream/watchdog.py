"""Telling systemd how the run is doing (sd_notify), so a run that stops inspecting is restarted, not trusted.

Under a unit of ``Type=notify`` with ``WatchdogSec=`` (``deploy/stfpm-edge.service``), systemd sets
``$NOTIFY_SOCKET``; the run sends ``READY=1`` once its captures have started, ``WATCHDOG=1`` at most once
a second while frames are being inspected (fed by inspection itself, not by a timer: a run whose camera or
engine hangs stops feeding it and systemd kills and restarts it), and ``STOPPING=1`` when it shuts down.
Without ``$NOTIFY_SOCKET`` (not under systemd) it does nothing. The protocol is a datagram per message on a
Unix socket (sd_notify(3)); no library is needed for it.
"""

from __future__ import annotations

import os
import socket
import time


class SystemdNotifier:
    def __init__(self, environ=os.environ, interval_s: float = 1.0):
        address = environ.get("NOTIFY_SOCKET", "")
        self.address = ("\0" + address[1:]) if address.startswith("@") else address  # "@name": the abstract namespace
        self.interval_s = interval_s
        self._last = float("-inf")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if self.address else None

    def _send(self, message: str) -> None:
        if self._sock is None:
            return
        try:
            self._sock.sendto(message.encode(), self.address)
        except OSError:  # systemd gone or the socket not ours: the run goes on, unsupervised
            pass

    def ready(self) -> None:
        self._send("READY=1")

    def alive(self) -> None:
        """A frame was inspected: feed the watchdog (at most once per ``interval_s``)."""
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._send("STOPPING=1")
        if self._sock is not None:
            self._sock.close()
            self._sock = None
