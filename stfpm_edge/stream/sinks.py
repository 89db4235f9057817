"""Sinks: verdicts leave the process for the line — MQTT (the plant's message bus), a Modbus TCP
coil (the reject gate's PLC or remote I/O) and webhooks.

Each sink has its own bounded queue and thread. ``offer`` never blocks the inspection loop: when a
sink's queue is full (the peer is slow or gone) the oldest message is dropped and counted, so the
JSONL record (written by the output stage, not by sinks) is never at risk. At the end of a run a
sink gets ``drain_s`` seconds to deliver what it holds; what is left is counted as dropped. Every
message is accounted for: ``offered = sent + failed + dropped`` in the summary.

URLs (credentials in them are masked in every record, summary and message):

    mqtt://[user:password@]host[:1883]/topic[?send=all|anomalous&qos=1&queue=1000]   (mqtts:// for TLS)
    modbus://host[:502]/coil/N[?pulse_ms=200&unit=1&queue=100]
    http(s)://[user:password@]host[:port]/path[?send=anomalous|all&timeout=2&retries=2]
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from typing import Any

from ..errors import StfpmError
from ..fileio import mask_secrets
from ..scoring import ANOMALOUS
from ..timing import percentiles
from .outputs import Output, frame_record

SEND_MODES = ("all", "anomalous")


def need_line_extra(module: str, option: str, package: str) -> None:
    """Import ``module`` now, before the run starts: without the [line] extra, one clear line naming the option and package."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise StfpmError(f"{option}: {package} is not installed (pip install 'stfpm-edge[line]')") from None


def modbus_client(host: str, port: int, timeout: float):
    """The Modbus TCP client every PLC connection here uses: no retries of its own, reconnects with a 0.2 to 5 s backoff."""
    from pymodbus.client import ModbusTcpClient

    return ModbusTcpClient(host, port=port, timeout=timeout, retries=0, reconnect_delay=0.2, reconnect_delay_max=5.0)


def mqtt_client(client_id: str | None, user: str | None, password: str | None, tls: bool):
    """The paho client every MQTT connection here uses (callback API 2, credentials and TLS from the URL, reconnects with a
    0.2 to 5 s backoff); not yet connected."""
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **({"client_id": client_id} if client_id else {}))
    if user:
        c.username_pw_set(user, password)
    if tls:
        c.tls_set()
    c.reconnect_delay_set(min_delay=0.2, max_delay=5)
    return c


class Undelivered(Exception):
    """A message that could not be delivered (counted failed); ``dropped=True``: never tried (shutdown)."""

    def __init__(self, why: str, dropped: bool = False):
        super().__init__(why)
        self.dropped = dropped


def _split(url: str) -> tuple[urllib.parse.SplitResult, str | None, str | None, int | None]:
    """(URL without user info, user, password, port). The user info ends at the URL's last "@", as
    in ``mask_secrets``, so a password holding an unencoded "/" or "@" is taken whole."""
    scheme, sep, rest = url.partition("://")
    user = password = None
    if sep and "@" in rest:
        userinfo, rest = rest.rsplit("@", 1)
        user, _, pw = userinfo.partition(":")
        user, password = urllib.parse.unquote(user), urllib.parse.unquote(pw) if pw else None
    u = urllib.parse.urlsplit(f"{scheme}{sep}{rest}")
    try:
        port = u.port
    except ValueError:
        raise StfpmError(f"--sink {mask_secrets(url)}: the port is not a number") from None
    return u, user, password, port


def _query(url: urllib.parse.SplitResult, allowed: dict[str, type], foreign_ok: bool = False) -> dict[str, Any]:
    """The sink's options from the URL query, typed; an unknown (unless ``foreign_ok``: a webhook's
    own parameters) or malformed one is a clear error."""
    opts: dict[str, Any] = {}
    for key, value in urllib.parse.parse_qsl(url.query, keep_blank_values=True):
        if key not in allowed and foreign_ok:
            continue
        if key not in allowed:
            raise StfpmError(f"--sink {mask_secrets(url.geturl())}: unknown option {key!r} (known: {', '.join(sorted(allowed))})")
        try:
            opts[key] = allowed[key](value)
        except ValueError:
            raise StfpmError(f"--sink {mask_secrets(url.geturl())}: {key}={value!r} is not a {allowed[key].__name__}") from None
    return opts


