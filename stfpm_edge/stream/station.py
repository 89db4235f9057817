"""The operator station: a web page served by the run itself (Starlette on uvicorn, in a thread).

What the operator at the machine sees: the live annotated stream (MJPEG, a tile per source), counters (inspected,
anomalous, dropped, failed, FPS, latency p50/p99), a gallery of the latest anomalies with their heat
maps, and a threshold control that first shows what a new value would do on the model's held-out
good images (stored in the model at training time) and on the run's recent frames, then applies it
to the next frames and logs the change as an event in the JSONL.

Safety: binds to loopback unless told otherwise; a non-loopback bind needs a token, and every
request that changes state must carry it (``Authorization: Bearer <token>``); state changes must be
JSON requests from the page's own origin (a foreign page cannot post to it); on loopback, requests
must name a loopback host (no DNS rebinding); files are served only from the run folder's
``anomalies/`` and only pictures.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import socket
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import StfpmError
from ..scoring import ANOMALOUS
from ..timing import percentiles
from .counters import merged
from .inspection import crop
from .outputs import Output, anomaly_stem, frame_record

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")
STREAM_FPS = 10.0  # frames per second sent to viewers (encoded only while someone watches)
STREAM_WIDTH = 960  # the streamed picture is scaled down to at most this width
GALLERY = 24
FEEDBACK_LABELS = ("good", "defect")  # the operator's word, and the folder under feedback/ it goes to
RAW_BYTES = 256 << 20  # the latest anomalous frames' pixels kept for feedback, at most this many bytes (the oldest go first)
PICTURE_SUFFIXES = (".jpg", ".png")


def parse_bind(value: str) -> tuple[str, int]:
    """``host:port`` or ``port`` (loopback) -> (host, port), checked."""
    host, _, port = value.rpartition(":") if ":" in value else ("127.0.0.1", "", value)
    host = host.strip("[]") or "127.0.0.1"
    try:
        port_n = int(port)
    except ValueError:
        raise StfpmError(f"--ui {value!r}: give host:port (e.g. 127.0.0.1:8080) or a port") from None
    if not 0 <= port_n <= 65535:
        raise StfpmError(f"--ui {value!r}: port out of range")
    return host, port_n


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_ui(bind: str, token: str | None) -> tuple[str, int]:
    """(host, port) of a --ui bind, refused when it reaches beyond this machine without a token."""
    host, port = parse_bind(bind)
    if not is_loopback(host) and not token:
        raise StfpmError(f"--ui {bind}: serving beyond this machine needs a token for changes (--ui-token or STFPM_UI_TOKEN)")
    return host, port


class Station(Output):
    """An ``Output`` of the area-scan loop that also serves the page; ``start()`` binds the port."""

    def __init__(self, bind: str, run_dir: Path, per_source: list, names: list[str], inspector, events: list, token: str | None = None,
                 title: str = ""):
        self.host, self.port = check_ui(bind, token)
        self.loopback = is_loopback(self.host)
        self.run_dir, self.per_source, self.names, self.inspector, self.events, self.token = run_dir, per_source, names, inspector, events, token
        self.title = title
        self._lock = threading.Lock()
        self._frames: dict[int, tuple[bytes, int]] = {}  # source -> (latest JPEG, sequence number)
        self._last_encode: dict[int, float] = {}
        self.viewers = 0
        self.recent_scores: deque = deque(maxlen=1000)
        self.gallery: deque = deque(maxlen=GALLERY)
        self._raw: dict = {}  # (source, frame) -> (the pixels the model judged, the frame's record): for the operator's feedback
        self.feedback: list[dict] = []
        self.changes: list[dict] = []
        self.drift_notes: dict[str, str | None] = {}  # source -> what drifted (None once cleared)
        self._fps_marks = [(time.perf_counter(), 0)] * len(per_source)
        self._fps = [0.0] * len(per_source)
        self.closed = False
        self._server = None
        self._thread: threading.Thread | None = None

    # -- the output side (the run's output thread) -------------------------------------------------
    def write(self, insp, picture) -> None:
        r = insp.result
        self.recent_scores.append(r.score)
        if r.verdict == ANOMALOUS:
            self._keep_raw((insp.source, insp.frame.index), crop(insp.frame.image, picture.roi), frame_record(insp))
            stem = anomaly_stem(insp)
            files = {kind: f"anomalies/{stem}_{kind}{suffix}" for kind, suffix in (("overlay", ".jpg"), ("heatmap", ".png"))}
            self.gallery.appendleft({"frame": insp.frame.index, "source": self.names[insp.source], "source_index": insp.source, "score": r.score,
                                     "normalized_score": r.normalized_score, "time": time.time(),
                                     **{k: v for k, v in files.items() if (self.run_dir / v).is_file()}})
        now, src = time.perf_counter(), insp.source
        if self.viewers and now - self._last_encode.get(src, 0.0) >= 1.0 / STREAM_FPS:
            vis = picture.image
            if vis.shape[1] > STREAM_WIDTH:
                vis = cv2.resize(vis, (STREAM_WIDTH, round(vis.shape[0] * STREAM_WIDTH / vis.shape[1])), interpolation=cv2.INTER_AREA)
            ok, buf = cv2.imencode(".jpg", vis, [cv2.IMWRITE_JPEG_QUALITY, 80])
            if ok:
                with self._lock:
                    self._frames[src] = (buf.tobytes(), self._frames.get(src, (b"", 0))[1] + 1)
            self._last_encode[src] = now

    def _keep_raw(self, key, pixels: np.ndarray, record: dict) -> None:
        with self._lock:
            self._raw[key] = (pixels, record)
            while len(self._raw) > GALLERY or (len(self._raw) > 1 and sum(v[0].nbytes for v in self._raw.values()) > RAW_BYTES):
                self._raw.pop(next(iter(self._raw)))

    def mark(self, frame: int, source: int, label: str, who: str) -> tuple[int, dict[str, Any]]:
        """The operator's word on a flagged frame: its pixels (what the model judged: the ROI) and record to
        ``feedback/good/`` (a false call: for ``stfpm-edge update --add-good``) or ``feedback/defect/`` (confirmed: for evaluation).
        Returns (HTTP status, the event or the error)."""
        from ..fileio import atomic_write_bytes, atomic_write_json

        if label not in FEEDBACK_LABELS:
            return 400, {"error": f"label must be one of {', '.join(FEEDBACK_LABELS)}"}
        with self._lock:
            kept = self._raw.get((source, frame))
        if kept is None:
            return 404, {"error": f"frame {frame} is not among the latest flagged frames kept ({GALLERY})"}
        pixels, record = kept
        stem = f"{frame:06d}" if len(self.names) <= 1 else f"s{source}-{frame:06d}"
        ok, png = cv2.imencode(".png", pixels)
        if not ok:
            return 500, {"error": "the frame could not be encoded"}
        atomic_write_bytes(self.run_dir / "feedback" / label / f"{stem}.png", png.tobytes())
        event = {"event": "feedback", "frame": frame, "source": self.names[source] if self.names else None, "label": label, "by": who,
                 "time": time.time(), "file": str(Path("feedback") / label / f"{stem}.png")}
        atomic_write_json(self.run_dir / "feedback" / label / f"{stem}.json", {**record, "feedback": event})
        self.feedback.append(event)
        self.events.append(event)
        return 200, event

    def event(self, record: dict) -> None:
        if record.get("event") == "drift":  # the banner's text, per source
            from ..drift import describe

            self.drift_notes[record.get("source") or self.names[0]] = describe(record) if record["state"] == "raised" else None

    def close(self) -> None:
        self.closed = True
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)

    # -- what the page asks for -------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        now = time.perf_counter()
        sources = []
        for i, (c, name) in enumerate(zip(self.per_source, self.names)):
            t0, n0 = self._fps_marks[i]
            if now - t0 >= 1.0:
                self._fps[i] = (c.inspected - n0) / (now - t0)
                self._fps_marks[i] = (now, c.inspected)
            sources.append({"name": name, "inspected": c.inspected, "anomalous": c.anomalous, "dropped": c.dropped, "failed": c.failed,
                            "fps": round(self._fps[i], 2), "drifting": bool(c.drift is not None and c.drift.drifting)})
        total = merged(self.per_source)
        lat = {k: percentiles(list(total.latency[k])) for k in ("inference", "end_to_end") if total.latency.get(k)}
        return {"title": self.title, "inspected": total.inspected, "anomalous": total.anomalous, "dropped": total.dropped, "failed": total.failed,
                "read": total.read, "fps": round(sum(self._fps), 2), "latency_ms": lat, "threshold": self.inspector.threshold,
                "model_threshold": (self.inspector.meta.get("threshold") or {}).get("image"), "sources": sources,
                "gallery": list(self.gallery), "changes": self.changes[-10:], "running": not self.closed,
                "drift": [note for note in self.drift_notes.values() if note],
                "recipe": self.inspector.recipe, "recipes": self.inspector.recipes}

    def preview(self, value: float) -> dict[str, Any]:
        """What ``value`` would do: false alarms on the model's held-out good images, and how many
        of the run's recent frames it would call anomalous (against the current threshold)."""
        held = np.asarray((self.inspector.meta.get("normal_stats") or {}).get("heldout_scores") or [], dtype=np.float64)
        recent = np.asarray(list(self.recent_scores), dtype=np.float64)
        now = self.inspector.threshold
        out: dict[str, Any] = {"value": value, "current": now, "recent_frames": int(recent.size),
                               "recent_anomalous_now": int((recent > now).sum()) if now is not None else None,
                               "recent_anomalous_new": int((recent > value).sum())}
        if held.size:
            out.update(heldout_images=int(held.size), heldout_false_alarms_new=int((held > value).sum()),
                       heldout_false_alarms_now=int((held > now).sum()) if now is not None else None)
        else:
            out["heldout_images"] = 0
            out["note"] = "this model stores no held-out good scores (trained before they were kept): retrain to see false alarms"
        return out

    def operating(self) -> dict[str, Any]:
        """The running model's operating curve from its out-of-fold good scores (no defect images on a line): for each
        threshold, the share of good parts it would reject, with the current threshold and the model's target rate."""
        held = np.sort(np.asarray((self.inspector.meta.get("normal_stats") or {}).get("heldout_scores") or [], dtype=np.float64))
        rule = self.inspector.meta.get("threshold") or {}
        now = self.inspector.threshold
        out: dict[str, Any] = {"current": now, "model_threshold": rule.get("image"), "target": rule.get("false_call_rate"),
                               "n": int(held.size), "thresholds": [], "false_call_rate": []}
        if held.size and now is not None:
            top = max(float(held[-1]), float(now), float(rule.get("image") or now)) * 1.15
            grid = np.linspace(float(held[0]), top, 120)
            out["thresholds"] = grid.tolist()
            out["false_call_rate"] = (1.0 - np.searchsorted(held, grid, side="right") / held.size).tolist()
            out["current_false_call_rate"] = float((held > now).mean())
        return out

    def apply(self, value: float, who: str) -> dict[str, Any]:
        old = self.inspector.set_threshold(value)
        event = {"event": "threshold_changed", "old": old, "new": float(value), "by": who, "time": time.time(),
                 "after_frames_read": [c.read for c in self.per_source]}
        self.changes.append(event)
        self.events.append(event)  # the output stage writes it into the JSONL before the next record
        return event

    def switch(self, name: str, who: str) -> dict[str, Any]:
        """Ask for recipe ``name`` from the next engine call on; an unknown one is refused and logged."""
        recipes = self.inspector.recipes
        try:
            self.inspector.request_recipe(name, who)
        except KeyError:
            why = f"no recipe named {name!r}; this run has {', '.join(recipes)}" if recipes else "this run has one model (give run several to switch)"
            event = {"event": "recipe_refused", "name": name, "by": who, "time": time.time(), "error": why}
            self.changes.append(event)
            self.events.append(event)
            return event
        return {"requested": name, "by": who, "time": time.time(), "note": "judges from the next frame the engine takes"}

    # -- the web app ------------------------------------------------------------------------------
    def _app(self):
        from starlette.applications import Starlette
        from starlette.middleware import Middleware
        from starlette.middleware.trustedhost import TrustedHostMiddleware
        from starlette.requests import Request
        from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
        from starlette.routing import Route

        def page(request: Request):
            return HTMLResponse(PAGE.replace("__TITLE__", _html_escape(self.title or "stfpm-edge")),
                                headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                                         "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'"})

        def state(request: Request):
            return JSONResponse(self.state(), headers={"Cache-Control": "no-store"})

        def number(raw) -> float | None:
            try:
                v = float(raw)
            except (TypeError, ValueError):
                return None
            return v if np.isfinite(v) else None

        def operating(request: Request):
            return JSONResponse(self.operating(), headers={"Cache-Control": "no-store"})

        def preview(request: Request):
            v = number(request.query_params.get("value"))
            if v is None:
                return JSONResponse({"error": "value must be a finite number"}, status_code=400)
            return JSONResponse(self.preview(v))

        async def change(request: Request):
            body, refused = await _posted(request, self.token, "threshold")
            if refused is not None:
                return refused
            v = number(body.get("value"))
            if v is None:
                return JSONResponse({"error": "value must be a finite number"}, status_code=400)
            return JSONResponse(self.apply(v, _who(request)))

        async def feedback(request: Request):
            body, refused = await _posted(request, self.token, "feedback")
            if refused is not None:
                return refused
            try:
                frame, source = int(body.get("frame")), int(body.get("source", 0))
            except (TypeError, ValueError):
                return JSONResponse({"error": "frame (and source) must be numbers"}, status_code=400)
            status, result = self.mark(frame, source, str(body.get("label")), _who(request))
            return JSONResponse(result, status_code=status)

        async def recipe(request: Request):
            body, refused = await _posted(request, self.token, "recipe")
            if refused is not None:
                return refused
            name = body.get("name")
            result = self.switch(name if isinstance(name, str) else "", _who(request))
            return JSONResponse(result, status_code=200 if "error" not in result else (400 if not self.inspector.recipes else 404))

        async def stream(request: Request):
            try:
                src = int(request.query_params.get("source", "0"))
            except ValueError:
                src = -1
            if not 0 <= src < len(self.names):
                return Response("no such source", status_code=404)

            async def frames():
                last = -1
                self.viewers += 1
                try:
                    while not self.closed and not await request.is_disconnected():
                        with self._lock:
                            jpeg, seq = self._frames.get(src, (None, 0))
                        if jpeg is not None and seq != last:
                            last = seq
                            yield b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(jpeg) + jpeg + b"\r\n"
                        await asyncio.sleep(0.5 / STREAM_FPS)
                finally:
                    self.viewers -= 1

            return StreamingResponse(frames(), media_type="multipart/x-mixed-replace; boundary=frame", headers={"Cache-Control": "no-store"})

        def files(request: Request):
            name = request.path_params["name"]
            folder = (self.run_dir / "anomalies").resolve()
            path = (folder / name).resolve()
            if path.parent != folder or path.suffix.lower() not in PICTURE_SUFFIXES or not path.is_file():
                return Response("not found", status_code=404)
            return FileResponse(path, headers={"Cache-Control": "no-store"})

        routes = [Route("/", page), Route("/api/state", state), Route("/api/threshold/preview", preview), Route("/api/operating", operating),
                  Route("/api/threshold", change, methods=["POST"]), Route("/api/recipe", recipe, methods=["POST"]),
                  Route("/api/feedback", feedback, methods=["POST"]), Route("/stream.mjpg", stream),
                  Route("/anomalies/{name}", files)]
        hosts = list(LOOPBACK_NAMES) if self.loopback else ["*"]
        return Starlette(routes=routes, middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)])

    def start(self) -> "Station":
        """Bind the port (a clear error if taken) and serve from a thread."""
        try:
            import uvicorn
        except ImportError:
            raise StfpmError("--ui: the operator station needs the [line] extra (pip install 'stfpm-edge[line]')") from None
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise StfpmError(f"--ui {self.host}:{self.port}: cannot listen there ({exc.strerror or exc})") from None
        sock.listen(64)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self._app(), log_level="warning", lifespan="off", timeout_graceful_shutdown=1, access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="station", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self._server.started:
            raise StfpmError(f"--ui {self.host}:{self.port}: the web server did not start")
        return self

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"


