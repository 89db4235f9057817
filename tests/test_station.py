"""The operator station (issue 13): its HTTP side with a plain client, then the page in a real headless
Chromium (Debian's, driven by Playwright) during a paced video run."""

import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import pytest

from stfpm_edge.errors import StfpmError
from stfpm_edge.stream.pipeline import RunOptions, run_stream
from stfpm_edge.stream.sources import open_source
from tests.stream_fakes import DarkSpotEngine, _records, _write_video

pytest.importorskip("uvicorn", reason="the [line] extra is not installed (pip install -e '.[line]')")

from stfpm_edge.stream.station import Station, parse_bind  # noqa: E402
from tests.line_peers import free_port  # noqa: E402

HELDOUT = [0.0] * 19 + [0.7]  # the model's held-out good scores: one of 20 lies above 0.5


def chromium_path() -> str | None:
    return shutil.which("chromium") or next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser") if Path(p).is_file()), None)


class StationRun:
    """A paced video run with the station on a free loopback port, in a thread."""

    def __init__(self, tmp_path, n=240, fps=40, bad_every=7, **ui):
        self.video = tmp_path / "v.mp4"
        _write_video(self.video, n, bad=set(range(3, n, bad_every)), size=(96, 128))
        self.out = tmp_path / "run"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.opts = RunOptions(self.out, pace_fps=fps, ui=f"127.0.0.1:{self.port}", **ui)
        self.summary = None
        self.thread = threading.Thread(target=self._run)

    def _engine(self):
        e = DarkSpotEngine()
        e.meta = {"threshold": {"image": 0.5, "false_call_rate": 0.05}, "normal_stats": {"heldout_scores": HELDOUT}}
        return e

    def _run(self):
        self.summary = run_stream(self._engine, open_source(str(self.video)), self.opts)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if self.get("/api/state")["inspected"] > 0:
                    return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("the station did not come up")

    def __exit__(self, *exc):
        self.thread.join(60)

    def get(self, path, headers=None):
        with urllib.request.urlopen(urllib.request.Request(self.url + path, headers=headers or {}), timeout=5) as r:
            return json.loads(r.read())

    def post(self, path, body, headers):
        req = urllib.request.Request(self.url + path, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, e.read()


def test_binds_are_checked():
    assert parse_bind("8080") == ("127.0.0.1", 8080) and parse_bind("[::1]:81") == ("::1", 81)
    with pytest.raises(StfpmError, match="host:port"):
        parse_bind("here:abc")
    with pytest.raises(StfpmError, match="needs a token"):
        Station("192.0.2.1:0", Path("."), [], [], None, [])


def test_a_taken_port_is_a_clear_error_before_any_frame(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        video = tmp_path / "v.mp4"
        _write_video(video, 5)
        with pytest.raises(StfpmError, match="cannot listen"):
            run_stream(lambda: DarkSpotEngine(), open_source(str(video)), RunOptions(tmp_path / "o", ui=f"127.0.0.1:{port}"))


def test_station_http_counts_previews_applies_and_guards(tmp_path):
    with StationRun(tmp_path) as run:
        first = run.get("/api/state")
        time.sleep(0.6)
        second = run.get("/api/state")
        assert second["inspected"] > first["inspected"] and second["threshold"] == 0.5 and second["running"]
        p = run.get("/api/threshold/preview?value=2")
        assert p["heldout_images"] == 20 and p["heldout_false_alarms_now"] == 1 and p["heldout_false_alarms_new"] == 0
        assert p["recent_anomalous_new"] == 0 < p["recent_anomalous_now"]
        # guards: a form post (what a foreign page can send without asking), a foreign Host (DNS rebinding), a foreign origin
        assert run.post("/api/threshold", b"value=9", {"Content-Type": "application/x-www-form-urlencoded"})[0] == 415
        assert run.post("/api/threshold", b'{"value": 9}', {"Content-Type": "application/json", "Host": "evil.example"})[0] == 400
        assert run.post("/api/threshold", b'{"value": 9}', {"Content-Type": "application/json", "Origin": "http://evil.example"})[0] == 403
        assert run.post("/api/threshold", b'{"value": "NaN"}', {"Content-Type": "application/json"})[0] == 400
        for bad in ("/anomalies/..%2Fframes.jsonl", "/anomalies/../frames.jsonl", "/anomalies/x.txt"):
            with pytest.raises(urllib.error.HTTPError):
                run.get(bad)
        flagged = run.get("/api/state")["gallery"][0]
        code, marked = run.post("/api/feedback", json.dumps({"frame": flagged["frame"], "source": 0, "label": "defect"}).encode(),
                                {"Content-Type": "application/json"})
        assert code == 200 and marked["file"] == f"feedback/defect/{flagged['frame']:06d}.png"
        assert run.post("/api/feedback", b'{"frame": 100000, "label": "good"}', {"Content-Type": "application/json"})[0] == 404
        assert run.post("/api/feedback", json.dumps({"frame": flagged["frame"], "label": "maybe"}).encode(), {"Content-Type": "application/json"})[0] == 400
        assert run.post("/api/feedback", b'frame=1', {"Content-Type": "application/x-www-form-urlencoded"})[0] == 415
        code, event = run.post("/api/threshold", b'{"value": 2.0}', {"Content-Type": "application/json"})
        assert code == 200 and event["old"] == 0.5 and event["new"] == 2.0
    recs = _records(run.out)
    changes = [r for r in recs if r.get("event") == "threshold_changed"]
    assert len(changes) == 1 and changes[0]["new"] == 2.0
    at = recs.index(changes[0])
    frames_after = [r for r in recs[at:] if r.get("status") == "inspected"]
    assert frames_after and all(r["verdict"] == "good" for r in frames_after)  # dark spots no longer reach 2.0
    assert any(r.get("verdict") == "anomalous" for r in recs[:at])
    assert run.summary["threshold"] == 2.0 and run.summary["ui"]["threshold_changes"][0]["new"] == 2.0


def test_a_token_guards_changes_when_given(tmp_path):
    with StationRun(tmp_path, n=120, ui_token="s3cret") as run:
        assert run.post("/api/threshold", b'{"value": 1}', {"Content-Type": "application/json"})[0] == 401
        code, _ = run.post("/api/threshold", b'{"value": 1}', {"Content-Type": "application/json", "Authorization": "Bearer s3cret"})
        assert code == 200


@pytest.mark.skipif(chromium_path() is None, reason="Chromium is not installed (apt-get install chromium; .ci/run does)")
def test_operator_station_in_a_real_browser(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the [dev] extra)")
    with StationRun(tmp_path, n=400, fps=40) as run, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            # bypass_csp: Playwright evaluates its waits as strings, which the page's CSP (no eval) forbids
            page = browser.new_context(viewport={"width": 1280, "height": 800}, bypass_csp=True).new_page()
            page.goto(run.url + "/", timeout=15_000)
            count = lambda: int(page.inner_text("#inspected"))  # noqa: E731
            page.wait_for_function("Number(document.getElementById('inspected').textContent) > 0", timeout=10_000)
            before = count()
            page.wait_for_function(f"Number(document.getElementById('inspected').textContent) > {before + 10}", timeout=10_000)
            page.wait_for_function("document.getElementById('live').naturalWidth > 0", timeout=10_000)  # frames stream
            page.wait_for_selector("#gallery img", timeout=10_000)  # the anomaly gallery fills
            page.wait_for_function("[...document.querySelectorAll('#gallery img')].some(i => i.complete && i.naturalWidth > 0)", timeout=10_000)
            page.click("#gallery figure")  # click to enlarge: overlay and heat map
            page.wait_for_function("document.querySelectorAll('#big img').length === 2", timeout=5_000)
            page.screenshot(path=str(tmp_path / "station.png"))
            page.click("#big")
            # the operator's word on a flagged frame: its pixels and record to feedback/good/
            page.click("#gallery figure .fb button[data-label=good]")
            page.wait_for_function("[...document.querySelectorAll('#gallery .fb')].some(b => b.textContent === 'marked good')", timeout=5_000)
            # the operating curve: the model's good images against the threshold, the current one marked
            page.wait_for_selector("#opcurve polyline", timeout=5_000)
            assert len(page.get_attribute("#opcurve polyline", "points").split()) == 120
            assert "current threshold 0.5000: 5.0 % of 20 good images above it (the model was set for 5.0 %)" in page.inner_text("#opnote")
            page.fill("#thr", "2")
            page.click("#check")
            page.wait_for_function("document.getElementById('preview').textContent.includes('false alarms on 20 held-out')", timeout=5_000)
            assert "0 false alarms on 20 held-out good images (now 1)" in page.inner_text("#preview")
            page.click("#apply")
            page.wait_for_function("document.getElementById('preview').textContent.startsWith('applied')", timeout=5_000)
            page.wait_for_function("document.getElementById('threshold').textContent.startsWith('2')", timeout=5_000)
            page.wait_for_function("document.getElementById('opnote').textContent.startsWith('current threshold 2.000: 0.0 %')", timeout=5_000)
            assert float(page.get_attribute("#opcurrent", "x1")) > 200  # the marker moved right with the threshold
        finally:
            browser.close()
    recs = _records(run.out)
    changes = [r for r in recs if r.get("event") == "threshold_changed"]
    assert len(changes) == 1 and changes[0]["new"] == 2.0 and changes[0]["by"].startswith("ui 127.0.0.1")
    assert all(r["verdict"] == "good" for r in recs[recs.index(changes[0]):] if r.get("status") == "inspected")
    assert (tmp_path / "station.png").stat().st_size > 10_000
    marked = [r for r in recs if r.get("event") == "feedback"]
    assert len(marked) == 1 and marked[0]["label"] == "good" and run.summary["ui"]["feedback"][0]["frame"] == marked[0]["frame"]
    png = cv2.imread(str(run.out / marked[0]["file"]))
    kept = json.loads((run.out / marked[0]["file"]).with_suffix(".json").read_text())
    assert png.shape == (96, 128, 3) and kept["frame"] == marked[0]["frame"] and kept["verdict"] == "anomalous"


def test_several_sources_get_a_tile_each(tmp_path):
    videos = []
    for i in range(2):
        videos.append(tmp_path / f"cam{i}.mp4")
        _write_video(videos[-1], 120, bad={5, 50}, size=(96, 128))
    port = free_port()
    result = {}
    t = threading.Thread(target=lambda: result.update(run_stream(lambda: DarkSpotEngine(), [open_source(str(v)) for v in videos],
                                                                   RunOptions(tmp_path / "o", pace_fps=30, ui=f"127.0.0.1:{port}"))))
    t.start()
    try:
        deadline = time.monotonic() + 20
        state = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=2) as r:
                    state = json.loads(r.read())
                if state["inspected"] > 20:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert [s["name"] for s in state["sources"]] == [f"video {v}" for v in videos]
        assert state["inspected"] == sum(s["inspected"] for s in state["sources"])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stream.mjpg?source=1", timeout=5) as r:
            head = r.read(4096)  # the first part of the second camera's stream
        assert b"Content-Type: image/jpeg" in head and b"\xff\xd8" in head
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/stream.mjpg?source=7", timeout=5)
    finally:
        t.join(60)
    assert result["ui"]["url"].startswith("http://127.0.0.1") and len(result["sources"]) == 2