class Sink(Output):
    """A bounded queue and a thread that delivers its messages; subclasses implement ``_deliver``."""

    def __init__(self, url: str, send: str = "all", queue: int = 1000, drain_s: float = 5.0):
        if send not in SEND_MODES:
            raise StfpmError(f"--sink {mask_secrets(url)}: send={send!r}; use one of {', '.join(SEND_MODES)}")
        if queue < 1:
            raise StfpmError(f"--sink {mask_secrets(url)}: queue must be at least 1, got {queue}")
        self.url, self.name, self.send, self.bound, self.drain_s = url, mask_secrets(url), send, queue, drain_s
        self.context: dict[str, Any] = {}  # added to every message (model, source): set by the run
        self.offered = self.sent = self.failed = self.dropped = 0
        self.last_error: str | None = None
        self.latency: deque = deque(maxlen=10_000)  # ms, frame capture -> delivered
        self._queue: deque = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._inflight = 0  # 1 while the thread delivers a message taken off the queue
        self._abandoned = False  # set by close: the summary is taken, a late delivery is not counted again
        self.try_s = 5.0  # the longest one delivery try can take (subclasses set it from their timeouts)
        self._deadline = float("inf")  # perf_counter after which nothing more is tried (set by close)
        self._thread = threading.Thread(target=self._run, name=f"sink-{type(self).__name__}", daemon=True)

    # -- the inspection side ------------------------------------------------------------------
    def start(self) -> "Sink":
        self._open()
        self._thread.start()
        return self

    def wants(self, record: dict) -> bool:
        return record.get("status") == "inspected" and (self.send == "all" or record.get("verdict") == ANOMALOUS)

    def write(self, insp, picture) -> None:  # as an Output of the area-scan loop
        record = frame_record(insp)
        if self.wants(record):
            self.offer(record, insp.arrival)

    def event(self, record: dict) -> None:  # drift raised / cleared: to the line's message bus as it happens
        self.offer(record, time.perf_counter())

    def offer(self, message: dict, captured: float) -> None:
        """Queue ``message`` (``captured``: perf_counter when its frame arrived); never blocks."""
        with self._cv:
            self.offered += 1
            if len(self._queue) >= self.bound:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(({**self.context, **message}, captured))
            self._cv.notify()

    def close(self) -> None:
        if self._thread.ident is None:  # never started (the run failed before it began)
            return
        with self._cv:
            self._closing = True
            self._deadline = time.perf_counter() + self.drain_s
            self._cv.notify()
        self._thread.join(self.drain_s + self.try_s + 1.0)
        with self._cv:
            self.dropped += len(self._queue) + self._inflight  # a delivery still hanging past its time counts as dropped, once
            self._queue.clear()
            self._inflight = 0
            self._abandoned = True
        try:
            self._close()
        except Exception as exc:  # a peer that is gone at the end: already counted
            self.last_error = mask_secrets(str(exc))

    def stats(self) -> dict[str, Any]:
        with self._cv:
            out = {"sink": self.name, "send": self.send, "offered": self.offered, "sent": self.sent, "failed": self.failed,
                   "dropped": self.dropped, "queued": len(self._queue) + self._inflight, "latency_ms": percentiles(self.latency) if self.latency else None}
        if self.last_error:
            out["last_error"] = self.last_error
        return out

    # -- the sink's thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if not self._queue:
                    return
                message, captured = self._queue.popleft()
                if self._give_up():  # the run has ended and the drain time is over: what is left is dropped, untried
                    self.dropped += 1 + len(self._queue)
                    self._queue.clear()
                    return
                self._inflight = 1
            outcome, error, delivered = "sent", None, 0.0
            try:
                delivered = self._deliver(message)
            except Undelivered as exc:
                outcome, error = ("dropped" if exc.dropped else "failed"), str(exc)
            except Exception as exc:  # a library error is a failed message, never a dead sink
                outcome, error = "failed", f"{type(exc).__name__}: {exc}"
            with self._cv:
                if self._abandoned:  # close() already counted this one
                    return
                self._inflight = 0
                if outcome == "sent":
                    self.sent += 1
                    self.latency.append((delivered - captured) * 1e3)
                else:
                    setattr(self, outcome, getattr(self, outcome) + 1)
                    lost = self.failed + self.dropped
                    if lost <= 3 or lost % 100 == 0:  # said while it happens, not only in the summary: a reject that may not have reached the line
                        what = "could not be delivered" if outcome == "failed" else "was dropped"
                        print(f"warning: sink {self.name}: a message {what} ({mask_secrets(error or '')}); {lost} undelivered so far",
                              file=sys.stderr, flush=True)
                    self.last_error = mask_secrets(error)

    def _give_up(self) -> bool:
        """True once the run has ended and the drain time is over."""
        return time.perf_counter() > self._deadline

    def _open(self) -> None:
        pass

    def _deliver(self, message: dict) -> float:
        """Deliver one message; returns perf_counter when it counted as delivered, or raises ``Undelivered``."""
        raise NotImplementedError

    def _close(self) -> None:
        pass