async def _posted(request, token: str | None, what: str):
    """The JSON body of a state-changing request, or the response that refuses it: the token (when the station has one),
    a JSON content type, the page's own origin."""
    from starlette.responses import JSONResponse

    if token is not None:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            return None, JSONResponse({"error": f"a valid token is needed to change the {what}"}, status_code=401)
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        return None, JSONResponse({"error": "send JSON"}, status_code=415)
    origin = request.headers.get("origin")
    if origin is not None and origin.split("://", 1)[-1] != request.headers.get("host"):
        return None, JSONResponse({"error": "foreign origin"}, status_code=403)
    try:
        body = await request.json()
    except ValueError:
        return None, JSONResponse({"error": "body is not JSON"}, status_code=400)
    return (body if isinstance(body, dict) else {}), None


def _who(request) -> str:
    return f"ui {request.client.host if request.client else '?'}"


def _html_escape(text: str) -> str:
    import html

    return html.escape(text, quote=True)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>stfpm-edge · __TITLE__</title>
<style>
 body{margin:0;font:15px system-ui,sans-serif;background:#111;color:#eee}
 header{padding:8px 14px;background:#222;display:flex;gap:18px;align-items:baseline}
 header h1{font-size:18px;margin:0} #status{color:#8c8}
 main{display:grid;grid-template-columns:minmax(0,2fr) minmax(260px,1fr);gap:12px;padding:12px}
 .tile{background:#1b1b1b;border:1px solid #333;border-radius:6px;padding:8px}
 #tiles{display:grid;gap:8px;grid-template-columns:repeat(auto-fit,minmax(320px,1fr));align-content:start}
 #tiles figure{margin:0} #tiles figcaption{font-size:13px;color:#bbb;padding-top:3px}
 #tiles img{width:100%;max-height:calc(100vh - 110px);object-fit:contain;background:#000;min-height:200px;display:block}
 #tiles.many img{max-height:calc(50vh - 70px)}
 table{border-collapse:collapse;width:100%} td{padding:3px 6px;border-bottom:1px solid #2a2a2a} td.v{text-align:right;font-variant-numeric:tabular-nums}
 #gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(110px,1fr));gap:6px;margin-top:8px;max-height:calc(100vh - 470px);min-height:130px;overflow-y:auto}
 #gallery figure{margin:0;cursor:pointer} #gallery img{width:100%;display:block;border:2px solid #c33}
 #gallery figcaption{font-size:12px;color:#bbb} .fb{font-size:11px;color:#8c8} .fb button{font-size:11px;padding:1px 4px;margin:1px}
 #big{position:fixed;inset:0;background:rgba(0,0,0,.9);display:none;align-items:center;justify-content:center;gap:10px}
 #big img{max-width:48vw;max-height:90vh}
 input[type=number]{width:110px} button{padding:4px 10px} #preview{font-size:13px;color:#ccc;margin-top:6px;min-height:3em}
 .bad{color:#f66}
 #drift{display:none;padding:8px 14px;background:#a60;color:#fff;font-weight:600}
</style></head><body>
<header><h1>stfpm-edge · __TITLE__</h1><span id="status">connecting…</span></header>
<div id="drift" role="alert"></div>
<main>
 <section class="tile" id="tiles"><figure class="cam"><img id="live" src="/stream.mjpg?source=0" alt="live annotated stream"><figcaption></figcaption></figure></section>
 <section>
  <div class="tile"><table id="counters">
   <tr><td>inspected</td><td class="v" id="inspected">–</td></tr>
   <tr><td>anomalous</td><td class="v bad" id="anomalous">–</td></tr>
   <tr><td>dropped</td><td class="v" id="dropped">–</td></tr>
   <tr><td>failed</td><td class="v" id="failed">–</td></tr>
   <tr><td>FPS</td><td class="v" id="fps">–</td></tr>
   <tr><td>latency p50 / p99 (ms)</td><td class="v" id="latency">–</td></tr>
   <tr><td>threshold</td><td class="v" id="threshold">–</td></tr>
   <tr id="reciperow" style="display:none"><td>product (recipe)</td><td class="v"><b id="recipe">–</b>
     <select id="recipes" aria-label="switch to recipe"></select> <button id="switch">switch</button></td></tr>
  </table><div id="recipenote" style="font-size:13px;color:#ccc"></div></div>
  <div class="tile" style="margin-top:12px">
   <label>new threshold <input id="thr" type="number" step="any"></label>
   <button id="check">preview</button> <button id="apply" disabled>apply</button>
   <div id="preview"></div>
  </div>
  <div class="tile" style="margin-top:12px"><b>operating curve</b>: good parts rejected at each threshold (the model's out-of-fold good images)
   <svg id="opcurve" viewBox="0 0 300 120" width="100%" height="120" role="img" aria-label="operating curve"></svg><div id="opnote"></div></div>
  <div class="tile" style="margin-top:12px"><b>latest anomalies</b> (click to enlarge)<div id="gallery"></div></div>
 </section>
</main>
<div id="big" title="click to close"></div>
<script>
const $ = id => document.getElementById(id);
const fmt = v => (v === null || v === undefined) ? '–' : (typeof v === 'number' ? (Math.abs(v) >= 100 ? v.toFixed(1) : v.toPrecision(4)) : v);
let shown = '';
async function refresh() {
  try {
    const s = await (await fetch('/api/state', {cache: 'no-store'})).json();
    for (const k of ['inspected', 'anomalous', 'dropped', 'failed']) $(k).textContent = s[k];
    $('fps').textContent = s.fps.toFixed(1);
    const l = s.latency_ms.end_to_end || s.latency_ms.inference;
    $('latency').textContent = l ? `${l.p50.toFixed(1)} / ${l.p99.toFixed(1)}` : '–';
    $('threshold').textContent = fmt(s.threshold) + (s.threshold !== s.model_threshold ? ` (model: ${fmt(s.model_threshold)})` : '');
    if (s.sources.length > 1 && $('tiles').children.length !== s.sources.length) {
      $('tiles').classList.add('many');
      $('tiles').replaceChildren(...s.sources.map((src, i) => {
        const f = document.createElement('figure'); f.className = 'cam';
        const img = document.createElement('img'); img.src = '/stream.mjpg?source=' + i; img.alt = src.name; if (i === 0) img.id = 'live';
        f.append(img, document.createElement('figcaption')); return f; }));
    }
    [...$('tiles').children].forEach((f, i) => { const src = s.sources[i];
      if (src) f.querySelector('figcaption').textContent = `${src.name}: ${src.inspected} inspected, ${src.anomalous} anomalous, ${src.fps.toFixed(1)} FPS`; });
    if ($('thr').value === '' && s.threshold !== null) $('thr').value = Number(s.threshold.toPrecision(4));
    $('status').textContent = s.running ? 'running' : 'stopped';
    if (s.recipes.length) {
      $('reciperow').style.display = ''; $('recipe').textContent = s.recipe;
      if ($('recipes').options.length !== s.recipes.length)
        $('recipes').replaceChildren(...s.recipes.map(n => { const o = document.createElement('option'); o.value = o.textContent = n; return o; }));
    }
    $('drift').textContent = s.drift.join(' · '); $('drift').style.display = s.drift.length ? 'block' : 'none';
    const key = s.gallery.map(g => g.frame).join(',');
    if (key !== shown) {
      shown = key;
      $('gallery').replaceChildren(...s.gallery.filter(g => g.overlay).map(g => {
        const f = document.createElement('figure');
        const img = document.createElement('img'); img.src = '/' + g.overlay; img.alt = 'frame ' + g.frame; img.loading = 'lazy';
        const c = document.createElement('figcaption'); c.textContent = (s.sources.length > 1 ? g.source + ' ' : '') + `#${g.frame} score ${fmt(g.score)}`;
        const bar = document.createElement('div'); bar.className = 'fb';
        for (const [label, text] of [['good', 'good (false call)'], ['defect', 'defect']]) {
          const b = document.createElement('button'); b.textContent = text; b.dataset.label = label;
          b.onclick = async ev => { ev.stopPropagation();
            const r = await fetch('/api/feedback', {method: 'POST', headers: jsonHeaders(), body: JSON.stringify({frame: g.frame, source: g.source_index, label})});
            const e = await r.json(); bar.textContent = r.ok ? `marked ${label}` : e.error; };
          bar.append(b); }
        f.append(img, c, bar); f.dataset.overlay = g.overlay; f.dataset.heatmap = g.heatmap || '';
        f.onclick = () => enlarge(f.dataset.overlay, f.dataset.heatmap); return f; }));
    }
  } catch (e) { $('status').textContent = 'no connection'; }
}
function enlarge(overlay, heat) {
  const b = $('big'); b.replaceChildren();
  for (const src of [overlay, heat]) if (src) { const i = document.createElement('img'); i.src = '/' + src; b.append(i); }
  b.style.display = 'flex';
}
$('big').onclick = () => { $('big').style.display = 'none'; };
$('check').onclick = async () => {
  const v = $('thr').value;
  const p = await (await fetch('/api/threshold/preview?value=' + encodeURIComponent(v))).json();
  if (p.error) { $('preview').textContent = p.error; return; }
  let t = `at ${fmt(p.value)}: ${p.recent_anomalous_new} of the last ${p.recent_frames} frames anomalous (now ${p.recent_anomalous_now})`;
  t += p.heldout_images ? `; ${p.heldout_false_alarms_new} false alarms on ${p.heldout_images} held-out good images (now ${p.heldout_false_alarms_now})` : `; ${p.note}`;
  $('preview').textContent = t; $('apply').disabled = false; $('apply').dataset.value = v;
};
$('thr').oninput = () => { $('apply').disabled = true; };
function jsonHeaders() {
  const headers = {'Content-Type': 'application/json'};
  const token = new URLSearchParams(location.hash.slice(1)).get('token');
  if (token) headers['Authorization'] = 'Bearer ' + token;
  return headers;
}
$('switch').onclick = async () => {
  const r = await fetch('/api/recipe', {method: 'POST', headers: jsonHeaders(), body: JSON.stringify({name: $('recipes').value})});
  const e = await r.json();
  $('recipenote').textContent = r.ok ? `switching to ${e.requested} from the next frame` : e.error;
  refresh(); curve();
};
$('apply').onclick = async () => {
  const r = await fetch('/api/threshold', {method: 'POST', headers: jsonHeaders(), body: JSON.stringify({value: Number($('apply').dataset.value)})});
  const e = await r.json();
  $('preview').textContent = r.ok ? `applied: ${fmt(e.old)} → ${fmt(e.new)} from the next frame on` : e.error;
  $('apply').disabled = true; refresh(); curve();
};
async function curve() {
  const o = await (await fetch('/api/operating', {cache: 'no-store'})).json();
  const svg = $('opcurve'); svg.replaceChildren();
  if (!o.n) { $('opnote').textContent = 'this model carries no good-image scores: retrain it to see its operating curve'; return; }
  const x0 = o.thresholds[0], x1 = o.thresholds[o.thresholds.length - 1];
  const X = v => 30 + 265 * (v - x0) / (x1 - x0), Y = r => 105 - 100 * r;
  const ns = 'http://www.w3.org/2000/svg', el = (tag, attrs) => { const e = document.createElementNS(ns, tag); for (const k in attrs) e.setAttribute(k, attrs[k]); svg.append(e); return e; };
  el('line', {x1: 30, y1: 105, x2: 295, y2: 105, stroke: '#666'}); el('line', {x1: 30, y1: 5, x2: 30, y2: 105, stroke: '#666'});
  el('polyline', {points: o.thresholds.map((t, i) => `${X(t).toFixed(1)},${Y(o.false_call_rate[i]).toFixed(1)}`).join(' '), fill: 'none', stroke: '#6cf', 'stroke-width': 2});
  el('line', {x1: X(o.current), y1: 5, x2: X(o.current), y2: 105, stroke: '#f66', 'stroke-dasharray': '4 3', id: 'opcurrent'});
  const t = el('text', {x: 33, y: 14, fill: '#bbb', 'font-size': 9}); t.textContent = '100 % of good parts rejected';
  const b = el('text', {x: 33, y: 117, fill: '#bbb', 'font-size': 9}); b.textContent = `threshold ${fmt(x0)} … ${fmt(x1)}`;
  $('opnote').textContent = `current threshold ${fmt(o.current)}: ${(100 * o.current_false_call_rate).toFixed(1)} % of ${o.n} good images above it` +
    (o.target ? ` (the model was set for ${(100 * o.target).toPrecision(2)} %)` : '');
}
refresh(); curve(); setInterval(refresh, 500); setInterval(curve, 5000);
</script></body></html>
"""
