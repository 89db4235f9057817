"""Real peers for the line tests, all on loopback and bounded in time: a Mosquitto broker, a Modbus TCP
server standing in for the PLC (pymodbus), and a webhook target (http.server). Used by the tests
and by benchmarks/line_sinks.py."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import threading
import time
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def mosquitto_path() -> str | None:
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if Path(p).is_file()), None)


class Broker:
    """Mosquitto on 127.0.0.1:<free port>, with persistence (a restart keeps a persistent subscriber's queue)."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {folder}/\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Broker":
        self.proc = subprocess.Popen([mosquitto_path(), "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Subscriber:
    """A persistent MQTT subscriber (QoS 1, clean_session off): keeps its queue across a broker restart."""

    def __init__(self, port: int, topic: str = "#", name: str = "test-subscriber"):
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, bytes, bool, float]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{name}-{port}", clean_session=False)
        self.client.reconnect_delay_set(0.05, 0.2)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload, m.retain, time.perf_counter()))
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe(topic, qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        deadline = time.monotonic() + 10
        while not self.client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # the SUBACK

    def payloads(self, topic: str) -> list[dict]:
        return [json.loads(p) for t, p, _, _ in self.messages if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Plc:
    """A Modbus TCP server standing in for the PLC: records every coil write with its time."""

    def __init__(self):
        self.port = free_port()
        self.writes: list[tuple[float, int, bool]] = []  # (perf_counter, coil, value)
        self._loop = asyncio.new_event_loop()
        self._server = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def _trace(self, sending: bool, pdu):
        if not sending and type(pdu).__name__ == "WriteSingleCoilRequest":
            self.writes.append((time.perf_counter(), pdu.address, bool(pdu.bits[0])))
        return pdu

    def start(self) -> "Plc":
        from pymodbus.server import ModbusTcpServer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the classic data store is deprecated in favour of SimDevice (pymodbus 3.16+)
            from pymodbus.datastore import ModbusDeviceContext, ModbusSequentialDataBlock, ModbusServerContext

            ctx = ModbusServerContext(devices=ModbusDeviceContext(co=ModbusSequentialDataBlock(1, [0] * 64),
                                                                  hr=ModbusSequentialDataBlock(1, [0] * 64)), single=True)

        async def serve():
            self._server = ModbusTcpServer(ctx, address=("127.0.0.1", self.port), trace_pdu=self._trace)
            asyncio.ensure_future(self._server.serve_forever())

        self._thread.start()
        asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)
        wait_port(self.port)
        return self

    def write_register(self, address: int, value: int) -> None:
        """What the PLC program does: put ``value`` in holding register ``address`` (through its own Modbus server)."""
        from pymodbus.client import ModbusTcpClient

        client = ModbusTcpClient("127.0.0.1", port=self.port, timeout=2, retries=1)
        try:
            assert client.connect(), "the PLC stand-in does not answer"
            assert not client.write_register(address, value, device_id=1).isError()
        finally:
            client.close()

    def pulses(self, coil: int) -> list[tuple[float, float]]:
        """(on, off) perf_counter pairs of the coil's pulses."""
        out, on = [], None
        for t, c, v in self.writes:
            if c != coil:
                continue
            if v and on is None:
                on = t
            elif not v and on is not None:
                out.append((on, t))
                on = None
        return out

    def stop(self) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


# the coils and holding register of the handshake tests and benchmark (any five coils and a register would do)
TRIGGER, READY, VALID, OK, ACK, SEQ = 10, 11, 12, 13, 14, 20


class PlcProgram:
    """What the PLC's program does, through its own Modbus server: raise the trigger when ready, read the result when
    valid, acknowledge (or not), and time each step."""

    def __init__(self, port: int):
        from pymodbus.client import ModbusTcpClient

        self.c = ModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=1)
        assert self.c.connect()

    def coil(self, a):
        return bool(self.c.read_coils(a, count=1, device_id=1).bits[0])

    def wait(self, a, value, limit=5.0):
        t0 = time.perf_counter()
        while self.coil(a) != value:
            if time.perf_counter() - t0 > limit:
                raise TimeoutError(f"coil {a} did not become {value}")
            time.sleep(0.002)
        return time.perf_counter()

    def cycle(self, acknowledge=True):
        self.wait(READY, True, limit=30.0)  # the first: the run opens its engine before it is ready
        t0 = time.perf_counter()
        self.c.write_coil(TRIGGER, True, device_id=1)
        t1 = self.wait(VALID, True)
        ok = self.coil(OK)
        seq = self.c.read_holding_registers(SEQ, count=1, device_id=1).registers[0]
        self.c.write_coil(TRIGGER, False, device_id=1)
        if acknowledge:
            self.c.write_coil(ACK, True, device_id=1)
        t2 = self.wait(VALID, False)
        self.c.write_coil(ACK, False, device_id=1)
        return {"ok": ok, "seq": seq, "trigger_to_valid_ms": (t1 - t0) * 1e3, "valid_to_released_ms": (t2 - t1) * 1e3}



class Webhook:
    """A webhook target: ``mode`` 'ok' (200, records the JSON), 'error' (500) or 'hang' (answers after ``hang_s``)."""

    def __init__(self, mode: str = "ok", hang_s: float = 5.0):
        peer = self
        self.mode, self.hang_s = mode, hang_s
        self.received: list[dict] = []
        self.headers: list[dict] = []
        self.requests = 0

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                peer.requests += 1
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if peer.mode == "hang":
                    time.sleep(peer.hang_s)
                code = 500 if peer.mode == "error" else 200
                if code == 200:
                    peer.received.append(json.loads(body))
                    peer.headers.append(dict(self.headers))
                try:
                    self.send_response(code)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> "Webhook":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