class MqttSink(Sink):
    """One JSON message per verdict (``send=all``) or per anomalous frame, QoS 1 by default, on
    ``topic``; a retained status message on ``topic/status`` (running / stopped, with the model and
    threshold; the broker publishes ``lost`` if the process dies). paho reconnects with bounded
    backoff; while disconnected, messages wait in the sink's bounded queue."""

    def __init__(self, url: str):
        u, user, password, port = _split(url)
        q = _query(u, {"send": str, "qos": int, "queue": int, "drain_s": float, "client_id": str})
        super().__init__(url, q.get("send", "all"), q.get("queue", 1000), q.get("drain_s", 5.0))
        self.qos = q.get("qos", 1)
        if self.qos not in (0, 1, 2):
            raise StfpmError(f"--sink {self.name}: qos must be 0, 1 or 2")
        self.topic = urllib.parse.unquote(u.path.lstrip("/")) or "stfpm-edge/verdicts"
        if u.fragment or "#" in url or any(c in self.topic for c in "#+"):
            raise StfpmError(f"--sink {self.name}: the topic may not hold MQTT wildcards (# +)")
        self.status_topic = f"{self.topic}/status"
        self.host, self.port, self.tls = u.hostname or "127.0.0.1", port or (8883 if u.scheme == "mqtts" else 1883), u.scheme == "mqtts"
        self.username, self.password = user, password
        self.client_id = q.get("client_id") or f"stfpm-edge-{os.getpid()}-{id(self) & 0xFFFF:x}"
        need_line_extra("paho.mqtt.client", "--sink mqtt://...", "paho-mqtt")
        self._connected = threading.Event()

    def _status(self, state: str) -> str:
        return json.dumps({"state": state, **self.context})

    def _open(self) -> None:
        c = mqtt_client(self.client_id, self.username, self.password, self.tls)
        c.will_set(self.status_topic, self._status("lost"), qos=1, retain=True)

        def on_connect(client, userdata, flags, reason, properties):
            if not reason.is_failure:
                client.publish(self.status_topic, self._status("running"), qos=1, retain=True)
                self._connected.set()
            else:
                self.last_error = f"broker refused the connection: {reason}"

        def on_disconnect(client, userdata, flags, reason, properties):
            self._connected.clear()

        c.on_connect, c.on_disconnect = on_connect, on_disconnect
        c.connect_async(self.host, self.port, keepalive=10)
        c.loop_start()
        self.client = c

    def _deliver(self, message: dict) -> float:
        payload = json.dumps(message)
        while True:
            while not self._connected.wait(0.2):
                if self._give_up():
                    raise Undelivered("broker not reachable when the run ended", dropped=True)
            info = self.client.publish(self.topic, payload, qos=self.qos)
            if self.qos == 0:
                if info.rc == 0:
                    return time.perf_counter()
                time.sleep(0.1)  # not handed to the socket (the connection just dropped): try again shortly
                continue
            # QoS 1/2: delivered when the broker acknowledges; paho re-sends in-flight messages after
            # a reconnect, so keep waiting for this one rather than publishing it twice
            while not info.is_published():
                if self._give_up():
                    raise Undelivered("not acknowledged by the broker when the run ended", dropped=True)
                try:
                    info.wait_for_publish(0.2)
                except (RuntimeError, ValueError):  # not queued (client-side limit): publish again shortly
                    time.sleep(0.1)
                    break
            else:
                return time.perf_counter()

    def _close(self) -> None:
        if self._connected.is_set():
            info = self.client.publish(self.status_topic, self._status("stopped"), qos=1, retain=True)
            try:
                info.wait_for_publish(2.0)
            except (RuntimeError, ValueError):
                pass
        self.client.disconnect()
        self.client.loop_stop()


