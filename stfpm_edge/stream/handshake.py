"""The PLC handshake (``run --trigger modbus://host:502/handshake?...``): inspect when the PLC says so, answer, wait for its receipt.

One cycle, with the PLC's coils and register named in the URL's query (addresses as the PLC maps them):

1. ``ready`` is on while the next trigger can be served.
2. A rising edge on ``trigger`` (polled every ``poll_ms``): ``ready`` goes off and the source gives one
   frame (the next one it delivers after the edge).
3. Its verdict: ``ok`` is set (on = good part, off = reject), ``seq`` (a holding register) gets the
   cycle's sequence number (1, 2, ... modulo 65536), then ``valid`` goes on.
4. The PLC reads them and sets ``ack``. On ``ack`` (or after ``ack_ms`` without it: a ``plc_ack_missing``
   event, a warning, a count in the summary and a non-zero exit), ``valid`` goes off and ``ready`` on.

A frame that yields no verdict within ``frame_ms`` (undecodable, the source ended) is answered as a
reject (``ok`` off): a part nobody judged is not passed. Every cycle's times (trigger -> valid,
valid -> ack) are in ``summary.json``. The coils are left off (``ready`` too) when the run ends.
"""

from __future__ import annotations

import queue
import sys
import threading
import time

from ..errors import StfpmError
from ..fileio import mask_secrets
from ..scoring import ANOMALOUS
from ..timing import percentiles
from .outputs import Output
from .sinks import _query, _split, modbus_client, need_line_extra
from .sources import Frame, Source

COILS = ("trigger", "ready", "valid", "ok", "ack")


class TriggeredSource(Source):
    """``inner``'s frames, one per trigger: ``read`` waits for ``release()`` (or the run's ``stop``: then the end)."""

    def __init__(self, inner: Source, stop: threading.Event):
        super().__init__(inner.spec)
        self.inner, self.stop, self.live, self.kind = inner, stop, False, inner.kind
        self._released = threading.Semaphore(0)
        self.ended = threading.Event()

    def describe(self) -> str:
        return self.inner.describe()

    def release(self) -> None:
        self._released.release()

    def read(self) -> Frame | None:
        while not self._released.acquire(timeout=0.05):
            if self.stop.is_set():
                return None
        frame = self.inner.read()
        if frame is None:
            self.ended.set()
        return frame

    def close(self) -> None:
        self.inner.close()


