"""The PLC handshake with a real model, against pymodbus's server standing in for the PLC, all on loopback.

    python benchmarks/plc_handshake.py runs/bottle/model.onnx --data ../shared/data/mvtec/bottle --cycles 100 --threads 2

The PLC program (tests/line_peers.PlcProgram, its own Modbus client polling every 2 ms) waits for
``ready``, raises ``trigger``, waits for ``valid``, reads ``ok`` and ``seq``, acknowledges; the run
(``run_stream`` with ``--trigger``'s handshake, the engine ``stfpm-edge run`` opens) inspects one
test image per trigger (the bottle test set in order, repeated). The last cycle is left
unacknowledged to show the missing-ack report. Printed: per cycle, trigger -> result-valid and
result-valid -> released as the PLC saw them (p50 / p99 / max), the run's own trigger -> valid and
valid -> ack, and whether every OK/NG matched the frame's verdict.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--ack-ms", type=float, default=500)
    args = ap.parse_args()

    from stfpm_edge.datasets import discover
    from stfpm_edge.engines.base import open_engine
    from stfpm_edge.geometry import decode_image
    from stfpm_edge.stream.handshake import PlcHandshake
    from stfpm_edge.stream.pipeline import RunOptions, run_stream
    from stfpm_edge.stream.sources import IterSource
    from tests.line_peers import ACK, OK, READY, SEQ, TRIGGER, VALID, Plc, PlcProgram

    tests = discover(args.data).test
    images = [decode_image(s.path) for s in tests]
    frames = [images[i % len(images)] for i in range(args.cycles)]
    plc = Plc().start()
    seen = []
    try:
        url = (f"modbus://127.0.0.1:{plc.port}/handshake?trigger={TRIGGER}&ready={READY}&valid={VALID}&ok={OK}&ack={ACK}&seq={SEQ}"
               f"&ack_ms={args.ack_ms:g}")

        def program():
            p = PlcProgram(plc.port)
            for i in range(args.cycles):
                seen.append(p.cycle(acknowledge=i < args.cycles - 1))

        t = threading.Thread(target=program, daemon=True)
        t.start()
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            summary = run_stream(lambda: open_engine(args.model, threads=args.threads) if args.model.suffix == ".onnx" else open_engine(args.model),
                                 IterSource(frames), RunOptions(out, max_frames=args.cycles, save_anomalies=False, trigger=PlcHandshake(url)))
            records = [json.loads(line) for line in (out / "frames.jsonl").read_text().splitlines()]
        t.join(30)
    finally:
        plc.stop()
    verdicts = [r["verdict"] for r in records if r.get("status") == "inspected"]
    matched = all(s["ok"] == (v == "good") for s, v in zip(seen, verdicts)) and len(seen) == len(verdicts) == args.cycles
    hs = summary["handshake"]

    def stat(values):
        v = np.asarray(values)
        return f"p50 {np.percentile(v, 50):.1f} / p99 {np.percentile(v, 99):.1f} / max {v.max():.1f} ms"

    print(f"model {args.model}, {args.cycles} cycles over {len(images)} test images of {args.data}; PLC stand-in: pymodbus on loopback")
    print(f"as the PLC saw it: trigger -> result valid {stat([s['trigger_to_valid_ms'] for s in seen])}")
    print(f"                   result valid -> released (acknowledged cycles) {stat([s['valid_to_released_ms'] for s in seen[:-1]])}")
    print(f"as the run saw it: trigger -> valid p50 {hs['trigger_to_valid_ms']['p50']:.1f} / p99 {hs['trigger_to_valid_ms']['p99']:.1f} ms; "
          f"valid -> ack p50 {hs['valid_to_ack_ms']['p50']:.1f} / p99 {hs['valid_to_ack_ms']['p99']:.1f} ms")
    print(f"sequence numbers 1..{args.cycles} in order: {[s['seq'] for s in seen] == list(range(1, args.cycles + 1))}; "
          f"every OK/NG the frame's verdict: {matched} ({verdicts.count('anomalous')} NG)")
    missing = [r for r in records if r.get("event") == "plc_ack_missing"]
    print(f"unacknowledged last cycle: {hs['acks_missing']} missing ack reported (event after {missing[0]['waited_ms'] if missing else '-'} ms; "
          f"result valid held {seen[-1]['valid_to_released_ms']:.0f} ms)")


if __name__ == "__main__":
    main()