class ModbusSink(Sink):
    """A reject pulse on coil N for each anomalous frame (or line-scan detection): the coil goes on,
    stays on ``pulse_ms``, goes off, and stays off as long again before the next pulse, so a PLC
    counts every edge. Latency is frame capture -> coil on."""

    def event(self, record: dict) -> None:  # a reject coil carries verdicts only: a drift event must not pulse it
        pass

    def __init__(self, url: str):
        u, _, _, port = _split(url)
        q = _query(u, {"pulse_ms": float, "unit": int, "queue": int, "drain_s": float, "timeout": float})
        parts = [p for p in u.path.split("/") if p]
        if len(parts) != 2 or parts[0] != "coil" or not parts[1].isdigit():
            raise StfpmError(f"--sink {mask_secrets(url)}: a Modbus sink is modbus://host:502/coil/N (N: the coil address)")
        self.coil, self.pulse_s, self.unit = int(parts[1]), q.get("pulse_ms", 200.0) / 1e3, q.get("unit", 1)
        if not 0 < self.pulse_s <= 10:
            raise StfpmError(f"--sink {mask_secrets(url)}: pulse_ms must lie in (0, 10000]")
        super().__init__(url, "anomalous", q.get("queue", 100), q.get("drain_s", 5.0))
        self.host, self.port, self.timeout = u.hostname or "127.0.0.1", port or 502, q.get("timeout", 1.0)
        self.try_s = 2 * self.timeout + 2 * self.pulse_s
        self.stuck_on = False  # the coil was set and the reset has not been acknowledged yet
        need_line_extra("pymodbus.client", "--sink modbus://...", "pymodbus")

    def _open(self) -> None:
        self.client = modbus_client(self.host, self.port, self.timeout)

    def _write(self, value: bool) -> None:
        if not self.client.connected and not self.client.connect():
            raise Undelivered(f"no connection to the PLC at {self.host}:{self.port}")
        rr = self.client.write_coil(self.coil, value, device_id=self.unit)
        if rr.isError():
            raise Undelivered(f"PLC refused coil {self.coil} := {value}: {rr}")

    def _deliver(self, message: dict) -> float:
        if self.stuck_on:  # the last pulse's "off" did not reach the PLC: end it before anything else
            self._write(False)
            self.stuck_on = False
        self._write(True)
        on = time.perf_counter()
        self.stuck_on = True
        time.sleep(self.pulse_s)
        self._write(False)
        self.stuck_on = False
        time.sleep(self.pulse_s)
        return on

    def _close(self) -> None:
        try:
            if self.stuck_on:  # never leave the reject coil on
                self._write(False)
                self.stuck_on = False
        finally:
            self.client.close()

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "coil": self.coil, "pulse_ms": self.pulse_s * 1e3, "coil_left_on": self.stuck_on}


class WebhookSink(Sink):
    """POST the JSON record of each anomalous frame (``send=all``: every verdict); ``timeout`` s per
    try, ``retries`` more tries with a growing pause; then the message counts as failed."""

    def __init__(self, url: str):
        u, user, password, _ = _split(url)
        q = _query(u, {"send": str, "timeout": float, "retries": int, "queue": int, "drain_s": float}, foreign_ok=True)
        super().__init__(url, q.get("send", "anomalous"), q.get("queue", 1000), q.get("drain_s", 5.0))
        self.timeout, self.retries = q.get("timeout", 2.0), q.get("retries", 2)
        if self.timeout <= 0 or self.retries < 0:
            raise StfpmError(f"--sink {self.name}: timeout must be > 0 and retries >= 0")
        self.try_s = self.timeout
        kept = [(k, v) for k, v in urllib.parse.parse_qsl(u.query, keep_blank_values=True) if k not in q]
        self.target = urllib.parse.urlunsplit((u.scheme, u.netloc, u.path or "/", urllib.parse.urlencode(kept), ""))
        self.headers = {"Content-Type": "application/json", "User-Agent": "stfpm-edge"}
        if user:
            import base64

            creds = f"{user}:{password or ''}".encode()
            self.headers["Authorization"] = "Basic " + base64.b64encode(creds).decode()

    def _deliver(self, message: dict) -> float:
        body = json.dumps(message).encode()
        why = ""
        for attempt in range(self.retries + 1):
            if attempt:
                if self._give_up():
                    raise Undelivered(f"webhook: {why} (no retry after the run ended)")
                time.sleep(min(0.25 * 2 ** (attempt - 1), 2.0))
            try:
                req = urllib.request.Request(self.target, data=body, headers=self.headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    resp.read(1 << 16)
                return time.perf_counter()
            except urllib.error.HTTPError as exc:
                why = f"HTTP {exc.code}"
                if 400 <= exc.code < 500 and exc.code not in (408, 429):  # the request itself is wrong: retrying will not help
                    break
            except (urllib.error.URLError, OSError) as exc:
                why = str(getattr(exc, "reason", exc))
        raise Undelivered(f"webhook: {why} after {attempt + 1} tries")


SCHEMES = {"mqtt": MqttSink, "mqtts": MqttSink, "modbus": ModbusSink, "http": WebhookSink, "https": WebhookSink}


def make_sink(url: str) -> Sink:
    """A sink for ``url`` (not started: the URL and its options are checked, nothing connects)."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in SCHEMES:
        raise StfpmError(f"--sink {mask_secrets(url)}: unknown kind; use mqtt://, mqtts://, modbus://, http:// or https://")
    return SCHEMES[scheme](url)
