"""Benchmark statistics, interleaving, JSON output and unavailable backends."""

import json

import pytest
from typer.testing import CliRunner

from stfpm_edge.bench import interleaved_order, percentiles
from stfpm_edge.cli import app

runner = CliRunner()


def test_percentiles_on_known_samples():
    st = percentiles(list(range(1, 101)))  # 1..100
    assert st["p50"] == pytest.approx(50.5)
    assert st["p90"] == pytest.approx(90.1)
    assert st["p99"] == pytest.approx(99.01)
    assert st["max"] == 100 and st["n"] == 100 and st["mean"] == pytest.approx(50.5)


def test_interleaving_puts_every_backend_in_every_slot():
    names = ["a", "b", "c"]
    orders = [interleaved_order(names, i) for i in range(6)]
    assert orders[:3] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    for slot in range(3):
        assert sorted(o[slot] for o in orders) == ["a", "a", "b", "b", "c", "c"]


def test_schedule_alternates_or_gives_each_backend_runs_with_a_cold_first_call():
    from stfpm_edge.bench import schedule

    one = schedule(["a", "b"], iters=3, warmup=1, consecutive=1)
    assert one == [("a", False), ("b", False), ("b", True), ("a", True), ("a", True), ("b", True), ("b", True), ("a", True)]
    runs = schedule(["a", "b"], iters=5, warmup=0, consecutive=4)
    assert [n for n, _ in runs[:8]] == ["a"] * 4 + ["b"] * 4  # runs of four calls in a row
    assert [t for _, t in runs[:4]] == [False, True, True, True]  # the first of each run is untimed
    assert sum(t for n, t in runs if n == "a") == 5 and sum(t for n, t in runs if n == "b") == 5
    warm = schedule(["a", "b"], iters=9, warmup=5, consecutive=10)  # 5 warm-up calls: one untimed block each first
    assert len(warm) == 40 and not any(t for _, t in warm[:20]) and sum(t for _, t in warm[20:]) == 18


def test_bench_cli_json_schema_and_ratios(tiny_run, tmp_path):
    from stfpm_edge.export.onnx_export import export_onnx

    run_dir, _ = tiny_run
    onnx_path = tmp_path / "m.onnx"
    export_onnx(run_dir / "model.pt", onnx_path)
    out = tmp_path / "bench.json"
    res = runner.invoke(app, ["bench", str(run_dir / "model.pt"), str(onnx_path), "--iters", "3", "--warmup", "1", "--batch", "1,2",
                              "--json", str(out), "--plot", str(tmp_path / "h.png")])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert set(data["batches"]) == {"1", "2"}
    for table in data["batches"].values():
        assert set(table) == {"torch-reference", "torch-fused", "onnxruntime-fp32"}
        assert table["torch-reference"]["speedup_vs_reference"] == pytest.approx(1.0)
        for e in table.values():
            assert set(e["stages"]) == {"preprocess", "inference", "postprocess", "total"}
            assert e["stages"]["total"]["n"] == 3 and e["fps"] > 0 and e["gflops_per_s"] > 0
            assert e["stages"]["total"]["p50"] >= e["stages"]["inference"]["p50"]
    assert data["flops_per_frame"]["onnxruntime-fp32"] == pytest.approx(data["flops_per_frame"]["torch-fused"])
    assert data["machine"]["cpu"]["cores"] >= 1 and "onnxruntime_version" in data["machine"]
    assert (tmp_path / "h.png").stat().st_size > 0
    assert "| torch-reference | 1 |" in res.output


