"""Connecting to the line (issue 13), measured with a real model on a video of real parts, through the
real CLI (`stfpm-edge run`), against real peers on loopback: a Mosquitto broker that is stopped for
10 s mid-run and restarted, a pymodbus server standing in for the PLC, webhook targets that answer
500 or hang, and the operator station in headless Chromium (screenshot).

    python benchmarks/line_sinks.py runs/bottle/model.onnx --data ../shared/data/mvtec/bottle --out /tmp/line \\
        --screenshot docs/operator-station.jpg

Rows: inspection FPS and its ratio to the run without sinks (runs back to back, the no-sink run
first and last), per-sink sent / failed / dropped and latency frame capture -> sent (p50 / p99).
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.line_peers import Broker, Plc, Subscriber, Webhook, free_port, wait_port  # noqa: E402

CLI = [sys.executable, "-m", "stfpm_edge.cli"]


def make_video(data: Path, path: Path, frames: int, side: int) -> int:
    """Test images of the category, good and defective in turn, as one video; returns the defective count."""
    test = data / "test"
    good = sorted((test / "good").glob("*.png"))
    bad = sorted(p for d in sorted(test.iterdir()) if d.is_dir() and d.name != "good" for p in d.glob("*.png"))
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (side, side))
    n_bad = 0
    for i in range(frames):
        defective = i % 4 == 3
        src = bad[(i // 4) % len(bad)] if defective else good[i % len(good)]
        img = cv2.imread(str(src), cv2.IMREAD_COLOR)
        vw.write(cv2.resize(img, (side, side), interpolation=cv2.INTER_AREA))
        n_bad += defective
    vw.release()
    return n_bad


def run(model: Path, video: Path, out: Path, *extra: str, threads: int = 2) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = CLI + ["run", str(model), "--source", str(video), "--out", str(out), "--threads", str(threads), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads((out / "summary.json").read_text())


def sink_row(name: str, s: dict, base_fps: float) -> str:
    cells = [name, f"{s['frames_inspected']}", f"{s['fps']:.1f}", f"{s['fps'] / base_fps:.3f}"]
    if "sinks" in s:
        k = s["sinks"][0]
        lat = k["latency_ms"]
        cells += [f"{k['sent']} / {k['failed']} / {k['dropped']}", f"{lat['p50']:.1f} / {lat['p99']:.1f}" if lat else "-"]
    else:
        cells += ["-", "-"]
    return "| " + " | ".join(cells) + " |"


def screenshot(model: Path, video: Path, out: Path, target: Path, threads: int) -> None:
    from playwright.sync_api import sync_playwright

    port = free_port()
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.Popen(CLI + ["run", str(model), "--source", str(video), "--out", str(out), "--threads", str(threads),
                                   "--pace", "12", "--ui", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, 60)
        with sync_playwright() as pw:
            chromium = shutil.which("chromium") or "/usr/bin/chromium"
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                                                          "--disable-component-update", "--disable-sync", "--no-first-run"])
            page = browser.new_context(viewport={"width": 1280, "height": 860}, bypass_csp=True).new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("document.querySelectorAll('#gallery img').length >= 6", timeout=120_000)
            page.wait_for_function("document.getElementById('live').naturalWidth > 0", timeout=30_000)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/state", timeout=5) as r:
                thr = json.loads(r.read())["threshold"]
            page.fill("#thr", f"{thr * 1.3:.4g}")  # what a 30% higher threshold would do
            page.click("#check")
            page.wait_for_timeout(500)
            target.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(target), **({"quality": 80} if target.suffix.lower() in (".jpg", ".jpeg") else {}))
            browser.close()
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="a category in MVTec layout (its test images make the video)")
    ap.add_argument("--out", type=Path, default=Path("runs/line-bench"))
    ap.add_argument("--frames", type=int, default=1200)
    ap.add_argument("--pace", type=float, default=25.0, help="camera rate for the latency rows (frames per second)")
    ap.add_argument("--side", type=int, default=448, help="video frame side, px")
    ap.add_argument("--outage", type=float, default=10.0, help="seconds the broker is down")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--screenshot", type=Path, default=None, help="also save the operator station here (.png or .jpg)")
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    video = args.out / "parts.mp4"
    n_bad = make_video(args.data, video, args.frames, args.side)
    print(f"video: {args.frames} frames, {n_bad} of them defective parts", flush=True)
    rows, results = [], {}

    base = run(args.model, video, args.out / "none", threads=args.threads)
    anomalous = base["frames_anomalous"]
    results["none"] = base
    rows.append(sink_row("no sink", base, base["fps"]))

    # MQTT, the broker stopped for --outage seconds a few seconds into the run
    broker = Broker(args.out / "broker").start()
    sub = Subscriber(broker.port, "line/#")

    def outage():
        time.sleep(4.0)
        broker.stop()
        time.sleep(args.outage)
        broker.start()

    t = threading.Thread(target=outage)
    t.start()
    mq = run(args.model, video, args.out / "mqtt", "--sink", f"mqtt://127.0.0.1:{broker.port}/line/1?send=anomalous", threads=args.threads)
    t.join()
    time.sleep(2)
    got = collections.Counter(m["frame"] for m in sub.payloads("line/1"))
    sub.close()
    broker.stop()
    k = mq["sinks"][0]
    results["mqtt"] = dict(summary=mq, received=len(got), duplicates=sum(v - 1 for v in got.values()), anomalous=mq["frames_anomalous"])
    rows.append(sink_row(f"MQTT, broker down {args.outage:.0f} s mid-run", mq, base["fps"]))
    print(f"MQTT: {mq['frames_anomalous']} anomalous frames, broker acknowledged {k['sent']}, subscriber received {len(got)} distinct "
          f"({results['mqtt']['duplicates']} duplicates), dropped {k['dropped']}, failed {k['failed']}", flush=True)

    plc = Plc().start()
    mb = run(args.model, video, args.out / "modbus", "--sink", f"modbus://127.0.0.1:{plc.port}/coil/5?pulse_ms=20", threads=args.threads)
    pulses = plc.pulses(5)
    plc.stop()
    results["modbus"] = dict(summary=mb, pulses=len(pulses), pulse_ms=[round((b - a) * 1e3, 1) for a, b in pulses[:5]])
    rows.append(sink_row("Modbus coil, 20 ms pulses", mb, base["fps"]))
    print(f"Modbus: {mb['frames_anomalous']} anomalous frames, {len(pulses)} coil pulses seen by the PLC stand-in", flush=True)

    for mode in ("error", "hang"):
        hook = Webhook(mode, hang_s=5.0).start()
        wh = run(args.model, video, args.out / f"webhook-{mode}", "--sink", f"http://127.0.0.1:{hook.port}/reject?timeout=1&retries=1",
                 threads=args.threads)
        hook.stop()
        results[f"webhook-{mode}"] = wh
        rows.append(sink_row(f"webhook answering {'500' if mode == 'error' else 'after 5 s (hangs)'}", wh, base["fps"]))

    again = run(args.model, video, args.out / "none-again", threads=args.threads)
    results["none-again"] = again
    rows.append(sink_row("no sink (again, last)", again, base["fps"]))

    # latency as a camera sees it: frames paced at --pace, so none waits in a read-ahead queue
    paced = ["--pace", str(args.pace), "--max-frames", "300"]
    lat_rows = []
    p0 = run(args.model, video, args.out / "paced-none", *paced, threads=args.threads)
    e2e = p0["latency_ms"]["end_to_end"]
    lat_rows.append(f"| no sink (frame capture -> verdict written) | {p0['frames_anomalous']} | - | {e2e['p50']:.1f} / {e2e['p99']:.1f} |")
    broker = Broker(args.out / "broker2").start()
    p1 = run(args.model, video, args.out / "paced-mqtt", *paced, "--sink", f"mqtt://127.0.0.1:{broker.port}/line/1?send=anomalous", threads=args.threads)
    broker.stop()
    plc = Plc().start()
    p2 = run(args.model, video, args.out / "paced-modbus", *paced, "--sink", f"modbus://127.0.0.1:{plc.port}/coil/5?pulse_ms=20", threads=args.threads)
    n_pulses = len(plc.pulses(5))
    plc.stop()
    for name, s in (("MQTT, QoS 1 (capture -> broker's PUBACK)", p1), (f"Modbus coil (capture -> coil on; PLC saw {n_pulses} pulses)", p2)):
        k = s["sinks"][0]
        lat_rows.append(f"| {name} | {s['frames_anomalous']} | {k['sent']} / {k['failed']} / {k['dropped']} | "
                        f"{k['latency_ms']['p50']:.1f} / {k['latency_ms']['p99']:.1f} |")
    results.update({"paced-none": p0, "paced-mqtt": p1, "paced-modbus": p2})

    print("\n| run (unpaced: as fast as the engine goes) | frames inspected | FPS | x no sink | sent / failed / dropped | capture -> sent p50 / p99 ms |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\n| at {args.pace:g} FPS, 300 frames | anomalous | sent / failed / dropped | latency p50 / p99 ms |")
    print("|---|---|---|---|")
    print("\n".join(lat_rows))
    print(f"\n(anomalous frames in the no-sink run: {anomalous})")
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    if args.screenshot:
        screenshot(args.model, video, args.out / "station", args.screenshot, args.threads)
        print(f"station screenshot: {args.screenshot}")


if __name__ == "__main__":
    main()
