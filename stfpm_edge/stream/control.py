"""Where a changeover comes from besides the station: the line's message bus or the PLC (``run --recipe-from URL``).

- ``mqtt://[user:pw@]host[:1883]/topic``: a message on ``topic`` names the product: its text is the
  recipe name, or JSON ``{"recipe": NAME}``. Subscribed with QoS 1; paho reconnects on its own.
- ``modbus://host[:502]/register/N[?unit=1&poll_ms=100]``: the PLC's product index in holding register N,
  read every ``poll_ms``: 1 is the run's first model, 2 the second, ...; 0 means no product (nothing
  changes). A new value switches; an index the run has no model for is refused.

Every request goes through ``Inspector.request_recipe`` (the switch happens between two engine calls);
an unknown name or index is a ``recipe_refused`` event record saying who asked. A peer that cannot be
reached does not stop the run: the subscription and the polling retry, and the first failure is an
event record too.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse

from ..errors import StfpmError
from ..fileio import mask_secrets
from .sinks import _query, _split, modbus_client, mqtt_client, need_line_extra


class RecipeControl:
    """Base: ``start(inspector, events)`` then ``close()``; subclasses call ``ask`` with a recipe name (or None)."""

    def __init__(self, url: str):
        self.url, self.name = url, mask_secrets(url)
        self.inspector = None
        self.events: list = []
        self.requests = 0
        self.refused = 0
        self.error_reported = False

    def start(self, inspector, events: list) -> "RecipeControl":
        self.inspector, self.events = inspector, events
        self._open()
        return self

    def ask(self, name: str | None, who: str, raw=None) -> None:
        self.requests += 1
        try:
            if name is None:
                raise KeyError(raw)
            self.inspector.request_recipe(name, who)
        except KeyError:
            self.refused += 1
            self.events.append({"event": "recipe_refused", "name": name if name is not None else raw, "by": who, "time": time.time(),
                                "error": f"no recipe {name if name is not None else raw!r}; this run has {', '.join(self.inspector.recipes)}"})

    def problem(self, why: str) -> None:
        if not self.error_reported:  # once: the control keeps retrying
            self.error_reported = True
            self.events.append({"event": "recipe_control_failed", "control": self.name, "error": mask_secrets(why), "time": time.time()})

    def stats(self) -> dict:
        return {"control": self.name, "requests": self.requests, "refused": self.refused}

    def _open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class MqttRecipe(RecipeControl):
    def __init__(self, url: str):
        super().__init__(url)
        u, self.user, self.password, port = _split(url)
        q = _query(u, {"qos": int, "client_id": str})
        self.topic = urllib.parse.unquote(u.path.lstrip("/"))
        if not self.topic or any(c in self.topic for c in "#+"):
            raise StfpmError(f"--recipe-from {self.name}: name one topic (no MQTT wildcards), e.g. mqtt://broker:1883/line7/recipe")
        self.host, self.port, self.tls = u.hostname or "127.0.0.1", port or (8883 if u.scheme == "mqtts" else 1883), u.scheme == "mqtts"
        self.qos = q.get("qos", 1)
        self.client_id = q.get("client_id")
        need_line_extra("paho.mqtt.client", "--recipe-from mqtt://...", "paho-mqtt")

    def _open(self) -> None:
        c = mqtt_client(self.client_id, self.user, self.password, self.tls)

        def on_connect(client, userdata, flags, reason, properties):
            if reason.is_failure:
                self.problem(f"broker refused the connection: {reason}")
            else:
                client.subscribe(self.topic, qos=self.qos)

        def on_message(client, userdata, msg):
            text = msg.payload.decode("utf-8", "replace").strip()
            name = text
            if text.startswith("{"):
                try:
                    body = json.loads(text)
                    name = body.get("recipe") if isinstance(body, dict) else None
                except ValueError:
                    name = None
            self.ask(name if isinstance(name, str) and name else None, f"mqtt {msg.topic}", raw=text[:100])

        c.on_connect, c.on_message = on_connect, on_message
        try:
            c.connect_async(self.host, self.port, keepalive=10)
        except OSError as exc:
            self.problem(str(exc))
        c.loop_start()
        self.client = c

    def close(self) -> None:
        if getattr(self, "client", None) is not None:
            self.client.disconnect()
            self.client.loop_stop()


class ModbusRecipe(RecipeControl):
    def __init__(self, url: str):
        super().__init__(url)
        u, _, _, port = _split(url)
        q = _query(u, {"unit": int, "poll_ms": float, "timeout": float})
        parts = [p for p in u.path.split("/") if p]
        if len(parts) != 2 or parts[0] != "register" or not parts[1].isdigit():
            raise StfpmError(f"--recipe-from {self.name}: the product index is read from modbus://host:502/register/N (N: a holding register)")
        self.register, self.unit = int(parts[1]), q.get("unit", 1)
        self.poll_s, self.timeout = q.get("poll_ms", 100.0) / 1e3, q.get("timeout", 1.0)
        if not 0.005 <= self.poll_s <= 60:
            raise StfpmError(f"--recipe-from {self.name}: poll_ms must lie in [5, 60000]")
        self.host, self.port = u.hostname or "127.0.0.1", port or 502
        self.last: int | None = None
        self._stop = threading.Event()
        need_line_extra("pymodbus.client", "--recipe-from modbus://...", "pymodbus")

    def _open(self) -> None:
        self.client = modbus_client(self.host, self.port, self.timeout)
        self._thread = threading.Thread(target=self._poll, name="recipe-modbus", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        who = f"modbus register {self.register} at {self.host}:{self.port}"
        while not self._stop.is_set():
            try:
                if not self.client.connected and not self.client.connect():
                    raise OSError(f"no connection to the PLC at {self.host}:{self.port}")
                rr = self.client.read_holding_registers(self.register, count=1, device_id=self.unit)
                if rr.isError():
                    raise OSError(f"PLC refused to read register {self.register}: {rr}")
                value = int(rr.registers[0])
                if value != self.last:
                    self.last = value
                    if value:  # 0: no product selected
                        names = self.inspector.recipes
                        self.ask(names[value - 1] if value <= len(names) else None, who, raw=f"product index {value}")
            except Exception as exc:  # the PLC away: keep polling, report once
                self.problem(str(exc))
            self._stop.wait(self.poll_s)

    def close(self) -> None:
        self._stop.set()
        if getattr(self, "_thread", None) is not None:
            self._thread.join(self.poll_s + self.timeout + 1)
        if getattr(self, "client", None) is not None:
            self.client.close()


def make_control(url: str) -> RecipeControl:
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("mqtt", "mqtts"):
        return MqttRecipe(url)
    if scheme == "modbus":
        return ModbusRecipe(url)
    raise StfpmError(f"--recipe-from {mask_secrets(url)}: use mqtt://host:1883/topic or modbus://host:502/register/N")
