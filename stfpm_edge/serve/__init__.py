"""Serving: Triton model repositories, the `serve` command (PyTriton) and the Triton client engine (run side, torch-free)."""
