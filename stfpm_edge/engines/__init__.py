"""Inference backends behind one interface: ``open_engine(path)`` picks one by file suffix.

Importing this package imports neither torch nor onnxruntime nor tensorrt; each backend imports
its runtime when it is opened.
"""

from .base import Engine, EngineUnavailable, FrameError, engine_options, open_engine

__all__ = ["Engine", "EngineUnavailable", "FrameError", "engine_options", "open_engine"]
