"""Camera streams: capture sources, the threaded inspection pipeline, line-scan tiling, outputs.

Torch-free: with an ONNX or TensorRT model, the whole run path works without PyTorch installed.
"""
