#!/usr/bin/env bash
# Every GPU check in one command (a few minutes): PyTorch on CUDA (FP16 vs FP32, latency at batch
# 1/8/32 with and without CUDA graphs, training with and without AMP); then, where TensorRT and
# pycuda are installed, the gpu-marked tests and TensorRT engines benchmarked against ONNX Runtime.
#   scripts/gpu_check.sh [model.pt]      (default: a short training on ../shared/data/mvtec/bottle)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv || true
if ! $PY -c "import torch; assert torch.cuda.is_available(); print('torch', torch.__version__, '|', torch.cuda.get_device_name(0))" 2>/dev/null; then
  cat <<'PLAN'
PyTorch sees no CUDA GPU here, so nothing was measured. With one, this script measures:
  1. a memory model (the default reference) and a 10-epoch student, both trained on ../shared/data/mvtec/bottle on the GPU,
     with the memory's build time (teacher pass and k-centre selection) on CUDA;
  2. for each: FP16 against FP32 fidelity on the test images (max |map difference|, verdict flips), and latency per frame at
     batch 1, 8 and 32, FP32 and FP16, eager and replayed as a CUDA graph (benchmarks/torch_gpu.py), printed as one table:
| reference | precision | batch | eager ms / frame | CUDA graph ms / frame | frames / s (graph) |
  3. student training seconds per epoch, FP32 against AMP;
  4. where TensorRT and pycuda are installed: the gpu-marked tests, FP16 and INT8 engines built and benchmarked against ONNX Runtime.
PLAN
  exit 0
fi
MODEL=${1:-}
if [ -z "$MODEL" ]; then
  # the default (a memory of the teacher's good features) on the GPU, then a student for the epoch timings
  $PY -m stfpm_edge.cli train --data ../shared/data/mvtec/bottle --out "$OUT/memory" --overlays 0 --device cuda
  # the memory's build on the GPU (teacher pass and k-centre selection; the CPU's figures: docs/results.md)
  $PY -c "import json; m = json.load(open('$OUT/memory/metrics.json'))['memory']; print(f\"memory build on CUDA: {m['seconds']:.1f} s, of which the selection {m['coreset_seconds']:.1f} s; pools {m['pool_per_level']}\")" | tee "$OUT/memory_build.txt"
  $PY -m stfpm_edge.cli train --data ../shared/data/mvtec/bottle --reference student --epochs 10 --out "$OUT/run" --overlays 0 --device cuda
  MODEL="$OUT/run/model.pt"
  $PY benchmarks/torch_gpu.py --model "$OUT/memory/model.pt" --data ../shared/data/mvtec/bottle --train-epochs 0 --json "$OUT/torch_gpu_memory.json" 2>&1 | tee "$OUT/torch_gpu_memory.log"
fi
$PY benchmarks/torch_gpu.py --model "$MODEL" --data ../shared/data/mvtec/bottle --json "$OUT/torch_gpu.json" 2>&1 | tee "$OUT/torch_gpu.log"
$PY benchmarks/torch_gpu.py --table memory="$OUT/torch_gpu_memory.json" student="$OUT/torch_gpu.json" | tee "$OUT/latency_table.md"
if ! $PY -c "import tensorrt, pycuda.driver as c; c.init(); print('TensorRT', tensorrt.__version__, '|', c.Device(0).name())"; then
  echo "TensorRT / pycuda not installed: the PyTorch checks above are all this machine can run"
  exit 0
fi
STFPM_GPU_MODEL="$MODEL" $PY -m pytest -m gpu -s -q tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
$PY -m stfpm_edge.cli export "$MODEL" --out "$OUT/model.onnx" --no-verify
$PY -m stfpm_edge.cli export "$MODEL" --out "$OUT/model_fp16.onnx" --precision fp16 --no-verify
$PY -m stfpm_edge.cli calibrate "$OUT/model.onnx" --out "$OUT/model_int8.onnx" --data ../shared/data/mvtec/bottle --no-verify
WEAK=$($PY -c "import tensorrt as t; print(int(hasattr(t.BuilderFlag, 'FP16')))")
FP16_SRC="$OUT/model.onnx"; [ "$WEAK" = 1 ] || FP16_SRC="$OUT/model_fp16.onnx"
$PY -m stfpm_edge.cli build "$FP16_SRC" --precision fp16 --out "$OUT/engines"
$PY -m stfpm_edge.cli build "$OUT/model_int8.onnx" --precision int8 --out "$OUT/engines"
$PY -m stfpm_edge.cli bench "$OUT/model.onnx" "$OUT"/engines/*.engine --batch 1,8 --iters 200 --warmup 20 \
  --image ../shared/data/mvtec/bottle/test/good/000.png --json "$OUT/bench.json" --plot "$OUT/bench.png"