class PlcHandshake(Output):
    def __init__(self, url: str):
        self.url, self.name = url, mask_secrets(url)
        u, _, _, port = _split(url)
        q = _query(u, {**{c: int for c in COILS}, "seq": int, "unit": int, "poll_ms": float, "ack_ms": float, "frame_ms": float, "timeout": float})
        if u.scheme != "modbus" or [p for p in u.path.split("/") if p] != ["handshake"]:
            raise StfpmError(f"--trigger {self.name}: give modbus://host:502/handshake?trigger=C&ready=C&valid=C&ok=C&ack=C&seq=R (coil and register addresses)")
        missing = [c for c in (*COILS, "seq") if c not in q]
        if missing:
            raise StfpmError(f"--trigger {self.name}: name the PLC's {', '.join(missing)} (e.g. ...?trigger=0&ready=1&valid=2&ok=3&ack=4&seq=0)")
        if len({q[c] for c in COILS}) != len(COILS):
            raise StfpmError(f"--trigger {self.name}: the coils trigger, ready, valid, ok and ack must be five different addresses")
        self.coil = {c: q[c] for c in COILS}
        self.seq_register, self.unit = q["seq"], q.get("unit", 1)
        self.poll_s, self.ack_s, self.frame_s, self.timeout = (q.get("poll_ms", 5.0) / 1e3, q.get("ack_ms", 1000.0) / 1e3,
                                                               q.get("frame_ms", 2000.0) / 1e3, q.get("timeout", 1.0))
        if not (0.001 <= self.poll_s <= 1 and 0.01 <= self.ack_s <= 600 and 0.05 <= self.frame_s <= 600):
            raise StfpmError(f"--trigger {self.name}: poll_ms 1..1000, ack_ms 10..600000, frame_ms 50..600000")
        self.host, self.port = u.hostname or "127.0.0.1", port or 502
        need_line_extra("pymodbus.client", "--trigger modbus://...", "pymodbus")
        self.source: TriggeredSource | None = None
        self.events: list = []
        self._verdicts: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self.cycles = self.acks_missing = self.no_verdict = self.plc_errors = 0
        self.trigger_to_valid: list[float] = []
        self.valid_to_ack: list[float] = []
        self.last_error: str | None = None

    # -- the run's side ---------------------------------------------------------------------------
    def gate(self, source: Source, stop: threading.Event) -> TriggeredSource:
        """Wrap the run's source: it gives a frame per trigger (until ``stop``)."""
        self.source = TriggeredSource(source, stop)
        return self.source

    def start(self) -> "PlcHandshake":
        self.client = modbus_client(self.host, self.port, self.timeout)
        if not self.client.connect():
            raise StfpmError(f"--trigger {self.name}: no PLC answers at {self.host}:{self.port}")
        self._thread = threading.Thread(target=self._cycle_forever, name="plc-handshake", daemon=True)
        self._thread.start()
        return self

    def write(self, insp, picture) -> None:  # the verdict of the frame a trigger released
        self._verdicts.put((insp.frame.index, insp.result.verdict != ANOMALOUS, insp.result.score))

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if getattr(self, "_thread", None) is not None:
            self._thread.join(self.ack_s + self.frame_s + 2 * self.timeout + 1)
        if getattr(self, "client", None) is not None:
            try:
                for c in ("valid", "ready"):
                    self._coil(c, False)
            except Exception:  # the PLC away at the end: nothing more to do
                pass
            self.client.close()

    def stats(self) -> dict:
        out = {"plc": self.name, "cycles": self.cycles, "acks_missing": self.acks_missing, "no_verdict": self.no_verdict,
               "plc_errors": self.plc_errors,
               "trigger_to_valid_ms": percentiles(self.trigger_to_valid) if self.trigger_to_valid else None,
               "valid_to_ack_ms": percentiles(self.valid_to_ack) if self.valid_to_ack else None}
        if self.last_error:
            out["last_error"] = self.last_error
        return out

    # -- the PLC's side ---------------------------------------------------------------------------
    def _coil(self, name: str, value: bool) -> None:
        if self.client.write_coil(self.coil[name], value, device_id=self.unit).isError():
            raise OSError(f"PLC refused coil {name} ({self.coil[name]})")

    def _read(self, name: str) -> bool:
        rr = self.client.read_coils(self.coil[name], count=1, device_id=self.unit)
        if rr.isError():
            raise OSError(f"PLC refused to read coil {name} ({self.coil[name]})")
        return bool(rr.bits[0])

    def _cycle_forever(self) -> None:
        seq, previous = 0, None
        while not self._stop.is_set() and not (self.source is not None and self.source.ended.is_set()):
            try:
                if previous is None:  # (re)starting: a trigger already on is not an edge; one raised once ready is
                    self._coil("valid", False)
                    previous = self._read("trigger")
                    self._coil("ready", True)
                now = self._read("trigger")
                if now and not previous:
                    seq = (seq + 1) % 65536
                    now = self._cycle(seq)  # the trigger as it was just before ready went on again: a raise after that is an edge
                previous = now
            except Exception as exc:  # the PLC away: report, wait, start over
                self.plc_errors += 1
                self.last_error = mask_secrets(str(exc))
                if self.plc_errors == 1:
                    self.events.append({"event": "plc_error", "plc": self.name, "error": self.last_error, "time": time.time()})
                previous = None
                self._stop.wait(0.5)
                continue
            self._stop.wait(self.poll_s)

    def _cycle(self, seq: int) -> bool:
        """One trigger's cycle; returns the trigger's state read just before ``ready`` goes on again."""
        t0 = time.perf_counter()
        self._coil("ready", False)
        self.source.release()
        try:
            frame, ok, _score = self._verdicts.get(timeout=self.frame_s)
        except queue.Empty:  # nobody judged the part: reject it
            frame, ok = None, False
            self.no_verdict += 1
            self.events.append({"event": "plc_no_verdict", "seq": seq, "waited_ms": round(self.frame_s * 1e3), "answered": "NG", "time": time.time()})
        self._coil("ok", ok)
        if self.client.write_register(self.seq_register, seq, device_id=self.unit).isError():
            raise OSError(f"PLC refused register seq ({self.seq_register})")
        self._coil("valid", True)
        t1 = time.perf_counter()
        self.cycles += 1
        self.trigger_to_valid.append((t1 - t0) * 1e3)
        acked = False
        while time.perf_counter() - t1 < self.ack_s:  # also while the run ends: the last result must reach the PLC
            if self._read("ack"):
                acked = True
                break
            time.sleep(self.poll_s)
        if acked:
            self.valid_to_ack.append((time.perf_counter() - t1) * 1e3)
        else:
            self.acks_missing += 1
            event = {"event": "plc_ack_missing", "seq": seq, "frame": frame, "verdict": "OK" if ok else "NG",
                     "waited_ms": round((time.perf_counter() - t1) * 1e3), "time": time.time()}
            self.events.append(event)
            print(f"warning: the PLC did not acknowledge result {seq} ({event['verdict']}, frame {frame}) within "
                  f"{self.ack_s * 1e3:.0f} ms", file=sys.stderr, flush=True)
        self._coil("valid", False)
        trigger = self._read("trigger")
        self._coil("ready", True)
        return trigger