def test_unavailable_backend_is_a_clear_error(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    res = runner.invoke(app, ["bench", str(run_dir / "model.pt"), "--backend", "tensorrt-fp16", "--iters", "1"])
    assert res.exit_code == 2 and "tensorrt-fp16" in res.output and "available:" in res.output
    fake_engine = tmp_path / "m.engine"
    fake_engine.write_bytes(b"x")
    res = runner.invoke(app, ["bench", str(fake_engine)])
    assert res.exit_code == 2 and "TensorRT" in res.output and "Traceback" not in res.output


def test_a_memory_model_is_timed_next_to_the_student_pair_of_the_same_size(synthetic_mvtec, tmp_path):
    from stfpm_edge.config import load_config
    from stfpm_edge.export.onnx_export import export_onnx
    from stfpm_edge.train import train

    cfg = load_config(None, dict(data=str(synthetic_mvtec), out=str(tmp_path / "mem"), height=64, width=48, reference="memory",
                                 bank_size="400", memory_pool="2,1,1", threads=1, overlays=0))
    run_dir, _ = train(cfg, progress=False)
    export_onnx(run_dir / "model.pt", tmp_path / "mem.onnx")
    out = tmp_path / "bench.json"
    res = runner.invoke(app, ["bench", str(tmp_path / "mem.onnx"), "--iters", "3", "--warmup", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    table = json.loads(out.read_text())["batches"]["1"]
    assert set(table) == {"onnxruntime-fp32", "student-same-size"}
    assert "onnxruntime-fp32" in res.output and "x the student pair of the same size" in res.output
    alone = runner.invoke(app, ["bench", str(tmp_path / "mem.onnx"), "--iters", "2", "--warmup", "0", "--no-vs-student", "--json", str(out)])
    assert alone.exit_code == 0 and set(json.loads(out.read_text())["batches"]["1"]) == {"onnxruntime-fp32"}


def test_two_models_of_one_file_name_are_both_timed(tiny_run, tmp_path):
    """runs/a/model.onnx and runs/b/model.onnx are two backends, not one silently dropped; a file given twice is timed twice."""
    import shutil

    from stfpm_edge.export.onnx_export import export_onnx

    run_dir, _ = tiny_run
    (tmp_path / "a").mkdir()
    export_onnx(run_dir / "model.pt", tmp_path / "a" / "model.onnx")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    out = tmp_path / "bench.json"
    models = [str(tmp_path / "a" / "model.onnx"), str(tmp_path / "b" / "model.onnx"), str(tmp_path / "a" / "model.onnx")]
    res = runner.invoke(app, ["bench", *models, "--iters", "2", "--warmup", "0", "--json", str(out)])
    assert res.exit_code == 0, res.output
    table = json.loads(out.read_text())["batches"]["1"]
    assert set(table) == {"onnxruntime-fp32[a/model.onnx]", "onnxruntime-fp32[b/model.onnx]", "onnxruntime-fp32[a/model.onnx #2]"}
    assert all(e["stages"]["total"]["n"] == 2 for e in table.values())


def test_a_memory_is_compared_with_the_student_given_beside_it_whatever_the_file_names(synthetic_mvtec, tiny_run, tmp_path):
    """mem/model.onnx and stu/model.onnx: the memory row's ratio is taken against the given student row (found by the
    reference each model holds, no 'student' in any name), and no student pair is built for it."""
    from stfpm_edge.config import load_config
    from stfpm_edge.export.onnx_export import export_onnx
    from stfpm_edge.train import train

    cfg = load_config(None, dict(data=str(synthetic_mvtec), out=str(tmp_path / "mem-run"), height=64, width=64, reference="memory",
                                 bank_size="400", memory_pool="2,1,1", threads=1, overlays=0))
    mem_dir, _ = train(cfg, progress=False)
    for folder, run in (("mem", mem_dir), ("stu", tiny_run[0])):
        (tmp_path / folder).mkdir()
        export_onnx(run / "model.pt", tmp_path / folder / "model.onnx")
    out = tmp_path / "bench.json"
    res = runner.invoke(app, ["bench", str(tmp_path / "mem" / "model.onnx"), str(tmp_path / "stu" / "model.onnx"), "--iters", "3",
                              "--warmup", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    table = json.loads(out.read_text())["batches"]["1"]
    assert set(table) == {"onnxruntime-fp32[mem/model.onnx]", "onnxruntime-fp32[stu/model.onnx]"}
    assert table["onnxruntime-fp32[mem/model.onnx]"]["reference"] == "memory" and table["onnxruntime-fp32[stu/model.onnx]"]["reference"] == "student"
    ratio = table["onnxruntime-fp32[mem/model.onnx]"]["latency_ms_per_frame_p50"] / table["onnxruntime-fp32[stu/model.onnx]"]["latency_ms_per_frame_p50"]
    lines = [line for line in res.output.splitlines() if "x the student pair" in line]
    assert lines == [f"batch 1: onnxruntime-fp32[mem/model.onnx] {table['onnxruntime-fp32[mem/model.onnx]']['latency_ms_per_frame_p50']:.1f} ms per frame = "
                     f"{ratio:.2f}x the student pair of the same size (onnxruntime-fp32[stu/model.onnx], "
                     f"{table['onnxruntime-fp32[stu/model.onnx]']['latency_ms_per_frame_p50']:.1f} ms)"]
