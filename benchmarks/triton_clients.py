"""Scale-out (issue 12), measured through the real CLI against a real Triton server on loopback:

1. `stfpm-edge serve` with a model exported with --dynamic; 1 `stfpm-edge run grpc://...` client on
   a video, then 4 concurrent clients on the same video: each client's read = inspected + failed,
   aggregate FPS of the 4 versus the 1 (back to back), and Triton's own average batch size from its
   Prometheus metrics (nv_inference_count / nv_inference_exec_count over the 4-client phase).
2. `stfpm-edge eval grpc://.../NAME --data D` against `stfpm-edge eval MODEL.onnx --data D`: the same
   verdicts, max |delta score|.
3. The server SIGKILLed mid-run (with everything it started) and restarted: the clients live on,
   the gap's frames are counted failed, inspection resumes, the summaries add up.

    python benchmarks/triton_clients.py /tmp/bd/bottle/model.onnx --data ../shared/data/mvtec/bottle --out /tmp/triton
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from line_sinks import make_video  # noqa: E402

from tests.line_peers import free_port  # noqa: E402

CLI = [sys.executable, "-m", "stfpm_edge.cli"]


class Serve:
    def __init__(self, model: Path, out: Path, name: str, max_batch: int, threads: int):
        self.ports = [free_port() for _ in range(3)]
        self.name, self.log = name, out / "serve.log"
        self.cmd = CLI + ["serve", str(model), "--name", name, "--http-port", str(self.ports[0]), "--grpc-port", str(self.ports[1]),
                          "--metrics-port", str(self.ports[2]), "--max-batch", str(max_batch), "--queue-delay-us", "2000", "--threads", str(threads)]
        self.proc = None

    @property
    def grpc(self) -> str:
        return f"grpc://127.0.0.1:{self.ports[1]}/{self.name}"

    def start(self) -> float:
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        while time.perf_counter() - t0 < 120:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[0]}/v2/models/{self.name}/ready", timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                time.sleep(0.2)
        raise SystemExit(f"serve did not get ready; see {self.log}")

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def counts(self) -> tuple[float, float]:
        """(inference count, execution count) of the model from Triton's Prometheus metrics."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[2]}/metrics", timeout=5) as r:
            text = r.read().decode()

        def metric(name):
            m = re.search(rf'^{name}{{[^}}]*model="{re.escape(self.name)}"[^}}]*}} (\S+)$', text, re.MULTILINE)
            return float(m.group(1)) if m else float("nan")

        return metric("nv_inference_count"), metric("nv_inference_exec_count")


def clients(model_url: str, video: Path, out: Path, n: int, *extra: str) -> tuple[float, list[dict]]:
    """n concurrent `stfpm-edge run` clients; returns (wall seconds, their summaries)."""
    procs = []
    t0 = time.perf_counter()
    for i in range(n):
        folder = out / f"client{i}"
        shutil.rmtree(folder, ignore_errors=True)
        procs.append((folder, subprocess.Popen(CLI + ["run", model_url, "--source", str(video), "--out", str(folder), *extra],
                                               stdout=subprocess.DEVNULL, stderr=open(out / f"client{i}.err", "wb"))))
    for _, p in procs:
        p.wait()
    wall = time.perf_counter() - t0
    return wall, [json.loads((f / "summary.json").read_text()) for f, _ in procs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="an .onnx exported with --dynamic")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=Path("runs/triton-bench"))
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--side", type=int, default=448)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads of the server's engine")
    ap.add_argument("--name", default="bottle")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    video = args.out / "parts.mp4"
    make_video(args.data, video, args.frames, args.side)

    server = Serve(args.model, args.out, args.name, args.max_batch, args.threads)
    print(f"serve ready in {server.start():.1f} s: {server.grpc}", flush=True)
    try:
        (args.out / "one").mkdir(exist_ok=True)
        wall1, (one,) = clients(server.grpc, video, args.out / "one", 1)
        c0, e0 = server.counts()
        (args.out / "four").mkdir(exist_ok=True)
        wall4, four = clients(server.grpc, video, args.out / "four", 4)
        c1, e1 = server.counts()
        fps1 = one["frames_inspected"] / wall1
        fps4 = sum(s["frames_inspected"] for s in four) / wall4
        print("\n| clients | frames read | inspected | failed | accounted | aggregate FPS (frames / wall) | x one client |")
        print("|---|---|---|---|---|---|---|")
        print(f"| 1 | {one['frames_read']} | {one['frames_inspected']} | {one['frames_failed']} | {one['accounted']} | {fps1:.1f} | 1.00 |")
        print(f"| 4 | {' + '.join(str(s['frames_read']) for s in four)} | {sum(s['frames_inspected'] for s in four)} | "
              f"{sum(s['frames_failed'] for s in four)} | {all(s['accounted'] for s in four)} | {fps4:.1f} | {fps4 / fps1:.2f} |")
        print(f"\nTriton's metrics over the 4-client phase: {c1 - c0:.0f} inferences in {e1 - e0:.0f} executions: "
              f"average batch {(c1 - c0) / max(e1 - e0, 1):.2f}", flush=True)

        # eval through the server against the local graph
        ev = {}
        for label, target in (("local", str(args.model)), ("served", server.grpc)):
            folder = args.out / f"eval-{label}"
            shutil.rmtree(folder, ignore_errors=True)
            subprocess.run(CLI + ["eval", target, "--data", str(args.data), "--out", str(folder), "--overlays", "0"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            with open(folder / "scores.csv") as fh:
                ev[label] = list(csv.DictReader(fh))
        same = sum(a["verdict"] == b["verdict"] for a, b in zip(ev["local"], ev["served"]))
        dmax = max(abs(float(a["score"]) - float(b["score"])) for a, b in zip(ev["local"], ev["served"]))
        print(f"\neval: {same} of {len(ev['local'])} verdicts equal (served vs local ONNX), max |delta score| {dmax:.2e}", flush=True)

        # the server killed mid-run and restarted; two clients at a camera's pace
        (args.out / "kill").mkdir(exist_ok=True)
        import threading

        def outage():
            time.sleep(4)
            server.kill()
            time.sleep(5)
            print(f"  server killed at 4 s, back after {server.start():.1f} s more", flush=True)

        t = threading.Thread(target=outage)
        t.start()
        wallk, killed = clients(server.grpc, video, args.out / "kill", 2, "--pace", "25")
        t.join()
        print("\n| client (paced 25 FPS) | read | inspected | failed | accounted |")
        print("|---|---|---|---|---|")
        for i, s in enumerate(killed):
            print(f"| {i} | {s['frames_read']} | {s['frames_inspected']} | {s['frames_failed']} | {s['accounted']} |")
        recs = [json.loads(x) for x in (args.out / "kill" / "client0" / "frames.jsonl").read_text().splitlines()]
        last_failed = max((r["frame"] for r in recs if r.get("status") == "failed"), default=-1)
        resumed = sum(1 for r in recs if r.get("status") == "inspected" and r["frame"] > last_failed)
        print(f"client 0: failed frames up to #{last_failed}, then {resumed} inspected after the restart")
        (args.out / "results.json").write_text(json.dumps({"one": one, "four": four, "fps1": fps1, "fps4": fps4, "avg_batch": (c1 - c0) / max(e1 - e0, 1),
                                                           "eval_same": same, "eval_dmax": dmax, "killed": killed}, indent=1))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
